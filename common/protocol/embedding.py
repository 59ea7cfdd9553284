"""What makes a request an embedding request as it travels on the bus (Submit, then Assign).

A request whose `embed` field holds an `EmbedTask` is not generated: the worker runs a
prefill-only forward over its prompt, pools the final hidden states as the task says and sends
one `EmbeddingResult` (tokens channel) instead of token deltas. The values are checked by the
worker (`common.engine.embedding`); the protocol only carries them.
"""

from __future__ import annotations

from common.protocol.base import Record

__all__ = ["EmbedTask"]


class EmbedTask(Record):
    pooling: str = "last"  # "last" | "mean"
    normalize: bool = True  # L2-normalise the pooled vector
