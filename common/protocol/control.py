"""The control channel: the scheduler's PUB, the workers' SUBs (topic = instance id or `all`).

Orders only, nothing comes back this way (a worker acknowledges a flip on the backend: FlipAck).
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.base import Channel, Message, register

__all__ = ["ControlMessage", "CONTROL", "TOPIC_ALL", "RoleFlip", "Drain", "Shutdown"]

# The control-channel topic that every worker subscribes to besides its own instance id.
TOPIC_ALL = b"all"


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
