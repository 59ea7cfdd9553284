"""The scheduler's side of DP load balance: run the balancer on a timer and track its orders.

Every `interval_s` the live, ready, decode-capable instances (mixed or decode role, no flip
pending) and the requests the table places on them go to `dp_balance.plan_migrations`; each move
becomes a MigrateRequest to the source worker. Until its MigrationResult arrives the target is
also listed as a holder of the request (`entry.decode_candidates`), so an abort meanwhile reaches
wherever the sequence is; the target's RequestHandoff moves the table entry. An order that gets
no answer within `answer_timeout_s` (the source died: its requests fail over anyway) is dropped.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from common.protocol import MigrateRequest, MigrationResult
from services.scheduler.dp_balance import (
    BalanceSettings,
    BalanceState,
    Candidate,
    InstanceLoad,
    Migration,
    plan_migrations,
)
from services.scheduler.registry import Instance, Registry
from services.scheduler.request_table import RequestTable

__all__ = ["DpMigrations"]

logger = logging.getLogger(__name__)

SendTo = Callable[[Instance, MigrateRequest], Awaitable[None]]


@dataclass
class _Order:
    migration: Migration
    sent_at: float


class DpMigrations:
    def __init__(self, registry: Registry, requests: RequestTable, send: SendTo, settings: BalanceSettings,
                 *, enabled: bool, recompute_below_tokens: int, answer_timeout_s: float = 60.0) -> None:
        self.registry = registry
        self.requests = requests
        self.send = send
        self.settings = settings
        self.enabled = enabled
        self.recompute_below_tokens = recompute_below_tokens
        self.answer_timeout_s = answer_timeout_s
        self.state = BalanceState()
        self._orders: dict[int, _Order] = {}
        self._next_id = 1
        self.ordered: Counter[str] = Counter()  # by reason
        self.completed: Counter[str] = Counter()  # by reason
        self.outcomes: Counter[str] = Counter()  # kv, recompute, declined, failed, lost

    def summary(self) -> dict:
        return {"dp_balance": {
            "enabled": self.enabled,
            "in_flight": len(self._orders),
            "ordered": dict(self.ordered),
            "migrations": dict(self.completed),  # completed moves by reason (xllm_dp_migrations_total)
            "outcomes": dict(self.outcomes),
            "migrations_total": sum(self.completed.values()),
        }}

    async def tick(self, now: float | None = None) -> list[Migration]:
        """Plan and order this tick's moves."""
        if not self.enabled:
            return []
        now = time.monotonic() if now is None else now
        self._expire(now)
        instances = [i for i in self.registry.instances()
                     if i.alive and (i.offers("decode") or i.offers("mixed"))]
        # Sequences held: the request table's count, which follows each move at once (a heartbeat
        # is up to an interval old and would show a landed move still on its source), with the
        # moves ordered and not answered yet counted where they are going.
        held = {i.instance_id: len(i.inflight) for i in instances}
        for order in self._orders.values():
            move = order.migration
            entry = self.requests.get(move.request_id)
            if entry is not None and entry.instance_id == move.source and move.source in held and move.target in held:
                held[move.source] -= 1
                held[move.target] += 1
        loads = [InstanceLoad(i.instance_id, max(0, held[i.instance_id]), 0, i.free_pages, i.total_pages, i.page_size,
                              i.max_num_seqs) for i in instances]
        ids = {i.instance_id for i in instances}
        candidates = [Candidate(e.request_id, e.instance_id, e.prompt_len, e.max_tokens, now - e.held_since, e.n)
                      for e in self.requests.entries() if e.instance_id in ids and not e.decode_candidates]
        in_flight = {order.migration.request_id for order in self._orders.values()}
        moves = plan_migrations(loads, candidates, self.settings, self.state, now, in_flight)
        by_id = {i.instance_id: i for i in instances}
        for move in moves:
            await self._order(move, by_id[move.source], by_id[move.target], now)
        return moves

    async def _order(self, move: Migration, source: Instance, target: Instance, now: float) -> None:
        entry = self.requests.get(move.request_id)
        if entry is None:
            return
        migration_id, self._next_id = self._next_id, self._next_id + 1
        self._orders[migration_id] = _Order(move, now)
        entry.decode_candidates = [target.instance_id]  # aborts reach it while the sequence moves
        self.ordered[move.reason] += 1
        logger.info("dp balance: moving %s from %s to %s (%s)", move.request_id, move.source, move.target,
                    move.reason)
        await self.send(source, MigrateRequest(
            migration_id=migration_id, request_id=move.request_id, target_instance=target.instance_id,
            target_kv_addr=target.kv_addr, target_flip_id=target.flip_id,
            recompute_below_tokens=self.recompute_below_tokens,
        ))

    def on_result(self, msg: MigrationResult) -> None:
        order = self._orders.pop(msg.migration_id, None)
        if order is None or order.migration.request_id != msg.request_id:
            return
        entry = self.requests.get(msg.request_id)
        if msg.ok:
            self.completed[order.migration.reason] += 1
            self.outcomes[msg.mode or "kv"] += 1
        else:
            self.outcomes["failed" if msg.num_tokens else "declined"] += 1
            if entry is not None and entry.instance_id == msg.from_instance:
                entry.decode_candidates = []  # it stays where it was
            logger.info("dp balance: %s stays on %s: %s", msg.request_id, msg.from_instance, msg.reason)

    def _expire(self, now: float) -> None:
        for migration_id, order in list(self._orders.items()):
            if now - order.sent_at > self.answer_timeout_s:
                del self._orders[migration_id]
                self.outcomes["lost"] += 1
                entry = self.requests.get(order.migration.request_id)
                if entry is not None and entry.instance_id == order.migration.source:
                    entry.decode_candidates = []
