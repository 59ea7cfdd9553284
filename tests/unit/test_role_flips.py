"""Flip orders: published at once, offered for neither role until acknowledged, re-sent if not."""

from __future__ import annotations

import asyncio

from common.protocol import FlipAck, RoleFlip
from services.scheduler import role_flips
from services.scheduler.registry import Instance, Registry
from services.scheduler.role_flips import RoleFlips


def _registry() -> Registry:
    registry = Registry()
    registry._instances["d0"] = Instance(  # a registered decode worker
        instance_id="d0", identity=b"d0", role="decode", kv_addr="", num_pages=8, page_size=16, model="m",
        max_model_len=64, registered_at=0.0, last_heartbeat=0.0)
    return registry


def test_order_ack_and_resend(monkeypatch) -> None:
    registry = _registry()
    sent: list[RoleFlip] = []
    noted: list[tuple[str, str]] = []

    async def publish(msg: RoleFlip) -> None:
        sent.append(msg)

    flips = RoleFlips(registry, publish, lambda i, r: noted.append((i, r)))

    async def run() -> None:
        assert await flips.order("d0", "prefill", "ttft: over SLO")
        assert not await flips.order("nobody", "prefill", "x") and not await flips.order("d0", "bogus", "x")
        instance = registry.get("d0")
        # Ordered, not acknowledged: the worker's role stays on record, the order is pending.
        assert instance.role == "decode" and instance.pending_role == instance.ordered_role == "prefill"
        assert instance.pending_flip == sent[0].flip_id and sent[0].role == "prefill"
        monkeypatch.setattr(role_flips, "_RESEND_S", -1.0)  # any unacknowledged order is due again
        await flips.resend_unacknowledged()
        assert len(sent) == 2 and sent[1] == sent[0]
        flips.acknowledged(instance, FlipAck(instance_id="d0", flip_id=sent[0].flip_id, role="prefill"))
        assert instance.pending_flip is None
        assert instance.role == "prefill" and instance.pending_role is None and instance.flip_id == sent[0].flip_id
        await flips.resend_unacknowledged()
        assert len(sent) == 2

    asyncio.run(run())
    assert noted == [("d0", "prefill")]
    assert flips.summary()["flips_total"] == 1 and flips.summary()["flips_by_reason"] == {"ttft": 1}


def _flips(registry: Registry) -> tuple[RoleFlips, list[RoleFlip]]:
    sent: list[RoleFlip] = []

    async def publish(msg: RoleFlip) -> None:
        sent.append(msg)

    return RoleFlips(registry, publish, lambda i, r: None), sent


def test_an_order_already_given_is_not_repeated_and_one_back_supersedes_it() -> None:
    registry = _registry()
    flips, sent = _flips(registry)
    instance = registry.get("d0")

    async def run() -> None:
        assert not await flips.order("d0", "decode", "x")  # already its role
        assert await flips.order("d0", "prefill", "x")
        assert not await flips.order("d0", "prefill", "x")  # already ordered: the resend covers a loss
        assert await flips.order("d0", "decode", "x")  # back before the worker answered: a new order
        assert [(m.role, m.flip_id) for m in sent] == [("prefill", 1), ("decode", 2)]
        # The worker answers the first order: its role is on record, the second stays pending.
        flips.acknowledged(instance, FlipAck(instance_id="d0", flip_id=1, role="prefill"))
        assert instance.role == "prefill" and instance.pending_role == "decode" and instance.pending_flip == 2
        flips.acknowledged(instance, FlipAck(instance_id="d0", flip_id=2, role="decode"))
        assert instance.role == "decode" and instance.pending_role is None and instance.flip_id == 2
        # A late ack of the first order cannot turn the clock back.
        flips.acknowledged(instance, FlipAck(instance_id="d0", flip_id=1, role="prefill"))
        assert instance.role == "decode" and instance.flip_id == 2

    asyncio.run(run())


def test_flip_ids_grow_above_what_the_worker_has_seen() -> None:
    # A restarted scheduler numbers from 1, but this worker applied flip 41 of the one before:
    # its ids must keep growing, or it would take a new order for a repeat (and misjudge the
    # decode candidates named by this scheduler).
    registry = _registry()
    registry.get("d0").flip_id = 41
    flips, sent = _flips(registry)
    asyncio.run(flips.order("d0", "prefill", "x"))
    assert sent[0].flip_id == 42 and registry.get("d0").pending_flip == 42


def test_flips_are_counted_by_the_kind_of_reason_not_its_figures():
    assert role_flips.reason_category("TTFT pressure 1.23 (pred 0.3s); decided on predicted TTFT 6276 ms") \
        == "TTFT pressure"
    assert role_flips.reason_category("TPOT pressure 2.00 (tpot_p90/slo 1.5)") == "TPOT pressure"
    assert role_flips.reason_category("no decode worker") == "no decode worker"
    assert role_flips.reason_category("operator") == "operator"
    assert role_flips.reason_category("ttft: queue") == "ttft"
    assert role_flips.reason_category("42") == "other"
