"""The bus protocol's foundations: the message base class and tag registry, channels, errors.

A message is a `msgspec.Struct`: typed fields, keyword-only construction, and a decode that
refuses a missing, mistyped or unknown field (nested `Record`s included). Its class-level `TAG`
names it on the wire (`common.codec`): tags are wire format, never reuse or rename one. Tensors
never go inside a message; they travel as extra raw frames next to it.

A `Channel` is one kind of socket pair of DESIGN.md §2 (frontend, backend, control, kv, kvstore,
tokens). Each channel has a base class its messages derive from, and each message says which end
of the channel it travels to (`@CHANNEL.carries(to=...)`); a message on two channels derives
from both bases. A socket made for one end (`bus.make_socket(..., channel=BACKEND.binder)`)
drops whatever else arrives inside `bus.recv`, and refuses to send what its peer would drop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import ClassVar, TypeVar

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "MESSAGE_TYPES",
    "CHANNELS",
    "Message",
    "Record",
    "ProtocolError",
    "Channel",
    "ChannelEnd",
    "register",
    "message_class",
]

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be encoded or that failed validation on decode.

    When a message of a known type failed on its fields, `tag` names the type and `fields` holds
    what could be read of them (untyped: for answering the sender, e.g. a 400 to the gateway of
    a refused Submit, never for acting on).
    """

    def __init__(self, reason: str, *, tag: str | None = None, fields: dict | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.tag = tag
        self.fields = fields


class _StrictStructMeta(msgspec.StructMeta):
    # msgspec applies `kw_only` to the fields a class itself declares, so a base class cannot
    # impose it on its subclasses; the metaclass does, for every message and record.
    def __new__(mcls, name: str, bases: tuple[type, ...], namespace: dict, **options: object):
        options.setdefault("kw_only", True)
        options.setdefault("forbid_unknown_fields", True)
        return super().__new__(mcls, name, bases, namespace, **options)


class Record(msgspec.Struct, metaclass=_StrictStructMeta):
    """A typed record nested in messages (e.g. `Sampling`): validated like a message's fields."""


class Message(msgspec.Struct, metaclass=_StrictStructMeta):
    """Base of every bus message; a subclass sets `TAG` and is decorated with `@register`."""

    TAG: ClassVar[str]


MessageT = TypeVar("MessageT", bound=type[Message])

MESSAGE_TYPES: dict[str, type[Message]] = {}


def register(cls: MessageT) -> MessageT:
    """Add a message class to the tag registry (used as a class decorator)."""
    tag = cls.__dict__.get("TAG")
    if not isinstance(tag, str) or not tag:
        raise TypeError(f"{cls.__name__} needs a class-level TAG string")
    existing = MESSAGE_TYPES.get(tag)
    if existing is not None and existing is not cls:
        raise TypeError(f"tag {tag!r} of {cls.__name__} is already used by {existing.__name__}")
    MESSAGE_TYPES[tag] = cls
    return cls


def message_class(tag: str) -> type[Message] | None:
    """The message class for a wire tag, or None when the tag is unknown."""
    return MESSAGE_TYPES.get(tag)


# --------------------------------------------------------------------------------- channels


class ChannelEnd:
    """One end of a channel: what a socket there may receive (`inbound`) and send (`outbound`).

    `role` is who holds this end, `peer` who holds the other; the sets are filled while the
    protocol modules are imported, before any socket exists.
    """

    __slots__ = ("channel", "role", "peer", "inbound", "outbound", "inbound_tags")

    def __init__(self, channel: str, role: str, peer: str) -> None:
        self.channel = channel
        self.role = role
        self.peer = peer
        self.inbound: set[type[Message]] = set()
        self.outbound: set[type[Message]] = set()
        self.inbound_tags: set[str] = set()  # what the codec checks a received tag against

    def refusal(self, tag: str) -> str:
        """Why a message with `tag` is dropped at this end."""
        return f"{tag} is not a {self.peer} message (the {self.role}'s {self.channel} socket)"

    def __repr__(self) -> str:
        return f"<{self.channel} channel at the {self.role}>"


class Channel:
    """A kind of socket pair: `binder` binds (e.g. the scheduler's backend ROUTER), `connector`
    connects (the workers' DEALERs); each message travels to one of the two ends."""

    def __init__(self, name: str, base: type[Message], *, binder: str, connector: str) -> None:
        if binder == connector:
            raise ValueError("the two ends of a channel need different names")
        self.name = name
        self.base = base
        self.binder = ChannelEnd(name, binder, connector)
        self.connector = ChannelEnd(name, connector, binder)
        CHANNELS[name] = self

    def carries(self, *, to: str) -> Callable[[MessageT], MessageT]:
        """Class decorator: this channel carries the message to its `to` end."""
        if to == self.binder.role:
            receiver, sender = self.binder, self.connector
        elif to == self.connector.role:
            receiver, sender = self.connector, self.binder
        else:
            raise ValueError(f"the {self.name} channel has no end {to!r}")

        def add(cls: MessageT) -> MessageT:
            if not issubclass(cls, self.base):
                raise TypeError(f"{cls.__name__} travels on the {self.name} channel: derive it from "
                                f"{self.base.__name__}")
            receiver.inbound.add(cls)
            receiver.inbound_tags.add(cls.__dict__["TAG"])
            sender.outbound.add(cls)
            return cls

        return add

    def messages(self) -> frozenset[type[Message]]:
        return frozenset(self.binder.inbound | self.connector.inbound)

    def __repr__(self) -> str:
        return f"<{self.name} channel: {self.binder.role} <- {self.connector.role}>"


CHANNELS: dict[str, Channel] = {}


def check_channels(messages: Iterable[type[Message]]) -> None:
    """Every registered message travels on some channel, and every carried one is registered
    (called once the protocol package is imported: a slip fails at import, not at runtime)."""
    carried = {cls for channel in CHANNELS.values() for cls in channel.messages()}
    registered = set(messages)
    if registered - carried:
        names = sorted(cls.__name__ for cls in registered - carried)
        raise TypeError(f"message(s) on no channel: {', '.join(names)}")
    if carried - registered:
        names = sorted(cls.__name__ for cls in carried - registered)
        raise TypeError(f"unregistered message(s) on a channel: {', '.join(names)}")
