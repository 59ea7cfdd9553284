"""The DP-balance policy (pure functions): when, what and where to move."""

from __future__ import annotations

from services.scheduler.dp_balance import (
    BalanceSettings,
    BalanceState,
    Candidate,
    InstanceLoad,
    plan_migrations,
)

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
