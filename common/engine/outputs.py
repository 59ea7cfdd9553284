"""What the engine hands out: each step's per-sequence outputs and its running counters."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.sampler import TokenLogprobs

__all__ = ["SequenceOutput", "EngineStats"]


@dataclass(slots=True)
class SequenceOutput:
    """What one step produced for one sequence: new tokens and, at the end, why it stopped."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    held: bool = False  # prefilled and parked for a P/D hand-off (see KvHandoff.export_kv)
    cumulative_logprob: float | None = None  # beam search: the beam's summed log-probability


@dataclass
class EngineStats:
    """Counters since start (the worker's heartbeats and the benchmarks read them)."""

    steps: int = 0
    step_time_total: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    peak_used_pages: int = 0
