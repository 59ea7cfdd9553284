"""The engine's side of beam search: a request's beams as sequences sharing KV pages.

A beam request starts as one sequence (its prompt). Every step each live beam computes its next
token's log-probabilities and is *parked* (out of the running set, pages kept) until all its
siblings have theirs; then :class:`~common.engine.beam_search.BeamSearch` picks the next beams and
the pages follow: a parent picked once takes the token itself, one picked k times is forked k-1
times (``BlockManager.fork``: every full page shared by reference count, the partly filled last
page copied in the pool), one not picked is freed at once. The new beams rejoin the running set.

Beams normally all run in the same step, so parking lasts no longer than the step. A beam the
scheduler preempted (or a fork that found no page for its copy) goes through the waiting queue
and recomputes; its siblings wait parked. If nothing can run while beams are parked, the engine
calls :meth:`BeamGroups.release_parked`, which frees their pages (their log-probs are kept, they
recompute later), so parked pages never starve the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from common.engine.beam_search import BeamHypothesis, BeamSearch
from common.engine.block_manager import BlockManager, NoFreePagesError
from common.engine.scheduler import BatchScheduler
from common.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

__all__ = ["BeamGroup", "BeamGroups"]


@dataclass(eq=False)
class BeamGroup:
    request_id: str
    search: BeamSearch
    live: list[Sequence]  # aligned with search.scores; the engine's request entry is this list
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> this step's log-probs
    results: list[BeamHypothesis] | None = None  # set once the search is over

    @property
    def ready(self) -> bool:
        return len(self.pending) == len(self.live)


class BeamGroups:
    """Every beam request of one engine."""

    def __init__(self, scheduler: BatchScheduler, block_manager: BlockManager, kv_caches: list[torch.Tensor],
                 eos_token_ids: set[int]) -> None:
        self.scheduler = scheduler
        self.block_manager = block_manager
        self.kv_caches = kv_caches
        self.eos_token_ids = set(eos_token_ids)
        self._groups: dict[str, BeamGroup] = {}
        self.num_forks = 0
        self.num_page_copies = 0

    def start(self, seq: Sequence) -> BeamGroup:
        """Track a new beam request whose first sequence (the prompt) is queued."""
        params = seq.params
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        search = BeamSearch(params.n, seq.max_tokens, stops, params.length_penalty, params.early_stopping,
                            params.min_tokens)
        group = BeamGroup(seq.request_id, search, [seq])
        self._groups[seq.request_id] = group
        return group

    def forget(self, request_id: str) -> None:
        self._groups.pop(request_id, None)

    def collect(self, seq: Sequence, logprobs: torch.Tensor) -> None:
        """A beam computed its next-token log-probabilities: park it until its siblings have theirs."""
        self._groups[seq.request_id].pending[seq.seq_id] = logprobs
        self.scheduler.detach(seq)
        seq.status = SequenceStatus.HELD

    def advance(self) -> list[BeamGroup]:
        """Step every group whose beams are all in; returns the groups that finished."""
        finished = []
        for group in [g for g in self._groups.values() if g.pending and g.ready]:
            if self._step(group):
                del self._groups[group.request_id]
                finished.append(group)
        return finished

    def release_parked(self) -> bool:
        """Free the pages of every parked beam (they recompute when picked); whether any were held."""
        released = False
        for group in self._groups.values():
            for seq in group.live:
                if seq.seq_id in group.pending and seq.seq_id in self.block_manager:
                    self.block_manager.free(seq.seq_id)
                    seq.num_computed = 0
                    seq.num_preemptions += 1
                    released = True
        if released:
            logger.info("freed the pages of parked beams to let waiting sequences in")
        return released

    # ---- one step of one group ------------------------------------------------------------

    def _step(self, group: BeamGroup) -> bool:
        parents = group.live
        rows = torch.stack([group.pending.pop(seq.seq_id) for seq in parents])
        chosen = group.search.select(rows, [seq.output_ids for seq in parents])
        if group.search.done:
            group.results = group.search.results([parents[p].output_ids + [token] for p, token in chosen])
            for seq in parents:
                self._drop(seq, "stop")
            return True
        picks: dict[int, list[int]] = {}  # parent index -> ranks that continue it
        for rank, (parent, _) in enumerate(chosen):
            picks.setdefault(parent, []).append(rank)
        beams: list[Sequence | None] = [None] * len(chosen)
        for index, parent in enumerate(parents):
            ranks = picks.get(index)
            if ranks is None:
                self._drop(parent, "beam_pruned")
                continue
            for rank in ranks[1:]:  # fork before the parent takes its own token
                beams[rank] = self._fork(parent, chosen[rank][1])
            parent.token_ids.append(chosen[ranks[0]][1])
            beams[ranks[0]] = parent
        group.live[:] = [seq for seq in beams if seq is not None]
        for seq in group.live:
            if seq.seq_id in self.block_manager:
                self.scheduler.attach(seq)
            else:
                seq.num_computed = 0
                self.scheduler.add(seq)
        return False

    def _fork(self, parent: Sequence, token: int) -> Sequence:
        child = Sequence(
            request_id=parent.request_id, prompt_ids=parent.prompt_ids, params=parent.params,
            max_tokens=parent.max_tokens, index=parent.index, priority=parent.priority,
            arrival_time=parent.arrival_time,
        )
        child.token_ids = list(parent.token_ids) + [token]
        child.num_cached_prompt = parent.num_cached_prompt
        child.num_preemptions = parent.num_preemptions
        child.first_token_time = parent.first_token_time
        self.num_forks += 1
        if parent.seq_id not in self.block_manager:
            return child  # the parent's pages were released: the child recomputes
        try:
            copy = self.block_manager.fork(parent.seq_id, child.seq_id)
        except NoFreePagesError:
            child.num_preemptions += 1  # no page for the copy-on-write: recompute instead
            return child
        child.num_computed = parent.num_computed
        if copy is not None:
            source, destination = copy
            for cache in self.kv_caches:  # [2, kv_heads, pages, page_size, head_dim]
                cache[:, :, destination].copy_(cache[:, :, source])
            self.num_page_copies += 1
        return child

    def _drop(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)  # frees its pages at once
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
