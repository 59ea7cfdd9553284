"""Generative recommendation: fixed-step beam search over an item vocabulary, host work overlapped.

The xLLM report's scenario: each request (a user's history as tokens) decodes exactly
``num_steps`` tokens (one semantic ID, e.g. 3 codebook tokens) with beam width B, every token
drawn from ``allowed_token_ids``, and the B best item IDs come back. Every request takes the same
number of steps, so a batch of them moves in lockstep and the engine's general scheduler (budgets,
preemption, per-sequence queues) has nothing to decide: this module drives the engine's model,
KV page pool and block manager directly, with the same scoring as the engine's beam search
(:class:`~common.engine.beam_search.BeamSearch`, no stop token), so its beams equal
``LLM.beam_search(..., ignore_eos=True, allowed_token_ids=...)``.

A step is host work (beam selection over the log-probs, page forks and frees, the next inputs and
attention metadata) then compute (the forward pass and log-softmax). With ``overlap`` the requests
are split into two micro-batches that alternate: while a worker thread computes one, the main
thread does the other's host work (torch releases the GIL inside its kernels). Without it, the
same steps run one after the other (``micro_batches`` picks one or two batches, so the effect of
the split itself can be told from the effect of the overlap).
"""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from common.engine.beam_search import BeamHypothesis, BeamSearch, beam_logprobs
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from kernels.attention import build_attention_metadata

__all__ = ["FixedStepDecoder"]

_ids = itertools.count()


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    search: BeamSearch
    beams: list[tuple[tuple, list[int]]] = field(default_factory=list)  # (block-manager seq id, output tokens)
    num_cached: int = 0  # prompt tokens the prefix cache held at admission
    results: list[BeamHypothesis] | None = None


@dataclass
class _Inputs:
    ids: torch.Tensor
    positions: torch.Tensor
    meta: object
    last_rows: torch.Tensor  # the flat-batch row of each beam's last token
    rows_per_request: list[int]


class FixedStepDecoder:
    """Runs batches of fixed-step beam-search requests on an engine's model and KV pool."""

    def __init__(self, engine: LLMEngine, beam_width: int, num_steps: int, allowed_token_ids: list[int],
                 overlap: bool = True, micro_batches: int = 2) -> None:
        if beam_width < 1 or num_steps < 1:
            raise ValueError(f"beam_width and num_steps must be >= 1, got {beam_width}, {num_steps}")
        if len(set(allowed_token_ids)) < beam_width:
            raise ValueError(f"beam width {beam_width} needs at least as many allowed tokens, "
                             f"got {len(set(allowed_token_ids))}")
        if any(not 0 <= t < engine.vocab_size for t in allowed_token_ids):
            raise ValueError(f"allowed_token_ids must be in [0, {engine.vocab_size})")
        if micro_batches not in (1, 2) or (overlap and micro_batches != 2):
            raise ValueError("micro_batches is 1 or 2, and the overlap needs 2")
        self.engine = engine
        self.beam_width = beam_width
        self.num_steps = num_steps
        self.allowed = list(allowed_token_ids)
        self.overlap = overlap
        self.micro_batches = micro_batches

    @torch.inference_mode()
    def run(self, prompts: list[list[int]]) -> list[list[BeamHypothesis]]:
        """Each prompt's ``beam_width`` best item IDs (``num_steps`` tokens each), best first."""
        if self.engine.has_unfinished():
            raise RuntimeError("the engine is serving other requests: run fixed-step batches on an idle engine")
        for prompt in prompts:
            self.engine.validate_request(f"rec-{next(_ids)}", prompt, self._params())
        requests = [_Request(list(p), BeamSearch(self.beam_width, self.num_steps, set())) for p in prompts]
        half = (len(requests) + 1) // 2
        groups = [requests[:half], requests[half:]] if self.micro_batches == 2 else [requests]
        groups = [g for g in groups if g]
        # The forward passes run on one worker thread in every mode, so the modes differ only in
        # whether the host work waits for them. (On the loaded 2-core dev box, passes issued from
        # the main thread measured 10-40x slower than from a worker thread; the cause was not found.)
        try:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rec-compute") as pool:
                for group in groups:
                    self._admit(group)
                if self.overlap and len(groups) == 2:
                    self._run_overlapped(pool, *groups)
                else:
                    for group in groups:
                        while self._unfinished(group):
                            self._finish_step(group, pool.submit(self._compute, self._prepare(group)).result())
        finally:
            for request in requests:
                self._free(request)
        return [r.results or [] for r in requests]

    def _params(self) -> SamplingParams:
        return SamplingParams(n=self.beam_width, use_beam_search=True, temperature=0.0, max_tokens=self.num_steps,
                              ignore_eos=True, allowed_token_ids=self.allowed)

    def _run_overlapped(self, pool: ThreadPoolExecutor, first: list[_Request], second: list[_Request]) -> None:
        # Two-stage pipeline: the worker thread computes one micro-batch while this thread finishes
        # the other's previous step and builds its next inputs.
        pending = pool.submit(self._compute, self._prepare(first))
        waiting, waiting_inputs = second, self._prepare(second)
        running = first
        while pending is not None:
            logprobs = pending.result()
            pending = pool.submit(self._compute, waiting_inputs) if waiting_inputs is not None else None
            self._finish_step(running, logprobs)
            next_inputs = self._prepare(running) if self._unfinished(running) else None
            if pending is None and next_inputs is not None:
                pending = pool.submit(self._compute, next_inputs)
                continue
            running, waiting, waiting_inputs = waiting, running, next_inputs

    # ---- host work ------------------------------------------------------------------------

    @staticmethod
    def _unfinished(group: list[_Request]) -> bool:
        return any(r.results is None for r in group)

    def _admit(self, group: list[_Request]) -> None:
        bm = self.engine.block_manager
        for request in group:
            seq_id = ("rec", next(_ids))
            request.num_cached = bm.admit(seq_id, request.prompt_ids)
            request.beams = [(seq_id, [])]

    def _prepare(self, group: list[_Request]) -> _Inputs:
        """The next forward pass of every live beam of the group: the tokens it has not computed."""
        bm = self.engine.block_manager
        ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        last_rows: list[int] = []
        rows_per_request: list[int] = []
        for request in group:
            if request.results is not None:
                continue
            rows_per_request.append(len(request.beams))
            for seq_id, outputs in request.beams:
                tokens = request.prompt_ids + outputs
                # After a step every beam has all but its newest token computed.
                start = len(tokens) - 1 if outputs else request.num_cached
                if not bm.ensure_capacity(seq_id, len(tokens)):
                    raise RuntimeError("the KV pool is too small for this batch of fixed-step requests")
                ids.extend(tokens[start:])
                positions.extend(range(start, len(tokens)))
                query_lens.append(len(tokens) - start)
                context_lens.append(len(tokens))
                tables.append(bm.page_table(seq_id))
                last_rows.append(len(ids) - 1)
                bm.commit(seq_id, tokens, len(tokens))  # computed by the pass these inputs feed
        meta = build_attention_metadata(query_lens, context_lens, tables, self.engine.page_size,
                                        self.engine.config.device)
        device = self.engine.config.device
        return _Inputs(torch.tensor(ids, dtype=torch.long, device=device),
                       torch.tensor(positions, dtype=torch.long, device=device), meta,
                       torch.tensor(last_rows, dtype=torch.long, device=device), rows_per_request)

    def _compute(self, inputs: _Inputs) -> torch.Tensor:
        engine = self.engine
        with torch.inference_mode():
            hidden = engine.model(inputs.ids, inputs.positions, inputs.meta, engine.kv_caches)
            logits = engine.model.compute_logits(hidden.index_select(0, inputs.last_rows))
            return beam_logprobs(logits, [self.allowed] * logits.shape[0]).cpu()

    def _finish_step(self, group: list[_Request], logprobs: torch.Tensor) -> None:
        """Pick each request's next beams from its rows; fork, extend and free their pages."""
        row = 0
        for request in group:
            if request.results is not None:
                continue
            count = len(request.beams)
            rows, row = logprobs[row : row + count], row + count
            chosen = request.search.select(rows, [outputs for _, outputs in request.beams])
            if request.search.done:
                request.results = request.search.results(
                    [request.beams[p][1] + [token] for p, token in chosen])
                self._free(request)
                continue
            request.beams = self._follow(request.beams, chosen)

    def _follow(self, beams: list[tuple[tuple, list[int]]],
                chosen: list[tuple[int, int]]) -> list[tuple[tuple, list[int]]]:
        bm = self.engine.block_manager
        first_pick: dict[int, int] = {}
        new: list[tuple[tuple, list[int]] | None] = [None] * len(chosen)
        for rank, (parent, token) in enumerate(chosen):
            parent_id, outputs = beams[parent]
            if parent not in first_pick:
                first_pick[parent] = rank
                continue
            child_id = ("rec", next(_ids))
            copy = bm.fork(parent_id, child_id)
            if copy is not None:
                for cache in self.engine.kv_caches:
                    cache[:, :, copy[1]].copy_(cache[:, :, copy[0]])
            new[rank] = (child_id, outputs + [token])
        for parent, rank in first_pick.items():
            parent_id, outputs = beams[parent]
            new[rank] = (parent_id, outputs + [chosen[rank][1]])
        for index, (parent_id, _) in enumerate(beams):
            if index not in first_pick:
                bm.free(parent_id)
        return [beam for beam in new if beam is not None]

    def _free(self, request: _Request) -> None:
        for seq_id, _ in request.beams:
            self.engine.block_manager.free(seq_id)
        request.beams = []
