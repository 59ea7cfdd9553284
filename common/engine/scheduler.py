"""Continuous batching: which sequences run this step and how many tokens each computes.

Every step fills a token budget. Running sequences go first (decodes cost one token; a
sequence in the middle of a chunked prefill gets its next chunk), then waiting sequences are
admitted in priority order (online before offline, FCFS inside a class). Prefill chunks and
decodes share one batch. When the page pool runs dry, the lowest-priority newest running
sequence is preempted by recompute: its pages are freed, the tokens it produced are kept,
and it re-enters the waiting queue to be prefilled again (the prefix cache usually gives
most of its pages back).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from common.engine.block_manager import BlockManager
from common.engine.sequence import Priority, Sequence, SequenceStatus

logger = logging.getLogger(__name__)

__all__ = ["ScheduledSeq", "ScheduledBatch", "BatchScheduler"]


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    # Speculative draft tokens computed after the chunk (a decode row becomes 1 + k query tokens).
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's end, so a token is sampled after it."""
        return self.seq.num_computed + self.num_new_tokens == self.seq.num_tokens


@dataclass
class ScheduledBatch:
    items: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.items)

    def __bool__(self) -> bool:
        return bool(self.items)


class BatchScheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        # The limits are EngineConfig's settings (with their defaults); none are repeated here.
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: dict[Priority, deque[Sequence]] = {p: deque() for p in Priority}
        self.running: list[Sequence] = []
        # Speculative decoding: drafts for a sequence about to decode one token (None: off).
        self.propose_drafts: Callable[[Sequence], list[int]] | None = None

    # ---- queue management -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting[seq.priority].append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drop a sequence wherever it is (abort or finish) and free its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            queue = self.waiting[seq.priority]
            if seq in queue:
                queue.remove(seq)
        self.block_manager.free(seq.seq_id)

    def detach(self, seq: Sequence) -> None:
        """Take a running sequence out of scheduling, keeping its pages (a held sequence)."""
        self.running.remove(seq)

    def attach(self, seq: Sequence) -> None:
        """Put a sequence whose pages are in place (resumed, or KV transferred in) into the
        running set; it computes its uncomputed tokens from the next step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def queued_prefill_tokens(self) -> int:
        """Tokens still to compute before each waiting/running sequence samples its next token,
        not counting the one token a decode step computes anyway."""
        total = 0
        for seq in self.running:
            total += max(0, seq.num_uncomputed - (1 if seq.num_output_tokens else 0))
        for queue in self.waiting.values():
            for seq in queue:
                total += max(0, seq.num_uncomputed - (1 if seq.num_output_tokens else 0))
        return total

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    # ---- the step's plan --------------------------------------------------------------

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        preempted: list[Sequence] = self._make_room_for_online()
        scheduled: set[int] = set()
        online_made_room = bool(preempted)

        # Running sequences, oldest/most important first, so preemption hits the newest.
        self.running.sort(key=Sequence.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed, budget)
            if self.propose_drafts is not None and seq.num_uncomputed == 1 and (
                draft := self.propose_drafts(seq)[: budget - n]
            ) and self.block_manager.ensure_capacity(seq.seq_id, seq.num_computed + n + len(draft)):
                # Drafts ride only on pages that are free now: they never preempt anyone.
                items.append(ScheduledSeq(seq, n, draft))
                scheduled.add(seq.seq_id)
                budget -= n + len(draft)
                i += 1
                continue
            while not self.block_manager.ensure_capacity(seq.seq_id, seq.num_computed + n):
                victim = self._pick_victim(exclude=scheduled)
                if victim is None or victim is seq:
                    break
                self._preempt(victim)
                preempted.append(victim)
            else:
                items.append(ScheduledSeq(seq, n))
                scheduled.add(seq.seq_id)
                budget -= n
                i += 1
                continue
            # Not even this sequence fits: preempt it too.
            self._preempt(seq)
            preempted.append(seq)

        # A step that had to preempt to keep its running sequences going admits nothing new
        # (that would only thrash), unless the preemption was to let online work in.
        if online_made_room or not preempted:
            budget = self._admit_waiting(items, budget)
        return ScheduledBatch(items=items, preempted=preempted)

    def complete_planned(self, planned: list[ScheduledSeq]) -> ScheduledBatch | None:
        """The batch :meth:`schedule` would make now, from one planned before the previous step's
        outputs were known (common.engine.overlap), or None when that is not certain (call
        :meth:`schedule` then).

        ``planned``: one-token decodes of running sequences, in scheduling order, with their pages
        already ensured. The sequences that left the running set since (finished, aborted, held)
        are dropped; a running sequence outside the plan (attached since) voids it. What follows
        is :meth:`schedule`'s own: room for online work, then admission into the budget left.
        """
        running = {seq.seq_id for seq in self.running}
        items = [it for it in planned if it.seq.seq_id in running]
        if len(items) != len(running) or len(items) > self.max_num_batched_tokens:
            return None
        for it in items:
            seq = it.seq
            if it.draft or it.num_new_tokens != seq.num_uncomputed or not self.block_manager.ensure_capacity(
                    seq.seq_id, seq.num_computed + it.num_new_tokens):
                return None
        self.running.sort(key=Sequence.sort_key)  # as schedule() leaves it
        preempted = self._make_room_for_online()
        if preempted:
            gone = {seq.seq_id for seq in preempted}
            items = [it for it in items if it.seq.seq_id not in gone]
        budget = self.max_num_batched_tokens - sum(it.num_new_tokens for it in items)
        # schedule() admits after room was made for online work, or when nothing was preempted.
        self._admit_waiting(items, budget)
        return ScheduledBatch(items=items, preempted=preempted)

    def _admit_waiting(self, items: list[ScheduledSeq], budget: int) -> int:
        for priority in Priority:
            queue = self.waiting[priority]
            while queue and budget > 0 and len(self.running) < self.max_num_seqs:
                seq = queue[0]
                bm = self.block_manager
                # Plan before admitting so a sequence that cannot fit leaves the prefix-cache
                # stats and LRU order untouched (the hit pages may sit among the free ones).
                hit = bm.lookup_prefix(seq.hash_token_ids)
                n = min(seq.num_tokens - hit, budget)
                if bm.pages_needed(seq.seq_id, hit + n) > bm.num_free_pages:
                    return budget
                cached = bm.admit(seq.seq_id, seq.hash_token_ids)
                n = min(seq.num_tokens - cached, budget)
                if not self.block_manager.ensure_capacity(seq.seq_id, cached + n):
                    self.block_manager.free(seq.seq_id)
                    return budget
                queue.popleft()
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt = cached
                seq.num_computed = cached
                seq.status = SequenceStatus.RUNNING
                self.running.append(seq)
                items.append(ScheduledSeq(seq, n))
                budget -= n
        return budget

    def _make_room_for_online(self) -> list[Sequence]:
        """Preempt running offline sequences (newest first) while the online queue's head
        cannot be admitted for want of pages or of a batch slot."""
        queue = self.waiting[Priority.ONLINE]
        if not queue:
            return []
        head, bm = queue[0], self.block_manager
        hit = bm.lookup_prefix(head.hash_token_ids)
        first_chunk = min(head.num_tokens - hit, self.max_num_batched_tokens)
        preempted: list[Sequence] = []
        while (
            len(self.running) >= self.max_num_seqs
            or bm.pages_needed(head.seq_id, hit + first_chunk) > bm.num_free_pages
        ):
            offline = [s for s in self.running if s.priority > head.priority]
            if not offline:
                break
            victim = max(offline, key=Sequence.sort_key)
            self._preempt(victim)
            preempted.append(victim)
        return preempted

    def _pick_victim(self, exclude: set[int]) -> Sequence | None:
        candidates = [s for s in self.running if s.seq_id not in exclude]
        if not candidates:
            return None
        return max(candidates, key=Sequence.sort_key)

    def _preempt(self, seq: Sequence) -> None:
        logger.debug("preempting %s (%d tokens) by recompute", seq.request_id, seq.num_tokens)
        self.running.remove(seq)
        self.block_manager.free(seq.seq_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting[seq.priority].appendleft(seq)
