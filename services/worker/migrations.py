"""The source side of a DP-balance migration: move one running decode sequence to another worker.

The scheduler's balancer (services/scheduler/dp_balance.py) sends a MigrateRequest; between two
engine steps the sequence is parked exactly like a prefilled one waiting for its P/D hand-off
(`handoff.hold_running`: every token it sampled is already streamed, the last one not computed
yet) and handed to the named target by the same `KvSender` the P/D path uses: its KV over the
target's kv socket, or, when it holds fewer tokens than the scheduler's recompute threshold,
only its state, for the target to prefill prompt + outputs again. The target then streams the
next tokens to the owning gateway and tells the scheduler it holds the request (RequestHandoff),
so aborts follow it. If the target refuses, fails or goes silent the sequence resumes here
where it stopped: no token is lost or sent twice, either way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from common.protocol import BackendMessage, DecodeCandidate, MigrateRequest, MigrationResult
from services.prefill.kv_sender import HandoffRequest
from services.worker.request_state import RequestState

__all__ = ["Migrations"]

logger = logging.getLogger(__name__)

RunOnEngine = Callable[..., Awaitable[Any]]
SendBackend = Callable[[BackendMessage], Awaitable[None]]


class _Book(Protocol):
    """What a migration uses of the request book (and, through it, the worker)."""

    worker: Any
    requests: dict[str, RequestState]
    load_dropped: bool
    wake: Callable[[], None]


class Migrations:
    def __init__(self, book: _Book, run_on_engine: RunOnEngine, send_backend: SendBackend) -> None:
        self.book = book
        self.run_on_engine = run_on_engine
        self.send_backend = send_backend
        self._tasks: set[asyncio.Task] = set()
        self.outcomes: Counter[str] = Counter()  # moved_kv, moved_recompute, declined, failed

    def stats(self) -> dict[str, int]:
        return {f"dp_migrations_{outcome}": self.outcomes[outcome]
                for outcome in ("moved_kv", "moved_recompute", "declined", "failed")}

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def start(self, msg: MigrateRequest) -> None:
        """Park the sequence (between steps) and move it in the background; answer at once when
        it cannot move."""
        worker = self.book.worker
        state = self.book.requests.get(msg.request_id)
        if state is None:
            await self._answer(msg, False, reason="not running here")
            return
        if state.handoff is not None or state.sampling is None or state.n != 1:
            await self._answer(msg, False, reason="not a single decoding sequence")
            return
        try:
            num_tokens = await self.run_on_engine(worker.engine.handoff.hold_running, msg.request_id)
        except ValueError as exc:
            await self._answer(msg, False, reason=str(exc))
            return
        handoff = HandoffRequest(
            request_id=msg.request_id, sampling=state.sampling, priority=state.priority,
            tokens_addr=state.tokens_addr, arrival_time=state.arrival_time,
            candidates=[DecodeCandidate(instance_id=msg.target_instance, kv_addr=msg.target_kv_addr,
                                        flip_id=msg.target_flip_id)],
            migration=True, recompute=num_tokens < msg.recompute_below_tokens,
        )
        state.handoff = handoff
        task = asyncio.create_task(self._move(msg, state, handoff, num_tokens), name=f"migrate {msg.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _move(self, msg: MigrateRequest, state: RequestState, handoff: HandoffRequest, num_tokens: int) -> None:
        book = self.book
        mode = "recompute" if handoff.recompute else "kv"
        taker = await book.worker.sender.hand_off(handoff)
        if taker is not None:
            # The target owns it now and says so to the scheduler (RequestHandoff).
            book.requests.pop(msg.request_id, None)
            book.load_dropped = True
            logger.info("migrated %s to %s (%s, %d tokens)", msg.request_id, taker, mode, num_tokens)
        else:
            state.handoff = None  # resumed here (or aborted meanwhile): decoding goes on as before
        book.wake()
        await self._answer(msg, taker is not None, mode=mode if taker is not None else "",
                           reason="" if taker is not None else "the target did not take it; resumed here",
                           num_tokens=num_tokens)

    async def _answer(self, msg: MigrateRequest, ok: bool, *, mode: str = "", reason: str = "",
                      num_tokens: int = 0) -> None:
        self.outcomes[f"moved_{mode}" if ok else ("failed" if num_tokens else "declined")] += 1
        if not ok:
            logger.info("did not migrate %s to %s: %s", msg.request_id, msg.target_instance, reason)
        await self.send_backend(MigrationResult(
            migration_id=msg.migration_id, request_id=msg.request_id, from_instance=self.book.worker.instance_id,
            to_instance=msg.target_instance, ok=ok, mode=mode, reason=reason, num_tokens=num_tokens,
        ))
