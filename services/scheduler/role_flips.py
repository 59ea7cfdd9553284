"""Ordering role flips and keeping them until the worker confirms.

A flip goes out on the control PUB (topic = the instance id). PUB may drop a message, so an
order the worker has not acknowledged is published again every few seconds (the worker applies
an order id once). From the order until the FlipAck the registry keeps it as the instance's
`pending_role`: the router offers the instance for neither its old role nor the new one (work
routed to the old role would be refused once the worker flips; work for the new one would wait
behind the flip), and a heartbeat the worker sent before it saw the order cannot undo the flip.

Flip ids only grow for an instance, across scheduler restarts too (a worker reports its last one
when it registers): a decode candidate carries the id its worker had acknowledged when it was
named, and the worker honours a hand-off named before its latest flip.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable

from common.protocol import WORKER_ROLES, FlipAck, RoleFlip
from services.scheduler.registry import Instance, Registry

__all__ = ["RoleFlips", "reason_category"]

logger = logging.getLogger(__name__)

# An unacknowledged flip order is published again after this long.
_RESEND_S = 2.0

Publish = Callable[[RoleFlip], Awaitable[None]]

_CATEGORY = re.compile(r"[A-Za-z][A-Za-z /_-]*")


def reason_category(reason: str) -> str:
    """The words a flip reason starts with ("TTFT pressure", "no decode worker", "operator"):
    reasons carry measured figures, so counting whole reasons would count each flip apart."""
    match = _CATEGORY.match(reason.strip())
    return match.group(0).strip() if match else "other"


class RoleFlips:
    def __init__(self, registry: Registry, publish: Publish, on_flip: Callable[[str, str], None]) -> None:
        self.registry = registry
        self.publish = publish
        self.on_flip = on_flip  # (instance id, role): tells the PD policy its order went out
        self._last_id = 0
        self._sent_at: dict[str, float] = {}
        self.total = 0
        self.by_reason: Counter[str] = Counter()
        self.recent: deque[dict] = deque(maxlen=8)

    async def order(self, instance_id: str, role: str, reason: str) -> bool:
        """Order an instance into `role`; False when it cannot be done (or nothing changes)."""
        instance = self.registry.get(instance_id)
        if instance is None or role not in WORKER_ROLES or instance.role not in WORKER_ROLES:
            logger.warning("cannot flip %s to %r: %s", instance_id, role,
                           "unknown instance" if instance is None else
                           "unknown role" if role not in WORKER_ROLES else f"a {instance.role} instance")
            return False
        old = instance.ordered_role
        if old == role:
            return False  # already that role, or already ordered into it
        # Above every id this instance has seen, so its ids grow even after a scheduler restart.
        self._last_id = flip_id = max(self._last_id, instance.flip_id, instance.pending_flip or 0) + 1
        # Offered for neither role until the worker acknowledges (see the module docstring).
        instance.pending_role, instance.pending_flip = role, flip_id
        await self._send(instance)
        self.on_flip(instance_id, role)
        self.total += 1
        self.by_reason[reason_category(reason)] += 1
        self.recent.append({"flip_id": flip_id, "instance": instance_id, "from": old, "to": role,
                            "reason": reason, "at": time.time()})
        logger.info("flip %d: %s %s -> %s (%s)", flip_id, instance_id, old, role, reason)
        return True

    def acknowledged(self, instance: Instance, ack: FlipAck) -> None:
        """The worker applied flip `ack.flip_id` (an ack of an order since superseded still
        records its role; only the latest order's ack ends the pending flip)."""
        instance.acknowledge(ack.flip_id, ack.role)

    async def resend_unacknowledged(self) -> None:
        now = time.monotonic()
        for instance in self.registry.instances():
            sent = self._sent_at.get(instance.instance_id)
            if instance.pending_flip is not None and sent is not None and now - sent > _RESEND_S:
                await self._send(instance)

    async def _send(self, instance: Instance) -> None:
        self._sent_at[instance.instance_id] = time.monotonic()
        assert instance.pending_role is not None and instance.pending_flip is not None
        await self.publish(RoleFlip(instance_id=instance.instance_id, role=instance.pending_role,
                                    flip_id=instance.pending_flip))

    def summary(self) -> dict:
        return {"flips_total": self.total, "flips_by_reason": dict(self.by_reason), "recent_flips": list(self.recent)}
