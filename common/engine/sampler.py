"""The batched sampler: one call per engine step picks the next token of every running sequence.

Pipeline per step (vLLM semantics): penalties -> min_tokens masking -> temperature -> min-p ->
top-k -> top-p -> choice. Greedy rows (temperature 0) take the argmax of the processed logits;
random rows race ``probs / Exponential(1)`` noise. A seeded row draws its noise from its own
generator, re-seeded from (seed, sequence position) before each draw, so a seeded request gives the
same tokens whatever else shares the batch, and a stream resumed elsewhere continues unchanged.

Logprobs describe the model's own distribution: log_softmax of the raw logits, before
penalties, temperature and filtering (what OpenAI's API reports).

The tensor ops live in `kernels.sampling`; this module turns per-request parameters into
per-row tensors and picks the cheapest path for the batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from common.engine.beam_search import mask_disallowed
from common.engine.sampling_params import SamplingParams
from common.engine.token_mask import TokenMask, apply_token_mask
from kernels import sampling as ops

logger = logging.getLogger(__name__)

_SEED_MASK = 2**64 - 1


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # top-N (token id, logprob), most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None
    # Beam-search rows sample nothing: seq_id -> fp32 next-token log-probs (common.engine.beam_groups)
    beam_logprobs: dict[int, torch.Tensor] = field(default_factory=dict)


class SeededGenerator(torch.Generator):
    """A seeded sequence's generator; it remembers its base seed.

    Counter-based: before each draw the sampler re-seeds it from (base seed, position of the token
    being sampled in the whole sequence) (`seek`), so the noise is a pure function of the seed and
    that position, like Philox. A sequence resumed elsewhere with its tokens so far, whether they
    come back as output (a P/D hand-off) or as part of a longer prompt (a migrated stream),
    draws exactly what the original would have, with no generator state to carry.
    """

    base_seed: int

    def seek(self, position: int) -> None:
        """Position the stream at sequence position `position` (the next draw is that token's)."""
        self.manual_seed(_mix(self.base_seed, position))


def _mix(seed: int, position: int) -> int:
    """splitmix64 of (seed, position): nearby seeds and positions give unrelated streams."""
    z = (seed + 0x9E3779B97F4A7C15 * (position + 1)) & _SEED_MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _SEED_MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _SEED_MASK
    return z ^ (z >> 31)


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one seeded sequence (any 64-bit seed, negative ones included)."""
    generator = SeededGenerator(device=device)
    generator.base_seed = seed & _SEED_MASK
    generator.seek(0)
    return generator


def _needs_min_tokens_mask(params: SamplingParams, output_len: int) -> bool:
    return output_len < params.min_tokens


class Sampler:
    """Picks one token per row of a ``[B, V]`` logits batch."""

    def __init__(self, eos_token_ids: set[int]) -> None:
        self.eos_token_ids = sorted(set(eos_token_ids))

    def __call__(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        generators: list[torch.Generator | None],
        token_mask: TokenMask | None = None,
    ) -> SamplerOutput:
        batch = logits.shape[0]
        if logits.dim() != 2 or not (len(params) == len(prompt_ids) == len(output_ids) == len(generators) == batch):
            raise ValueError(
                f"sampler inputs disagree: logits {tuple(logits.shape)}, {len(params)} params, "
                f"{len(prompt_ids)} prompts, {len(output_ids)} outputs, {len(generators)} generators"
            )
        if batch == 0:
            return SamplerOutput(token_ids=[], logprobs=[])

        # Hot path: the engine's default (greedy, nothing else) is one argmax for the whole batch.
        if all(
            p.is_greedy and not p.has_penalties and p.logprobs is None and not _needs_min_tokens_mask(p, len(out))
            and p.allowed_token_ids is None
            for p, out in zip(params, output_ids)
        ):
            if token_mask is not None:  # structured greedy rows: nothing reads the raw logits after this
                apply_token_mask(logits, token_mask)
            return SamplerOutput(token_ids=ops.greedy_choice(logits).tolist(), logprobs=[None] * batch)

        raw_logits = logits
        work = logits.float().clone()
        self._apply_penalties(work, params, prompt_ids, output_ids)
        self._apply_min_tokens(work, params, output_ids)
        for row, p in enumerate(params):
            if p.allowed_token_ids is not None:
                mask_disallowed(work, row, p.allowed_token_ids)
        if token_mask is not None:
            self._apply_token_mask(work, logits, token_mask, params, output_ids)

        greedy_rows = [row for row, p in enumerate(params) if p.is_greedy]
        random_rows = [row for row, p in enumerate(params) if not p.is_greedy]
        chosen = torch.empty(batch, dtype=torch.int64, device=logits.device)
        if greedy_rows:
            index = torch.as_tensor(greedy_rows, device=logits.device)
            chosen[index] = ops.greedy_choice(work[index])
        if random_rows:
            for row in random_rows:  # counter-based seeding: see SeededGenerator
                generator = generators[row]
                if isinstance(generator, SeededGenerator):
                    generator.seek(len(prompt_ids[row]) + len(output_ids[row]))
            index = torch.as_tensor(random_rows, device=logits.device)
            chosen[index] = self._sample_random(
                work[index], [params[row] for row in random_rows], [generators[row] for row in random_rows]
            )
        token_ids = chosen.tolist()
        return SamplerOutput(token_ids=token_ids, logprobs=self._logprobs(raw_logits, chosen, params))

    # ---- steps -----------------------------------------------------------------------------

    @staticmethod
    def _apply_penalties(
        work: torch.Tensor, params: list[SamplingParams], prompt_ids: list[list[int]], output_ids: list[list[int]]
    ) -> None:
        rows = [row for row, p in enumerate(params) if p.has_penalties]
        if not rows:
            return
        vocab = work.shape[1]
        device = work.device
        index = torch.as_tensor(rows, device=device)
        sub = work[index]
        need_prompt = any(params[row].repetition_penalty != 1.0 for row in rows)
        output_counts = ops.token_counts([output_ids[row] for row in rows], vocab, device)
        prompt_counts = (
            ops.token_counts([prompt_ids[row] for row in rows], vocab, device)
            if need_prompt
            else torch.zeros_like(output_counts)
        )

        def column(name: str) -> torch.Tensor:
            return torch.tensor([float(getattr(params[row], name)) for row in rows], device=device)

        ops.apply_penalties(
            sub,
            prompt_counts,
            output_counts,
            column("repetition_penalty"),
            column("frequency_penalty"),
            column("presence_penalty"),
        )
        work[index] = sub

    def _apply_min_tokens(self, work: torch.Tensor, params: list[SamplingParams], output_ids: list[list[int]]) -> None:
        """Until a row has min_tokens outputs, it cannot pick a token that would stop it."""
        mask_rows: list[int] = []
        mask_ids: list[int] = []
        vocab = work.shape[1]
        for row, p in enumerate(params):
            if not _needs_min_tokens_mask(p, len(output_ids[row])):
                continue
            stoppers = set(p.stop_token_ids)
            if not p.ignore_eos:
                stoppers.update(self.eos_token_ids)
            for token_id in stoppers:
                if 0 <= token_id < vocab:
                    mask_rows.append(row)
                    mask_ids.append(token_id)
        ops.mask_tokens(work, mask_rows, mask_ids)

    @staticmethod
    def _apply_token_mask(
        work: torch.Tensor, raw_logits: torch.Tensor, token_mask: TokenMask, params: list[SamplingParams],
        output_ids: list[list[int]],
    ) -> None:
        """Structured outputs: only the tokens the grammar allows (one vectorised pass)."""
        apply_token_mask(work, token_mask)
        # min_tokens may have banned the only token the grammar allows (EOS once it is complete):
        # the grammar wins, or the row would have nothing left to pick.
        if not any(_needs_min_tokens_mask(params[row], len(output_ids[row])) for row in token_mask.rows):
            return
        index = torch.as_tensor(token_mask.rows, device=work.device)
        dead = torch.isneginf(work.index_select(0, index)).all(dim=1)
        if bool(dead.any()):
            rows = [row for row, is_dead in zip(token_mask.rows, dead.tolist()) if is_dead]
            keep = [i for i, is_dead in enumerate(dead.tolist()) if is_dead]
            fallback = raw_logits[torch.as_tensor(rows, device=work.device)].float()
            apply_token_mask(fallback, TokenMask(list(range(len(rows))), token_mask.bitmask[keep]))
            work[torch.as_tensor(rows, device=work.device)] = fallback

    @staticmethod
    def _sample_random(
        work: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        device = work.device
        temperatures = torch.tensor([p.temperature for p in params], dtype=work.dtype, device=device)
        ops.apply_temperature(work, temperatures)
        if any(p.min_p > 0.0 for p in params):
            ops.apply_min_p(work, torch.tensor([p.min_p for p in params], dtype=work.dtype, device=device))
        if any(p.top_k_enabled for p in params):
            vocab = work.shape[1]
            top_k = torch.tensor([p.top_k if p.top_k_enabled else vocab for p in params], device=device)
            ops.apply_top_k(work, top_k)
        if any(p.top_p < 1.0 for p in params):
            ops.apply_top_p(work, torch.tensor([p.top_p for p in params], dtype=work.dtype, device=device))
        probs = work.softmax(dim=1)
        noise = ops.exponential_noise(tuple(probs.shape), generators, device=device)
        return ops.exponential_race_choice(probs, noise)

    @staticmethod
    def _logprobs(
        raw_logits: torch.Tensor, chosen: torch.Tensor, params: list[SamplingParams]
    ) -> list[TokenLogprobs | None]:
        result: list[TokenLogprobs | None] = [None] * len(params)
        rows = [row for row, p in enumerate(params) if p.logprobs is not None]
        if not rows:
            return result
        index = torch.as_tensor(rows, device=raw_logits.device)
        max_top = max(params[row].logprobs for row in rows)
        chosen_lp, rank, top_values, top_ids = ops.logprobs_of(raw_logits[index], chosen[index], max_top)
        chosen_list = chosen[index].tolist()
        chosen_lp_list = chosen_lp.tolist()
        rank_list = rank.tolist()
        top_values_list = top_values.tolist()
        top_ids_list = top_ids.tolist()
        for i, row in enumerate(rows):
            n = params[row].logprobs
            result[row] = TokenLogprobs(
                token_id=chosen_list[i],
                logprob=chosen_lp_list[i],
                rank=rank_list[i],
                top=list(zip(top_ids_list[i][:n], top_values_list[i][:n])),
            )
        return result
