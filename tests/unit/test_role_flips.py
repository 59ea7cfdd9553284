"""Flip orders: published at once, routed as the new role until acknowledged, re-sent if not."""

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
        assert instance.role == "prefill" and instance.pending_flip == sent[0].flip_id
        monkeypatch.setattr(role_flips, "_RESEND_S", -1.0)  # any unacknowledged order is due again
        await flips.resend_unacknowledged()
        assert len(sent) == 2 and sent[1] == sent[0]
        flips.acknowledged(instance, FlipAck(instance_id="d0", flip_id=sent[0].flip_id, role="prefill"))
        assert instance.pending_flip is None
        await flips.resend_unacknowledged()
        assert len(sent) == 2

    asyncio.run(run())
    assert noted == [("d0", "prefill")]
    assert flips.summary()["flips_total"] == 1 and flips.summary()["flips_by_reason"] == {"ttft": 1}
