"""A worker's role bookkeeping: flips are idempotent per id and flip latency is measured."""

from __future__ import annotations

import pytest

from services.worker.role_state import RoleState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_flip_latency_runs_from_the_flip_to_the_first_work_of_the_new_role() -> None:
    clock = Clock()
    roles = RoleState("decode", clock)
    assert roles.flip("prefill", 1)
    assert roles.role == "prefill" and roles.settling and roles.stats()["flipping"]
    clock.now += 0.25
    roles.started("decode")  # old-role work finishing does not count
    assert roles.settling
    clock.now += 0.5
    roles.started("prefill")
    assert not roles.settling
    assert roles.last_flip_latency_s == pytest.approx(0.75)
    assert roles.stats()["flips_total"] == 1


def test_repeated_flip_orders_are_applied_once() -> None:
    roles = RoleState("prefill", Clock())
    assert roles.flip("decode", 7)
    assert not roles.flip("decode", 7)  # the scheduler re-sent an unacknowledged order
    assert roles.flips_total == 1
    assert roles.flip("decode", 8) and roles.flips_total == 1  # same role: nothing changes


def test_roles_take_decode_work_only_in_decode_or_mixed() -> None:
    assert RoleState("decode").takes_decode_work()
    assert RoleState("mixed").takes_decode_work()
    assert not RoleState("prefill").takes_decode_work()
    with pytest.raises(ValueError):
        RoleState("encoder")
    with pytest.raises(ValueError):
        RoleState("mixed").flip("bogus", 1)


def test_a_flip_with_no_new_work_stops_settling_after_a_limit() -> None:
    clock = Clock()
    roles = RoleState("decode", clock)
    roles.flip("prefill", 1)
    clock.now += 29.0
    assert roles.settling
    clock.now += 2.0
    assert not roles.settling and roles.last_flip_latency_s < 0


def test_what_was_named_before_the_latest_flip_is_told_apart() -> None:
    roles = RoleState("decode", Clock())
    assert not roles.named_before_latest_flip(0)  # no flip yet: nothing predates one
    roles.flip("prefill", 4)
    assert roles.named_before_latest_flip(0) and roles.named_before_latest_flip(3)
    assert not roles.named_before_latest_flip(4) and not roles.named_before_latest_flip(None)
