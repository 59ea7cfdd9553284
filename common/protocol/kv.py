"""The kv channel: a decode worker's bound ROUTER, a DEALER per prefill worker sending to it.

One transfer moves one sequence's KV from a prefill worker to a decode worker:

    P -> D  KvTransferBegin     (the request and its state; D reserves pages or refuses)
    D -> P  KvTransferReady     (ok: pages reserved; else P tries its next decode candidate)
    P -> D  KvTransferChunk x k (layers [layer_start, layer_start + num_layers), one raw frame per
                                 layer: that layer's pages, shape [2, kv_heads, pages, page_size, dim])
    D -> P  KvTransferAck       (after the last chunk: ok means D owns the sequence now)
    P -> D  KvTransferCancel    (at any point: the transfer will not complete)

A DP-balance migration between two decode workers uses the same exchange; with `recompute` set
no layer travels: the receiver takes the sequence in to prefill prompt + outputs itself, and its
Ready(ok) is the end of the transfer.
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register
from common.protocol.sampling import Sampling

__all__ = [
    "KvMessage",
    "KV",
    "KvTransferBegin",
    "KvTransferReady",
    "KvTransferChunk",
    "KvTransferCancel",
    "KvTransferAck",
]


class KvMessage(Message):
    """A message on the kv channel."""


KV = Channel("kv", KvMessage, binder="decode worker", connector="prefill worker")


@register
@KV.carries(to="decode worker")
class KvTransferBegin(KvMessage):
    TAG: ClassVar[str] = "kv_transfer_begin"
    transfer_id: str
    request_id: str
    source_instance: str
    prompt_ids: list[int]
    output_ids: list[int]  # tokens sampled on the prefill worker (already streamed to the client)
    logprobs: list | None = None  # the matching TokenLogprobs dicts when logprobs were asked for
    sampling: Sampling
    priority: str
    tokens_addr: str
    arrival_time: float
    num_tokens: int  # tokens whose KV travels (prompt + outputs already computed)
    num_layers: int
    page_size: int
    dtype: str
    namespace: str  # model | kv dtype | page size: both ends must agree
    num_cached_tokens: int = 0
    ttft_s: float = -1.0
    # The per-request sampler RNG state (seeded requests), so decode continues the same stream.
    generator_state: bytes | None = None  # unused since seeded sampling is counter-based (kept for old peers)
    # The receiver's flip generation when the scheduler named it as a decode candidate
    # (`DecodeCandidate.flip_id`); None: not named by the scheduler, its current role decides.
    candidate_flip_id: int | None = None
    # DP-balance migration of a running sequence (num_tokens == 0, no chunks follow when recompute).
    migration: bool = False
    recompute: bool = False


@register
@KV.carries(to="prefill worker")
class KvTransferReady(KvMessage):
    TAG: ClassVar[str] = "kv_transfer_ready"
    transfer_id: str
    ok: bool
    reason: str = ""


@register
@KV.carries(to="decode worker")
class KvTransferChunk(KvMessage):
    TAG: ClassVar[str] = "kv_transfer_chunk"
    transfer_id: str
    layer_start: int
    num_layers: int
    last: bool


@register
@KV.carries(to="decode worker")
class KvTransferCancel(KvMessage):
    """P -> D: the transfer will not complete (request aborted, export failed): free the pages."""

    TAG: ClassVar[str] = "kv_transfer_cancel"
    transfer_id: str
    reason: str = ""


@register
@KV.carries(to="prefill worker")
class KvTransferAck(KvMessage):
    TAG: ClassVar[str] = "kv_transfer_ack"
    transfer_id: str
    ok: bool
    reason: str = ""
