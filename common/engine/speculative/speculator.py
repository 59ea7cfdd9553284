"""The engine's side of speculative decoding: which sequences get drafts, how long, and what it gained.

Each decode row of a speculating sequence becomes a chunk of 1 + k tokens (the last real token and
k drafts) verified in one forward pass (``common.engine.runner``); the engine keeps the longest
prefix of drafts the target agrees with plus the target's own next token (see
:func:`accepted_length`). Per sequence, k follows the recent acceptance (a row whose drafts keep
failing costs compute for nothing): it shrinks to what is being accepted, and a sequence whose
acceptance stays low stops proposing for a while (doubling each time), then probes again.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any

from common.engine.config import EngineConfig
from common.engine.sequence import Sequence
from common.engine.speculative.ngram import NgramProposer
from common.engine.speculative.suffix import SuffixProposer

__all__ = ["Speculator", "accepted_length", "make_speculator"]

# Back-off: after PROBE_STEPS steps with drafts whose mean accepted tokens per step stays under
# MIN_ACCEPTED, stop proposing for PAUSE_STEPS decode steps, doubling on each relapse up to MAX_PAUSE.
PROBE_STEPS = 4
MIN_ACCEPTED = 0.35
PAUSE_STEPS = 8
MAX_PAUSE = 256
EMA_WEIGHT = 0.3


def accepted_length(draft: Seq[int], target: Seq[int]) -> int:
    """How many leading drafts the target picked: ``target[j]`` is the target's token after the
    context plus ``draft[:j]``, so draft ``j`` stands while it equals ``target[j]``.

    For sampled rows this is the exact rejection rule for a point-mass proposal: ``target[j]`` is a
    sample of the target distribution p, so draft d is accepted with probability p(d) and, when
    rejected, the token kept is a sample of p with d removed, renormalised.
    """
    n = 0
    for d, t in zip(draft, target):
        if d != t:
            break
        n += 1
    return n


@dataclass(slots=True)
class _SeqSpec:
    proposer_state: Any
    ema_accepted: float  # recent accepted drafts per speculative step
    steps: int = 0  # speculative steps since the last probe began
    paused: int = 0  # decode steps left without drafts
    pause_len: int = PAUSE_STEPS


@dataclass
class SpecStats:
    draft_tokens: int = 0
    accepted_tokens: int = 0
    spec_steps: int = 0  # sequence-steps that verified drafts
    emitted_tokens: int = 0  # tokens those steps produced (accepted drafts + the target's own)
    backoffs: int = 0


class Speculator:
    def __init__(self, method: str, proposer: NgramProposer | SuffixProposer, num_tokens: int) -> None:
        self.method = method
        self.proposer = proposer
        self.num_tokens = num_tokens
        self.stats = SpecStats()
        self._states: weakref.WeakKeyDictionary[Sequence, _SeqSpec] = weakref.WeakKeyDictionary()

    @staticmethod
    def eligible(seq: Sequence) -> bool:
        """Structured outputs advance a grammar per token (their masks for the draft rows would
        need the grammar stepped through the drafts): those rows decode one token at a time, as do
        beam-search rows (their beam group scores one token per step) and image requests (their
        M-RoPE positions are laid out per scheduled chunk, drafts not included)."""
        return (seq.params.structured_kind is None and not seq.params.use_beam_search and seq.mm is None
                and not seq.hold_after_prefill and seq.num_output_tokens > 0)

    def propose(self, seq: Sequence, max_model_len: int) -> list[int]:
        """Drafts for a sequence about to decode one token (empty: decode plainly this step)."""
        if not self.eligible(seq):
            return []
        state = self._states.get(seq)
        if state is None:
            state = self._states[seq] = _SeqSpec(self.proposer.new_state(), float(self.num_tokens))
        # Emitting 1 + k tokens must stay within max_tokens and the context window.
        room = min(seq.max_tokens - seq.num_output_tokens, max_model_len - seq.num_tokens) - 1
        k = min(self.num_tokens, room, max(1, round(state.ema_accepted) + 1))
        if state.paused > 0:
            state.paused -= 1
            k = 0
            if state.paused == 0:
                state.steps = 0
                state.ema_accepted = float(self.num_tokens)
        # The proposer indexes every token even when no draft is wanted, so it stays incremental.
        return self.proposer.propose(state.proposer_state, seq.token_ids, k if k > 0 else 0)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        stats = self.stats
        stats.draft_tokens += drafted
        stats.accepted_tokens += accepted
        stats.spec_steps += 1
        stats.emitted_tokens += accepted + 1
        state = self._states.get(seq)
        if state is None:
            return
        state.ema_accepted += EMA_WEIGHT * (accepted - state.ema_accepted)
        state.steps += 1
        if state.steps >= PROBE_STEPS and state.ema_accepted < MIN_ACCEPTED:
            stats.backoffs += 1
            state.paused = state.pause_len
            state.pause_len = min(MAX_PAUSE, state.pause_len * 2)

    def finished(self, seq: Sequence) -> None:
        if isinstance(self.proposer, SuffixProposer):
            self.proposer.finished(seq.output_ids)
        self._states.pop(seq, None)

    def load_stats(self) -> dict[str, Any]:
        s = self.stats
        return {
            "spec_method": self.method,
            "spec_draft_tokens_total": s.draft_tokens,
            "spec_accepted_tokens_total": s.accepted_tokens,
            "spec_steps_total": s.spec_steps,
            "spec_acceptance_rate": s.accepted_tokens / s.draft_tokens if s.draft_tokens else 0.0,
            # Tokens per verified row and step: 1 = no gain; 1 + k = every draft accepted.
            "spec_mean_accepted_length": s.emitted_tokens / s.spec_steps if s.spec_steps else 0.0,
            "spec_backoffs_total": s.backoffs,
        }


def make_speculator(config: EngineConfig) -> Speculator | None:
    config.validate_speculative()
    method = config.speculative_method
    if method == "none":
        return None
    if method == "ngram":
        proposer: NgramProposer | SuffixProposer = NgramProposer(config.ngram_min, config.ngram_max)
    else:
        proposer = SuffixProposer(config.suffix_max_depth, config.suffix_min_prob, config.suffix_global,
                                  config.suffix_global_requests)
    return Speculator(method, proposer, config.num_speculative_tokens)
