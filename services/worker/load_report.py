"""What a worker tells the scheduler about itself: Register until accepted, then Heartbeats.

A heartbeat is built from a snapshot of the engine's load (taken on the engine thread: it reads
the engine's tables) plus the worker's own counters. Every value the scheduler routes, flips or
indexes on goes into a typed Heartbeat field; the whole snapshot also travels as the free-form
`stats` dict, for the status page and /metrics only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from common.gateway_push import GatewayPushers
from common.protocol import BackendMessage, Heartbeat, Register, RegisterAck
from services.decode.kv_receiver import KvReceiver
from services.prefill.kv_sender import KvSender
from services.worker.engine_api import WorkerEngine
from services.worker.kv_tiering import KvTiering
from services.worker.request_book import RequestBook
from services.worker.role_state import RoleState

__all__ = ["LoadReport", "Reporter"]

logger = logging.getLogger(__name__)

RunOnEngine = Callable[..., Awaitable[Any]]
SendBackend = Callable[[BackendMessage], Awaitable[None]]


def _int(stats: dict[str, Any], key: str) -> int:
    value = stats.get(key, 0)
    return int(value) if isinstance(value, (int, float)) else 0


class Reporter(Protocol):
    """What a load report reads of the worker it describes (at report time)."""

    instance_id: str
    incarnation: str
    kv_addr: str
    draining: bool
    integrity_failures: int
    audited_at_step: int
    engine: WorkerEngine
    roles: RoleState
    book: RequestBook
    pushers: GatewayPushers
    sender: KvSender
    receiver: KvReceiver
    tiering: KvTiering

    @property
    def role(self) -> str: ...


class LoadReport:
    def __init__(self, worker: Reporter, run_on_engine: RunOnEngine, send_backend: SendBackend) -> None:
        self.worker = worker  # read only: its identity, state and counters
        self.run_on_engine = run_on_engine
        self.send_backend = send_backend
        self.registered = False
        self.stats: dict[str, Any] = {}
        self._taken_at = 0.0  # monotonic time of the last snapshot

    def prime(self) -> None:
        """A first snapshot, before the engine thread has work (called once, on connect)."""
        self.stats = dict(self.worker.engine.load_stats())

    def older_than(self, age_s: float) -> bool:
        return time.monotonic() - self._taken_at >= age_s

    async def refresh(self) -> None:
        """Snapshot the engine's load on the engine thread, with the worker's counters."""
        worker = self.worker
        stats = dict(await self.run_on_engine(worker.engine.load_stats))
        stats.update(
            max_num_seqs=int(worker.engine.config.max_num_seqs or 0),
            pid=os.getpid(),
            draining=worker.draining,
            requests=len(worker.book.requests),
            requests_total=worker.book.total,
            dropped_messages=worker.pushers.dropped,
            integrity_failures=worker.integrity_failures,
            audited_at_step=worker.audited_at_step,
            **worker.roles.stats(),
            **worker.sender.stats(),
            **worker.receiver.stats(),
            **worker.book.migrations.stats(),
            **worker.tiering.stats(),
        )
        self.stats = stats
        self._taken_at = time.monotonic()

    def register_message(self) -> Register:
        worker, engine = self.worker, self.worker.engine
        return Register(
            instance_id=worker.instance_id, role=worker.role, kv_addr=worker.kv_addr, num_pages=int(engine.num_pages),
            page_size=int(engine.page_size), model=str(engine.model_path), max_model_len=int(engine.max_model_len),
            flip_id=worker.roles.last_flip_id, incarnation=worker.incarnation, pid=os.getpid(),
        )

    def heartbeat_message(self) -> Heartbeat:
        worker, stats = self.worker, self.stats
        prefix = stats.get("prefix_cache") or {}
        return Heartbeat(
            instance_id=worker.instance_id, role=worker.role,
            waiting=_int(stats, "waiting"), running=_int(stats, "running"),
            free_pages=_int(stats, "free_pages"), total_pages=_int(stats, "num_pages"),
            used_pages=_int(stats, "used_pages"), prefix_hit_rate=float(prefix.get("prefix_hit_rate", 0.0)),
            queued_prefill_tokens=_int(stats, "queued_prefill_tokens"), max_num_seqs=_int(stats, "max_num_seqs"),
            # The worker's own state, as of now (the snapshot may be half an interval old).
            draining=worker.draining, flipping=worker.roles.settling,
            kv_namespace=str(worker.engine.kv_namespace),
            prompt_tokens_total=_int(stats, "prompt_tokens_total"),
            generated_tokens_total=_int(stats, "generated_tokens_total"),
            stats=stats, flip_id=worker.roles.last_flip_id, incarnation=worker.incarnation,
        )

    async def beat(self) -> None:
        """One heartbeat period: until acknowledged keep registering (the scheduler may start
        after us, or restart), then report the load."""
        await self.send_backend(self.heartbeat_message() if self.registered else self.register_message())

    async def on_register_ack(self, msg: RegisterAck) -> None:
        if msg.accepted and not self.registered:
            logger.info("worker %s registered", self.worker.instance_id)
            # Report the load at once: the registry has no stats for us until then.
            self.registered = True
            await self.send_backend(self.heartbeat_message())
        elif not msg.accepted:
            logger.info("scheduler did not accept %s (%s): registering again", self.worker.instance_id, msg.reason)
            await self.send_backend(self.register_message())
        self.registered = msg.accepted
