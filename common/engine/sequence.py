"""A sequence: one generation stream (one of a request's ``n`` choices) and its progress."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from common.engine.sampler import TokenLogprobs
from common.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from common.engine.grammar import GrammarState
    from common.engine.multimodal import MultimodalState

__all__ = ["Priority", "SequenceStatus", "Sequence"]

_seq_counter = itertools.count()


class Priority(enum.IntEnum):
    """Lower value is served first."""

    ONLINE = 0
    OFFLINE = 1

    @classmethod
    def parse(cls, value: "str | int | Priority") -> "Priority":
        if isinstance(value, Priority):
            return value
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"priority must be 'online' or 'offline', got {value!r}") from None
        return cls(value)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"  # prefilled, pages kept, waiting to be exported (P/D hand-off) or resumed
    INCOMING = "incoming"  # pages reserved, its KV is being written from another worker
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; ``num_computed`` of them have their KV in the cache."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    index: int = 0
    priority: Priority = Priority.ONLINE
    arrival_time: float = field(default_factory=time.monotonic)
    generator: torch.Generator | None = None
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(init=False)
    num_computed: int = 0
    num_cached_prompt: int = 0  # prompt tokens served from the prefix cache at first admission
    num_preemptions: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    first_token_time: float | None = None
    # Leave the running set once the first output token is sampled (prefill side of a P/D
    # hand-off); cleared when that happens so a resumed sequence is not held again.
    hold_after_prefill: bool = False
    # Structured output: the grammar matcher, built on the first sampling step and synced to the
    # output tokens before each one (GrammarState.sync), so a sequence rebuilt elsewhere with its
    # outputs (P/D hand-off, migration) replays them, and a preempted one keeps its state.
    grammar: GrammarState | None = None
    # Images of a multimodal prompt: embeddings, M-RoPE positions, hash ids (None: text only).
    mm: MultimodalState | None = None

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def hash_token_ids(self) -> list[int]:
        """What the prefix cache hashes: the token ids, with image placeholders standing for their
        image (see common.engine.multimodal)."""
        if self.mm is None:
            return self.token_ids
        return self.mm.hash_prompt_ids + self.token_ids[len(self.prompt_ids) :]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_ids) :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def sort_key(self) -> tuple[int, float, int]:
        """Scheduling order: priority class, then arrival (FCFS), then creation."""
        return (int(self.priority), self.arrival_time, self.seq_id)
