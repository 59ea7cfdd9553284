"""What a worker tracks per request besides the engine's sequences: where its tokens go, how
many choices are still running, and the latency this worker saw (for the PD policy)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.protocol import Sampling
from services.prefill.kv_sender import HandoffRequest

__all__ = ["RequestState"]


@dataclass
class RequestState:
    tokens_addr: str
    n: int
    num_prompt_tokens: int
    finished: set[int] = field(default_factory=set)
    num_output_tokens: int = 0
    started_at: float = field(default_factory=time.monotonic)  # assigned, or KV landed here
    first_token_at: float | None = None
    tokens_here: int = 0  # output tokens this worker computed (not those handed over with the KV)
    ttft_s: float = -1.0
    handoff: HandoffRequest | None = None  # prefill here, then hand the KV to a decode worker
    from_kv: bool = False  # prefilled elsewhere; its KV landed here
    from_store: dict[str, int] = field(default_factory=dict)  # prompt tokens reloaded from the kvstore, by tier
    # What a DP-balance migration sends on with the sequence (from the Assign, or the KV transfer).
    sampling: Sampling | None = None
    priority: str = "online"
    arrival_time: float = 0.0

    def tpot_s(self, now: float) -> float:
        """Mean time per output token after the first (for a handed-over request: per token
        decoded here, counted from when its KV landed)."""
        steps = self.tokens_here - (0 if self.from_kv else 1)
        return (now - self.first_token_at) / steps if self.first_token_at is not None and steps > 0 else -1.0
