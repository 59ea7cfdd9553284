"""The control channel: the scheduler's PUB, the workers' SUBs (topic = instance id or `all`).

Orders only, nothing comes back this way (a worker acknowledges a flip on the backend: FlipAck).
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register

__all__ = ["ControlMessage", "CONTROL", "TOPIC_ALL", "WORKER_ROLES", "RoleFlip", "Drain", "Shutdown"]

# The control-channel topic that every worker subscribes to besides its own instance id.
TOPIC_ALL = b"all"

# The roles a worker can be in: what a RoleFlip (and a Register, Heartbeat, FlipAck) may name.
WORKER_ROLES = ("mixed", "prefill", "decode")


class ControlMessage(Message):
    """A message on the control channel."""


CONTROL = Channel("control", ControlMessage, binder="scheduler", connector="worker")


@register
@CONTROL.carries(to="worker")
class RoleFlip(ControlMessage):
    TAG: ClassVar[str] = "role_flip"
    instance_id: str
    role: str
    flip_id: int


@register
@CONTROL.carries(to="worker")
class Drain(ControlMessage):
    TAG: ClassVar[str] = "drain"
    instance_id: str


@register
@CONTROL.carries(to="worker")
class Shutdown(ControlMessage):
    TAG: ClassVar[str] = "shutdown"
