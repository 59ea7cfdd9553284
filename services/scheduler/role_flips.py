"""Ordering role flips and keeping them until the worker confirms.

A flip goes out on the control PUB (topic = the instance id). PUB may drop a message, so an
order the worker has not acknowledged is published again every few seconds (the worker applies
an order id once). Until the FlipAck arrives the registry keeps the ordered role, so a heartbeat
the worker sent before it saw the order cannot undo the flip.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from common.protocol import FlipAck, RoleFlip
from services.scheduler.registry import Instance, Registry

__all__ = ["RoleFlips", "FLIP_ROLES"]

logger = logging.getLogger(__name__)

FLIP_ROLES = ("prefill", "decode", "mixed")
# An unacknowledged flip order is published again after this long.
_RESEND_S = 2.0

Publish = Callable[[RoleFlip], Awaitable[None]]


class RoleFlips:
    def __init__(self, registry: Registry, publish: Publish, on_flip: Callable[[str, str], None]) -> None:
        self.registry = registry
        self.publish = publish
        self.on_flip = on_flip  # (instance id, role): tells the PD policy its order went out
        self._ids = itertools.count(1)
        self._sent_at: dict[str, float] = {}
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.recent: deque[dict] = deque(maxlen=8)

    async def order(self, instance_id: str, role: str, reason: str) -> bool:
        """Order an instance into `role`; False when it cannot be done (or nothing changes)."""
        instance = self.registry.get(instance_id)
        if instance is None or role not in FLIP_ROLES:
            logger.warning("cannot flip %s to %r: %s", instance_id, role,
                           "unknown instance" if instance is None else "unknown role")
            return False
        if instance.role == role and instance.pending_flip is None:
            return False
        flip_id = next(self._ids)
        old = instance.role
        # Route as the new role at once: the worker takes what it is sent whatever its role.
        instance.role, instance.pending_flip = role, flip_id
        await self._send(instance)
        self.on_flip(instance_id, role)
        self.total += 1
        self.by_reason[reason.split(":")[0]] += 1
        self.recent.append({"flip_id": flip_id, "instance": instance_id, "from": old, "to": role,
                            "reason": reason, "at": time.time()})
        logger.info("flip %d: %s %s -> %s (%s)", flip_id, instance_id, old, role, reason)
        return True

    def acknowledged(self, instance: Instance, ack: FlipAck) -> None:
        if instance.pending_flip == ack.flip_id:
            instance.pending_flip = None
            instance.role = ack.role

    async def resend_unacknowledged(self) -> None:
        now = time.monotonic()
        for instance in self.registry.instances():
            sent = self._sent_at.get(instance.instance_id)
            if instance.pending_flip is not None and sent is not None and now - sent > _RESEND_S:
                await self._send(instance)

    async def _send(self, instance: Instance) -> None:
        self._sent_at[instance.instance_id] = time.monotonic()
        await self.publish(RoleFlip(instance_id=instance.instance_id, role=instance.role,
                                    flip_id=instance.pending_flip))

    def summary(self) -> dict:
        return {"flips_total": self.total, "flips_by_reason": dict(self.by_reason), "recent_flips": list(self.recent)}
