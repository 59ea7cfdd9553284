"""The DP-balance policy (pure functions): when, what and where to move; and the scheduler's
orders that carry it out (`DpMigrations`, over a real registry and request table)."""

from __future__ import annotations

import asyncio

from common.protocol import MigrateRequest, MigrationResult
from services.scheduler.dp_balance import (
    BalanceSettings,
    BalanceState,
    Candidate,
    InstanceLoad,
    plan_migrations,
)
from services.scheduler.dp_migrations import DpMigrations
from services.scheduler.registry import Registry
from services.scheduler.request_table import RequestTable
from test_registry import heartbeat_msg, register_msg

SETTINGS = BalanceSettings(threshold=4, release_gap=2, max_per_tick=2, cooldown_s=1.0, recent_window_s=10.0,
                           min_age_s=0.5, kv_low_ratio=0.1)


def inst(name: str, running: int, free: int = 900, total: int = 1000, max_seqs: int = 64) -> InstanceLoad:
    return InstanceLoad(name, running, 0, free, total, 16, max_seqs)


def reqs(instance: str, count: int, prompt_len: int = 100, age: float = 5.0, start: int = 0) -> list[Candidate]:
    return [Candidate(f"{instance}-r{start + i}", instance, prompt_len, 50, age) for i in range(count)]


def test_balanced_instances_move_nothing() -> None:
    state = BalanceState()
    assert plan_migrations([inst("a", 5), inst("b", 2)], reqs("a", 5) + reqs("b", 2), SETTINGS, state, 100.0) == []


def test_an_overloaded_instance_sheds_to_the_one_with_room_at_most_m_per_tick() -> None:
    state = BalanceState()
    moves = plan_migrations([inst("a", 8), inst("b", 0), inst("c", 3)], reqs("a", 8) + reqs("c", 3), SETTINGS,
                            state, 100.0)
    assert len(moves) == 2 and all(m.source == "a" and m.target == "b" and m.reason == "running" for m in moves)
    assert len({m.request_id for m in moves}) == 2


def test_cooldown_then_hysteresis_down_to_the_release_gap() -> None:
    state = BalanceState()
    loads = {"a": 7, "b": 0}
    candidates = reqs("a", 7)
    now = 100.0
    plan = plan_migrations([inst("a", 7), inst("b", 0)], candidates, SETTINGS, state, now)
    assert len(plan) == 2
    # The next tick, within the cooldown: nothing (the heartbeats have not shown the moves yet).
    assert plan_migrations([inst("a", 7), inst("b", 0)], candidates, SETTINGS, state, now + 0.5) == []
    for move in plan:
        loads["a"] -= 1
        loads["b"] += 1
    moved = {m.request_id for m in plan}
    remaining = [c for c in candidates if c.request_id not in moved]
    # Gap 7 -> 3 (under the threshold 4, over the release gap 2): the active pair moves on once.
    plan2 = plan_migrations([inst("a", loads["a"]), inst("b", loads["b"])], remaining, SETTINGS, state, now + 1.5)
    assert len(plan2) == 1 and not moved & {m.request_id for m in plan2}
    # Gap 1: done, and a fresh gap of 3 is under the threshold again.
    assert plan_migrations([inst("a", 4), inst("b", 3)], remaining, SETTINGS, state, now + 3.0) == []
    assert plan_migrations([inst("a", 5), inst("b", 2)], remaining, SETTINGS, state, now + 5.0) == []


def test_a_request_is_never_moved_twice_within_the_window() -> None:
    state = BalanceState()
    first = plan_migrations([inst("a", 6), inst("b", 0)], reqs("a", 1), SETTINGS, state, 100.0)
    assert len(first) == 1
    again = Candidate(first[0].request_id, "b", 100, 50, 5.0)
    assert plan_migrations([inst("a", 0), inst("b", 6)], [again], SETTINGS, state, 102.0) == []
    assert len(plan_migrations([inst("a", 0), inst("b", 6)], [again], SETTINGS, state, 111.0)) == 1


def test_prefers_fewest_tokens_then_youngest_and_skips_young_multi_choice_and_moving_ones() -> None:
    state = BalanceState()
    candidates = [
        Candidate("long", "a", 900, 50, 5.0),
        Candidate("short-old", "a", 40, 50, 9.0),
        Candidate("short-young", "a", 40, 50, 2.0),
        Candidate("just-arrived", "a", 10, 50, 0.1),  # may still be prefilling
        Candidate("n2", "a", 10, 50, 5.0, n=2),
        Candidate("moving", "a", 10, 50, 5.0),
    ]
    moves = plan_migrations([inst("a", 9), inst("b", 0)], candidates, SETTINGS, state, 100.0, in_flight={"moving"})
    assert [m.request_id for m in moves] == ["short-young", "short-old"]


def test_no_move_to_a_target_without_pages_or_batch_slots() -> None:
    state = BalanceState()
    assert plan_migrations([inst("a", 9), inst("b", 0, free=5)], reqs("a", 9), SETTINGS, state, 100.0) == []
    assert plan_migrations([inst("a", 9), inst("b", 2, max_seqs=2)], reqs("a", 9), SETTINGS, state, 100.0) == []


def test_kv_page_pressure_moves_even_a_small_count_gap() -> None:
    state = BalanceState()
    moves = plan_migrations([inst("a", 3, free=50), inst("b", 2, free=800)], reqs("a", 3), SETTINGS, state, 100.0)
    assert [m.reason for m in moves] == ["kv_pages"]


def test_settings_problems() -> None:
    assert BalanceSettings().problems() == []
    assert BalanceSettings(threshold=1).problems() and BalanceSettings(max_per_tick=0).problems()


# ---- the scheduler's orders --------------------------------------------------------------------


def _cluster(running: dict[str, int]) -> tuple[Registry, RequestTable, DpMigrations, list]:
    registry = Registry(heartbeat_timeout_s=30.0)
    table = RequestTable(registry)
    for name, count in running.items():
        registry.register(name.encode(), register_msg(name, num_pages=500, role="mixed"))
        registry.heartbeat(name.encode(), heartbeat_msg(name, running=count, free=480, role="mixed",
                                                        total_pages=500))
        for i in range(count):
            table.add(registry.get(name), request_id=f"{name}-r{i}", gateway_identity=b"gw", gateway_id="gw",
                      tokens_addr="ipc:///tmp/t.sock", prompt_len=20 + i, cached_tokens=0, decode_candidates=[],
                      max_tokens=64)
    sent: list = []

    async def send(instance, msg: MigrateRequest) -> None:
        sent.append((instance.instance_id, msg))

    balance = DpMigrations(registry, table, send, SETTINGS, enabled=True, recompute_below_tokens=16)
    return registry, table, balance, sent


def test_orders_go_to_the_source_and_aborts_reach_the_target_meanwhile() -> None:
    registry, table, balance, sent = _cluster({"w0": 6, "w1": 0})
    later = max(e.held_since for e in table.entries()) + 5.0
    moves = asyncio.run(balance.tick(later))
    assert len(moves) == 2 and [s[0] for s in sent] == ["w0", "w0"]
    first = sent[0][1]
    assert first.target_instance == "w1" and first.target_kv_addr == "ipc:///tmp/kv-w1.sock"
    assert first.recompute_below_tokens == 16 and first.request_id == "w0-r0"  # the shortest prompt
    assert table.get("w0-r0").decode_candidates == ["w1"]
    assert asyncio.run(balance.tick(later + 0.1)) == []  # cooldown; and w0-r0 is in flight
    # Past the cooldown the heartbeats still say 6 / 0, but the ordered moves count as made:
    # 4 / 2 is one move from even (a heartbeat-driven balancer would overshoot to 2 / 4).
    assert len(asyncio.run(balance.tick(later + 1.5))) == 1 and len(sent) == 3
    assert asyncio.run(balance.tick(later + 3.0)) == []
    # One lands (the target's RequestHandoff moves the entry), one is refused (it stays).
    table.hand_over(table.get("w0-r0"), "w1")
    balance.on_result(MigrationResult(migration_id=first.migration_id, request_id="w0-r0", from_instance="w0",
                                      to_instance="w1", ok=True, mode="kv", num_tokens=30))
    second = sent[1][1]
    balance.on_result(MigrationResult(migration_id=second.migration_id, request_id=second.request_id,
                                      from_instance="w0", to_instance="w1", ok=False, reason="no pages",
                                      num_tokens=30))
    assert table.get(second.request_id).decode_candidates == [] and table.get(second.request_id).instance_id == "w0"
    assert registry.get("w1").inflight == {"w0-r0"}
    summary = balance.summary()["dp_balance"]
    assert summary["migrations"] == {"running": 1} and summary["outcomes"] == {"kv": 1, "failed": 1}
    assert summary["in_flight"] == 1 and summary["migrations_total"] == 1


def test_disabled_balance_orders_nothing() -> None:
    _, table, balance, sent = _cluster({"w0": 6, "w1": 0})
    balance.enabled = False
    assert asyncio.run(balance.tick(1e9)) == [] and sent == []


def test_an_unanswered_order_is_dropped_after_its_timeout() -> None:
    _, table, balance, sent = _cluster({"w0": 6, "w1": 0})
    balance.answer_timeout_s = 5.0
    later = max(e.held_since for e in table.entries()) + 5.0
    asyncio.run(balance.tick(later))
    moved = [msg.request_id for _, msg in sent]
    assert all(table.get(rid).decode_candidates == ["w1"] for rid in moved)
    asyncio.run(balance.tick(later + 6.0))  # the source never answered (it died, say)
    assert balance.summary()["dp_balance"]["outcomes"]["lost"] == 2
    assert all(table.get(rid).decode_candidates == [] for rid in moved)
