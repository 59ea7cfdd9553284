"""Overlap scheduling: plan and lay out step N+1 while step N computes.

A serial step is schedule -> build inputs -> forward + sample -> postprocess. With the pipeline,
:meth:`OverlapPipeline.run` hands the planning of step N+1 to a helper thread while the engine
thread runs step N's forward pass and sampling (the torch work stays on one thread: see run()).
The plan assumes every sequence of step N that samples advances by one token: it ensures each
one's page for that token and lays out the next batch (positions, page tables, attention
metadata) without its token ids, which only step N decides. The helper mostly runs Python, so it
needs the GIL while the forward pass does not: torch ops and the C++ kernels release it.
When the next :meth:`LLMEngine.step` comes, :meth:`OverlapPipeline.take_planned` completes the plan
with what happened meanwhile (:meth:`BatchScheduler.complete_planned`: sequences that finished,
were aborted or held are dropped; waiting ones are admitted as ``schedule()`` would) and, when the
batch is still the one laid out, only the token ids are filled in before it launches.

Nothing is in flight between two ``step()`` calls: the engine's other entry points (abort, add,
the P/D hand-off, the KV store hooks) find it as settled as the serial engine leaves it; a plan's
only side effect is the page each planned sequence gets for its next token, which the serial
``schedule()`` would take anyway (a dropped sequence's pages go back when it ends).

Token-for-token equal to the serial engine: a batch is only ever run when it has exactly the
rows ``schedule()`` would have given (the small-batch int8 GEMMs and the bf16 prompt path make
a row's numbers depend on its batch), the token ids are the sampled ones, and the sampler's rows
(penalties, seeds, grammar masks) are built at launch from the sequences' state after step N.

Planning ahead is skipped (that step runs serially) when the next batch cannot be known before
step N's tokens are: speculative decoding (drafts are proposed from the last token), beam
search (beams fork and park on their scores), multimodal sequences (M-RoPE positions), a
sequence parked after prefill for a P/D hand-off, and any step that is not a pure decode of the
whole running set (a chunked prefill's next chunk depends on the budget left). Structured
outputs do overlap: their grammar masks are started at launch, from the tokens known then.

Whether it pays is measured (README, "Overlap scheduling"): on a CPU the helper takes a core from
the forward pass unless one is spare, so ``auto`` leaves it off there (see resolve_min_batch).
"""

from __future__ import annotations

import ctypes
import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from common.engine.block_manager import BlockManager
from common.engine.config import OVERLAP_MODES
from common.engine.runner import ModelRunner, StepInputs
from common.engine.sampler import SamplerOutput
from common.engine.scheduler import BatchScheduler, ScheduledBatch, ScheduledSeq

logger = logging.getLogger(__name__)

__all__ = ["OverlapPipeline", "resolve_min_batch"]


class OverlapPipeline:
    """Plans each step's successor on a helper thread while the engine thread computes the step."""

    def __init__(
        self,
        scheduler: BatchScheduler,
        runner: ModelRunner,
        block_manager: BlockManager,
        max_model_len: int,
        min_batch: int = 1,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        # Plan ahead only for decode batches of at least this many rows (smaller ones run serially).
        self.min_batch = min_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-plan",
                                            initializer=_single_threaded_torch)
        self._planned: list[ScheduledSeq] | None = None
        self._inputs: StepInputs | None = None  # the planned batch laid out
        # Counters (load_stats): steps that planned the next one beside their compute, steps
        # launched from inputs laid out that way, and steps whose plan held but whose rows changed
        # (a sequence ended or was admitted: laid out again before launch).
        self.steps_planning = 0
        self.steps_from_plan = 0
        self.steps_relaid = 0

    def take_planned(self) -> ScheduledBatch | None:
        """The batch planned during the previous step, completed with what happened since; None
        when there is no plan or it no longer holds (then schedule serially)."""
        planned, self._planned = self._planned, None
        batch = self.scheduler.complete_planned(planned) if planned is not None else None
        if not batch:
            self._inputs = None  # void (or nothing left to run): schedule() decides
            return None
        return batch

    def run(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Run the batch's forward pass and sampling; meanwhile plan and lay out the next one."""
        inputs, self._inputs = self._inputs, None
        if inputs is not None and _same_rows(inputs.items, batch.items):
            self.steps_from_plan += 1
        else:  # no plan, or rows were dropped or admitted since: lay the batch out now
            self.steps_relaid += inputs is not None
            inputs = self.runner.prepare(batch.items)
        self.runner.launch(inputs)
        if len(batch.items) < self.min_batch:
            return self.runner.execute(inputs)
        self.steps_planning += 1
        # The forward pass stays on this thread and the plan goes to the helper: a second thread
        # running torch ops would start a second OpenMP team, and with more OpenMP threads than
        # cores libgomp stops spinning between parallel regions, so every region pays a wake-up
        # (measured on 2 cores: a 1-row decode step went from 6.4 to 15 ms, on either thread).
        future = self._executor.submit(self._plan_ahead, batch)
        try:
            sampled = self.runner.execute(inputs)
        finally:
            # Whatever happened here, the plan is over before anything else runs.
            planned = future.result()
        if planned is not None:
            self._planned, self._inputs = planned
        return sampled

    def _plan_ahead(self, batch: ScheduledBatch) -> tuple[list[ScheduledSeq], StepInputs] | None:
        """Step N+1 as schedule() will make it if every sequence of ``batch`` that samples takes
        one token, laid out; None when that cannot be known now."""
        scheduler = self.scheduler
        if scheduler.propose_drafts is not None:
            return None  # drafts come from the last token
        in_batch = {item.seq.seq_id: item for item in batch.items}
        if len(in_batch) != len(scheduler.running):
            return None  # a running sequence is not in this step (out of budget): no pure decode
        planned: list[ScheduledSeq] = []
        for seq in sorted(scheduler.running, key=lambda s: s.sort_key()):
            item = in_batch.get(seq.seq_id)
            if item is None or not item.samples or item.draft:
                return None  # mid-prefill: its next chunk takes what budget is left
            if seq.params.use_beam_search or seq.mm is not None or seq.hold_after_prefill:
                return None
            # One more token ends it by length (known now, unlike a stop token): leave it out so the
            # plan needs no change when it ends.
            if seq.num_output_tokens + 1 >= seq.max_tokens or seq.num_tokens + 1 >= self.max_model_len:
                continue
            planned.append(ScheduledSeq(seq, 1))
        if not planned or len(planned) > scheduler.max_num_batched_tokens:
            return None
        bm = self.block_manager
        if sum(bm.pages_needed(it.seq.seq_id, it.seq.num_tokens + 1) for it in planned) > bm.num_blank_pages:
            return None  # it would evict cached pages, whose hooks (KV offload, events) run on the engine thread
        for item in planned:
            # The slot of the token being sampled now (the serial schedule() takes the same page).
            if not self.block_manager.ensure_capacity(item.seq.seq_id, item.seq.num_tokens + 1):
                return None  # the pool is short: the serial schedule decides who is preempted
        return planned, self.runner.prepare(planned, ahead=True)

    def stats(self) -> dict[str, int]:
        return {"overlap_planning_steps": self.steps_planning, "overlap_steps_from_plan": self.steps_from_plan,
                "overlap_relaid_steps": self.steps_relaid}

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def _same_rows(a: list[ScheduledSeq], b: list[ScheduledSeq]) -> bool:
    return len(a) == len(b) and all(x.seq is y.seq and x.num_new_tokens == y.num_new_tokens and x.draft == y.draft
                                    for x, y in zip(a, b))


def _single_threaded_torch() -> None:
    """Keep the planning thread's torch ops (building the next step's tensors) out of OpenMP: a
    parallel region there would start a second OpenMP team beside the engine thread's (see run())."""
    torch.get_num_threads()  # torch sets a new thread's OpenMP thread count on its first query
    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(1)  # this thread only (torch's setter is global)
    except (OSError, AttributeError):
        logger.debug("no libgomp: the planning thread keeps torch's thread count")


def resolve_min_batch(mode: str, device: str, min_batch: int) -> int | None:
    """The smallest batch that plans the next step beside its forward pass; None: the pipeline is off."""
    if mode not in OVERLAP_MODES:
        raise ValueError(f"overlap_schedule must be one of {list(OVERLAP_MODES)}, got {mode!r}")
    if min_batch < 1:
        raise ValueError(f"overlap_min_batch must be >= 1, got {min_batch}")
    if mode == "off":
        return None
    if mode == "on":
        return min_batch
    if torch.device(device).type == "cpu":
        # Measured (README, "Overlap scheduling"): when torch's threads have every core, planning
        # beside the forward pass only takes cores from it (1-3 % slower at 1 row, no gain at 16-64
        # rows); it pays (2-5 % at 64 rows) only with a core to spare: `--overlap-schedule on`.
        return None
    # The forward pass runs on the device and the host waits for it: plan beside every step.
    return 1
