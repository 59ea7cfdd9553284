"""Beam search scoring: one request's live beams, its finished hypotheses and when it stops.

The rules are transformers' `generate(num_beams=B, do_sample=False)` (its vectorised beam search):
each step takes the top ``max(2, 1 + #stop ids) * B`` candidates over (beam, token) by cumulative
log-probability; a candidate that ends (a stop token, or the length limit) among the top B joins
the finished hypotheses with score ``cumulative / generated_len ** length_penalty`` (the finished
list keeps the B best); the best B candidates that did not end are the next live beams; the search
stops when every candidate ends, when no live beam can still beat the worst of B finished ones
(``early_stopping`` picks the bound), or, with ``early_stopping=True``, once B have finished.
Scores are fp32 tensors as in transformers, so the same logits pick the same beams.

This module is pure scoring (tensors and token lists in, choices out); the engine's side (page
forks, scheduling) is :mod:`common.engine.beam_groups`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["BeamHypothesis", "BeamSearch", "beam_logprobs", "mask_disallowed"]


@dataclass(slots=True)
class BeamHypothesis:
    """A beam as returned: its output tokens, summed log-probability and length-penalised score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str  # "stop": ended by a stop token (included in token_ids); "length": hit max_tokens


def mask_disallowed(logprobs: torch.Tensor, row: int, allowed: Sequence[int]) -> None:
    """Set every token of ``logprobs[row]`` outside ``allowed`` to -inf (in place)."""
    keep = torch.zeros(logprobs.shape[1], dtype=torch.bool, device=logprobs.device)
    keep[torch.as_tensor(list(allowed), dtype=torch.long, device=logprobs.device)] = True
    logprobs[row].masked_fill_(~keep, -math.inf)


def beam_logprobs(logits: torch.Tensor, allowed: Sequence[Sequence[int] | None]) -> torch.Tensor:
    """fp32 log-softmax of each row, then each row's disallowed tokens at -inf.

    Masking after the softmax (not renormalising over the allowed tokens) is what transformers'
    constrained beam search does (``prefix_allowed_tokens_fn``): a beam keeps the model's own
    probability of its tokens, so beams that spent mass on disallowed tokens rank lower.
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    for row, tokens in enumerate(allowed):
        if tokens is not None:
            mask_disallowed(logprobs, row, tokens)
    return logprobs


def _div_f32(value: float, divisor: float) -> float:
    # transformers divides fp32 score tensors by a Python float: the quotient is rounded to fp32.
    return (torch.tensor(value, dtype=torch.float32) / divisor).item()


class BeamSearch:
    """The scoring state of one request's beam search."""

    def __init__(
        self,
        width: int,
        max_tokens: int,
        stop_token_ids: set[int],
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        min_tokens: int = 0,
    ) -> None:
        self.width = width
        self.max_tokens = max_tokens
        self.stop_token_ids = set(stop_token_ids)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.min_tokens = min_tokens
        self.num_candidates = max(2, 1 + len(self.stop_token_ids)) * width
        self.scores = torch.zeros(1, dtype=torch.float32)  # cumulative log-prob of each live beam
        self.finished: list[BeamHypothesis] = []  # best first, at most `width`
        self._improvable = True  # transformers' is_early_stop_heuristic_unsatisfied (sticky once False)
        self.done = False

    def select(self, logprobs: torch.Tensor, outputs: Sequence[list[int]]) -> list[tuple[int, int]]:
        """One step. ``logprobs[i]`` is live beam i's next-token log-probabilities (fp32) and
        ``outputs[i]`` its output tokens so far. Returns the next live beams as (parent index,
        token), best first, and keeps their scores; sets :attr:`done` when the search is over."""
        if self.done:
            raise RuntimeError("beam search already finished")
        num_live, vocab = logprobs.shape
        if num_live != len(outputs) or num_live != self.scores.shape[0]:
            raise ValueError(f"{num_live} log-prob rows for {len(outputs)} beams and {self.scores.shape[0]} scores")
        out_len = len(outputs[0]) + 1  # every live beam has the same length
        if out_len <= self.min_tokens and self.stop_token_ids:
            logprobs = logprobs.clone()
            logprobs[:, sorted(self.stop_token_ids)] = -math.inf
        candidates = (logprobs + self.scores[:, None]).reshape(-1)
        values, indices = torch.topk(candidates, min(self.num_candidates, candidates.numel()))
        at_limit = out_len >= self.max_tokens
        was_full = len(self.finished) == self.width
        penalty = out_len**self.length_penalty
        live: list[tuple[int, int]] = []
        live_scores: list[float] = []
        every_candidate_ends = True
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            if value == -math.inf:
                break  # masked (a disallowed token): not a candidate at all
            parent, token = divmod(index, vocab)
            is_stop = token in self.stop_token_ids
            if not (is_stop or at_limit):
                every_candidate_ends = False
                if len(live) < self.width:
                    live.append((parent, token))
                    live_scores.append(value)
                continue
            # Only the top `width` candidates may finish; the rest only back the live beams up.
            if rank < self.width and self._improvable and not (was_full and self.early_stopping is True):
                self._add_finished(BeamHypothesis(
                    outputs[parent] + [token], value, _div_f32(value, penalty), "stop" if is_stop else "length"))
        self.scores = torch.tensor(live_scores, dtype=torch.float32)
        if live and len(self.finished) == self.width:
            best_len = self.max_tokens if self.early_stopping == "never" and self.length_penalty > 0 else out_len
            best_possible = _div_f32(live_scores[0], best_len**self.length_penalty)
            self._improvable = self._improvable and best_possible > self.finished[-1].score
        all_finished = len(self.finished) == self.width and self.early_stopping is True
        self.done = not live or every_candidate_ends or not self._improvable or all_finished
        return live

    def _add_finished(self, hypothesis: BeamHypothesis) -> None:
        self.finished.append(hypothesis)
        self.finished.sort(key=lambda h: h.score, reverse=True)  # stable: earlier ones win ties
        del self.finished[self.width :]

    def results(self, live_outputs: Sequence[list[int]]) -> list[BeamHypothesis]:
        """The beams to return, best first. Normally the finished ones; when masking left fewer
        candidates than the width, the live beams (length-penalised) make up the rest."""
        results = list(self.finished)
        if len(results) < self.width:
            for tokens, score in zip(live_outputs, self.scores.tolist()):
                penalty = max(1, len(tokens)) ** self.length_penalty
                results.append(BeamHypothesis(list(tokens), score, _div_f32(score, penalty), "length"))
            results.sort(key=lambda h: h.score, reverse=True)
        return results[: self.width]
