"""Token masks of structured sequences, for one engine step, computed beside the forward pass.

The mask of the token a sequence samples at step N depends only on its tokens up to N-1, which
are known before step N's forward runs. So :meth:`GrammarMasker.start` syncs every structured
sequence's matcher and hands the batch to a worker thread that fills one ``[rows, V/32]`` int32
bitmask with llguidance's parallel executor (native code, the GIL released) while the model
runs; :meth:`MaskJob.result` joins it before sampling, and the sampler applies the whole bitmask
to the logits in one vectorised call (:func:`common.engine.token_mask.apply_token_mask`). After sampling,
:meth:`GrammarMasker.advance` feeds each sampled token to its matcher, so the engine sees at
once whether the grammar is complete (``GrammarState.is_stopped``: finish with "stop").
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import llguidance
import torch

from common.engine.grammar import GrammarTokenizer, tokenizer_for_model
from common.engine.sequence import Sequence
from common.engine.token_mask import TokenMask

logger = logging.getLogger(__name__)

__all__ = ["MaskJob", "GrammarMasker", "MaskTimings"]


class MaskJob:
    """The bitmask of one step, being filled on the masker's thread."""

    def __init__(self, rows: list[int], future: concurrent.futures.Future[TokenMask]) -> None:
        self.rows = rows
        self._future = future

    def result(self) -> TokenMask:
        return self._future.result()


@dataclass
class MaskTimings:
    """Seconds spent on masks since start (the bench reads them)."""

    steps: int = 0
    fill_s: float = 0.0  # on the thread, overlapping the forward pass
    wait_s: float = 0.0  # what the step waited for it after the forward pass
    apply_s: float = 0.0


class GrammarMasker:
    """Builds and syncs the matchers of structured sequences and computes their masks for a step."""

    def __init__(
        self, model_path: str, vocab_size: int, eos_token_ids: Seq[int], num_threads: int | None = None,
        tokenizer: GrammarTokenizer | None = None,
    ) -> None:
        self._model_path = model_path
        self._vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._tokenizer = tokenizer  # None: built on the first structured request
        # The fill overlaps the forward pass: on a CPU engine the cores are busy with the model, so
        # take a few threads only where there are many cores (a GPU engine's host).
        self._num_threads = num_threads or min(4, max(1, (os.cpu_count() or 1) // 4))
        self._executor: llguidance.LLExecutor | None = None
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        self.overlap: bool | None = None  # None: decided from the forward pass's device (_overlaps)
        self.timings = MaskTimings()

    @property
    def tokenizer(self) -> GrammarTokenizer:
        if self._tokenizer is None:
            self._tokenizer = tokenizer_for_model(self._model_path, self._vocab_size, self._eos)
        return self._tokenizer

    def ensure_state(self, seq: Sequence) -> None:
        """Build the sequence's matcher if it has none (replaying its outputs), else catch it up."""
        if seq.grammar is None:
            params = seq.params
            seq.grammar = self.tokenizer.new_state(params.structured_kind, params.structured_spec)
            if params.structured_prefix_tokens:  # a migrated continuation: outputs inside the prompt
                seq.grammar.replay_prefix(seq.prompt_ids[len(seq.prompt_ids) - params.structured_prefix_tokens:])
        seq.grammar.sync(seq.output_ids)

    def start(self, seqs: Seq[Sequence], device: torch.device | None = None) -> MaskJob | None:
        """Sync the structured sequences among ``seqs`` (the rows that sample) and start their mask.

        ``device``: where the forward pass that the fill should overlap runs.
        """
        rows = [row for row, seq in enumerate(seqs) if seq.params.structured_kind is not None]
        if not rows:
            return None
        for row in rows:
            self.ensure_state(seqs[row])
        matchers = [seqs[row].grammar.matcher for row in rows]
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self._num_threads)
        if not self._overlaps(device):
            done: concurrent.futures.Future[TokenMask] = concurrent.futures.Future()
            done.set_result(self._fill(rows, matchers))
            return MaskJob(rows, done)
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        return MaskJob(rows, self._thread.submit(self._fill, rows, matchers))

    def _overlaps(self, device: torch.device | None) -> bool:
        if self.overlap is not None:
            return self.overlap
        # A CPU forward pass keeps every core torch was given busy: a fill beside it oversubscribes
        # them (OpenMP barriers then stall the whole step), so fill first unless cores are spare.
        # Seen on a 16-core host, torch on 16 threads, 16 streams: the fill took 7.3 ms beside the
        # forward pass and 0.9 ms before it (bench/structured.py --engine).
        if device is None or torch.device(device).type != "cpu":
            return True
        return torch.get_num_threads() < (os.cpu_count() or 1)

    def _fill(self, rows: list[int], matchers: list[llguidance.LLMatcher]) -> TokenMask:
        # Imported here: llguidance.torch's module-level torch.compile pulls in torch._dynamo
        # (seconds), which every worker start would pay; only structured requests need it.
        import llguidance.torch as llg_torch

        t0 = time.perf_counter()
        bitmask = torch.full(llg_torch.get_bitmask_shape(len(rows), self.tokenizer.vocab_size), -1, dtype=torch.int32)
        llg_torch.fill_next_token_bitmask_par(self._executor, [(m, i) for i, m in enumerate(matchers)], bitmask)
        self.timings.fill_s += time.perf_counter() - t0
        return TokenMask(rows, bitmask)

    def wait(self, job: MaskJob | None) -> TokenMask | None:
        if job is None:
            return None
        t0 = time.perf_counter()
        mask = job.result()
        self.timings.wait_s += time.perf_counter() - t0
        self.timings.steps += 1
        return mask

    @staticmethod
    def advance(seqs: Seq[Sequence], token_ids: Seq[int]) -> None:
        """Feed each structured sequence the token it just sampled (before the engine appends it)."""
        for seq, token in zip(seqs, token_ids):
            if seq.grammar is not None:
                seq.grammar.consume(token)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
