"""Every message that travels on the bus, as a typed dataclass with a type tag.

Services only exchange these messages (DESIGN.md §2). A message is a flat record of msgpack-able
fields (int, float, str, bool, bytes, list, dict, None); tensors never go inside a message, they
travel as extra raw frames next to it (see `common.codec`).

Adding a message: declare a dataclass with `TAG`, decorate it with `@register`, and both the
codec and its validation pick it up. Tags are wire format: never reuse or rename one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, TypeVar

PROTOCOL_VERSION = 1


class ProtocolError(ValueError):
    """A message that cannot be encoded or that failed validation on decode."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Message:
    """Base of every bus message; subclasses are `@dataclass(kw_only=True, slots=True)`."""

    __slots__ = ()
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


# ---------------------------------------------------------------- frontend: gateway -> scheduler


@register
@dataclass(kw_only=True, slots=True)
class Submit(Message):
    TAG: ClassVar[str] = "submit"
    request_id: str
    prompt_ids: list[int]
    sampling: dict
    priority: str = "online"
    gateway_id: str
    tokens_addr: str
    arrival_time: float


@register
@dataclass(kw_only=True, slots=True)
class Abort(Message):
    TAG: ClassVar[str] = "abort"
    request_id: str
    reason: str


@register
@dataclass(kw_only=True, slots=True)
class FinishChoice(Message):
    """One choice of a request ended early (a stop string matched in its text): stop computing
    it. Gateway -> scheduler on the frontend, scheduler -> worker on the backend."""

    TAG: ClassVar[str] = "finish_choice"
    request_id: str
    index: int


@register
@dataclass(kw_only=True, slots=True)
class StatusQuery(Message):
    TAG: ClassVar[str] = "status_query"


@register
@dataclass(kw_only=True, slots=True)
class StatusReply(Message):
    TAG: ClassVar[str] = "status_reply"
    instances: list[dict]
    scheduler: dict = dataclasses.field(default_factory=dict)  # policy, flips, pools


@register
@dataclass(kw_only=True, slots=True)
class FlipRequest(Message):
    """An operator (or a test) asks the scheduler to flip an instance's role now."""

    TAG: ClassVar[str] = "flip_request"
    instance_id: str
    role: str


@register
@dataclass(kw_only=True, slots=True)
class GatewayHello(Message):
    TAG: ClassVar[str] = "gateway_hello"
    gateway_id: str
    tokens_addr: str


# ------------------------------------------------ backend: worker/encoder/kvstore <-> scheduler


@register
@dataclass(kw_only=True, slots=True)
class Register(Message):
    TAG: ClassVar[str] = "register"
    instance_id: str
    role: str
    kv_addr: str
    num_pages: int
    page_size: int
    model: str
    max_model_len: int


@register
@dataclass(kw_only=True, slots=True)
class RegisterAck(Message):
    TAG: ClassVar[str] = "register_ack"
    instance_id: str
    accepted: bool
    reason: str = ""


@register
@dataclass(kw_only=True, slots=True)
class Heartbeat(Message):
    TAG: ClassVar[str] = "heartbeat"
    instance_id: str
    role: str
    waiting: int
    running: int
    free_pages: int
    total_pages: int
    prefix_hit_rate: float
    stats: dict


@register
@dataclass(kw_only=True, slots=True)
class Deregister(Message):
    TAG: ClassVar[str] = "deregister"
    instance_id: str


@register
@dataclass(kw_only=True, slots=True)
class Assign(Message):
    TAG: ClassVar[str] = "assign"
    request_id: str
    prompt_ids: list[int]
    sampling: dict
    priority: str
    gateway_id: str
    tokens_addr: str
    prefill_instance: str
    decode_instance: str
    arrival_time: float
    # P/D disaggregation: decode workers to hand the KV to after prefill, best first, as
    # [instance_id, kv_addr] pairs. Empty: the assigned worker serves the whole request.
    decode_candidates: list[list[str]] = dataclasses.field(default_factory=list)


@register
@dataclass(kw_only=True, slots=True)
class AbortRequest(Message):
    TAG: ClassVar[str] = "abort_request"
    request_id: str


@register
@dataclass(kw_only=True, slots=True)
class RequestFinished(Message):
    TAG: ClassVar[str] = "request_finished"
    request_id: str
    instance_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    # Latency as the serving worker saw it (-1 when unknown): feeds the dynamic PD policy.
    ttft_s: float = -1.0
    tpot_s: float = -1.0


@register
@dataclass(kw_only=True, slots=True)
class RequestHandoff(Message):
    """A decode worker took a request over from its prefill worker (the KV landed): from now on
    aborts go to `to_instance` and its RequestFinished ends the request."""

    TAG: ClassVar[str] = "request_handoff"
    request_id: str
    from_instance: str
    to_instance: str
    ttft_s: float = -1.0


@register
@dataclass(kw_only=True, slots=True)
class KvEvent(Message):
    """Prefix blocks a KV holder stored or evicted (HBM of a worker on the backend socket; DRAM /
    SSD of the kvstore on its PUB socket). `seq` increases by one per event from one `source`, so
    a gap tells the global prefix index it missed one and must resync. `kind` is "stored",
    "evicted" or "snapshot" (the full set of `hashes` the source holds in `tier`, after a
    KvSnapshotRequest or a restart)."""

    TAG: ClassVar[str] = "kv_event"
    source: str
    seq: int
    kind: str
    tier: str
    hashes: list[bytes]


@register
@dataclass(kw_only=True, slots=True)
class KvSnapshotRequest(Message):
    """Ask a KV holder for a `snapshot` KvEvent per tier (the index saw a gap in `seq`)."""

    TAG: ClassVar[str] = "kv_snapshot_request"
    source: str


# ----------------------------------------------------------------- tokens: worker -> gateway


@register
@dataclass(kw_only=True, slots=True)
class TokenDelta(Message):
    TAG: ClassVar[str] = "token_delta"
    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    cached_tokens: int = 0


@register
@dataclass(kw_only=True, slots=True)
class RequestError(Message):
    TAG: ClassVar[str] = "request_error"
    request_id: str
    code: int
    message: str


# ------------------------------------------- control: scheduler PUB -> workers (topic = instance)


@register
@dataclass(kw_only=True, slots=True)
class RoleFlip(Message):
    TAG: ClassVar[str] = "role_flip"
    instance_id: str
    role: str
    flip_id: int


@register
@dataclass(kw_only=True, slots=True)
class FlipAck(Message):
    TAG: ClassVar[str] = "flip_ack"
    instance_id: str
    flip_id: int
    role: str


@register
@dataclass(kw_only=True, slots=True)
class Drain(Message):
    TAG: ClassVar[str] = "drain"
    instance_id: str


@register
@dataclass(kw_only=True, slots=True)
class Shutdown(Message):
    TAG: ClassVar[str] = "shutdown"


# -------------------------------------------------------------------- kv: worker <-> worker
#
# One transfer moves one sequence's KV from a prefill worker to a decode worker's `kv` ROUTER:
#   P -> D  KvTransferBegin     (the request and its state; D reserves pages or refuses)
#   D -> P  KvTransferReady     (ok: pages reserved; else P tries its next decode candidate)
#   P -> D  KvTransferChunk x k (layers [layer_start, layer_start + num_layers), one raw frame per
#                                layer: that layer's pages, shape [2, kv_heads, pages, page_size, dim])
#   D -> P  KvTransferAck       (after the last chunk: ok means D owns the sequence now)


@register
@dataclass(kw_only=True, slots=True)
class KvTransferBegin(Message):
    TAG: ClassVar[str] = "kv_transfer_begin"
    transfer_id: str
    request_id: str
    source_instance: str
    prompt_ids: list[int]
    output_ids: list[int]  # tokens sampled on the prefill worker (already streamed to the client)
    logprobs: list | None = None  # the matching TokenLogprobs dicts when logprobs were asked for
    sampling: dict
    priority: str
    tokens_addr: str
    arrival_time: float
    num_tokens: int  # tokens whose KV travels (prompt + outputs already computed)
    num_layers: int
    page_size: int
    dtype: str
    namespace: str  # model | kv dtype | page size: both ends must agree
    num_cached_tokens: int = 0
    ttft_s: float = -1.0
    # The per-request sampler RNG state (seeded requests), so decode continues the same stream.
    generator_state: bytes | None = None


@register
@dataclass(kw_only=True, slots=True)
class KvTransferReady(Message):
    TAG: ClassVar[str] = "kv_transfer_ready"
    transfer_id: str
    ok: bool
    reason: str = ""


@register
@dataclass(kw_only=True, slots=True)
class KvTransferChunk(Message):
    TAG: ClassVar[str] = "kv_transfer_chunk"
    transfer_id: str
    layer_start: int
    num_layers: int
    last: bool


@register
@dataclass(kw_only=True, slots=True)
class KvTransferCancel(Message):
    """P -> D: the transfer will not complete (request aborted, export failed): free the pages."""

    TAG: ClassVar[str] = "kv_transfer_cancel"
    transfer_id: str
    reason: str = ""


@register
@dataclass(kw_only=True, slots=True)
class KvTransferAck(Message):
    TAG: ClassVar[str] = "kv_transfer_ack"
    transfer_id: str
    ok: bool
    reason: str = ""


# ------------------------------------------------------ kvstore: workers/scheduler <-> kvstore
#
# Requests go to the kvstore's ROUTER from a DEALER; each carries a `req_id` the reply echoes.
# Block payloads are raw frames (uint8 tensors), one per hash, in the order of `hashes`.


@register
@dataclass(kw_only=True, slots=True)
class KvPut(Message):
    TAG: ClassVar[str] = "kv_put"
    req_id: str
    namespace: str
    hashes: list[bytes]
    want_ack: bool = False


@register
@dataclass(kw_only=True, slots=True)
class KvPutAck(Message):
    TAG: ClassVar[str] = "kv_put_ack"
    req_id: str
    stored: int
    reason: str = ""


@register
@dataclass(kw_only=True, slots=True)
class KvGet(Message):
    """Fetch blocks; the reply holds the longest run of `hashes`, from the first, that the store has."""

    TAG: ClassVar[str] = "kv_get"
    req_id: str
    namespace: str
    hashes: list[bytes]


@register
@dataclass(kw_only=True, slots=True)
class KvGetReply(Message):
    TAG: ClassVar[str] = "kv_get_reply"
    req_id: str
    hashes: list[bytes]
    tiers: list[str]  # where each returned block was found: "dram" or "ssd"


@register
@dataclass(kw_only=True, slots=True)
class KvLookup(Message):
    TAG: ClassVar[str] = "kv_lookup"
    req_id: str
    namespace: str
    hashes: list[bytes]


@register
@dataclass(kw_only=True, slots=True)
class KvLookupReply(Message):
    TAG: ClassVar[str] = "kv_lookup_reply"
    req_id: str
    num_hits: int  # length of the leading run of `hashes` the store has
    tiers: list[str]


@register
@dataclass(kw_only=True, slots=True)
class KvStatsQuery(Message):
    TAG: ClassVar[str] = "kv_stats_query"
    req_id: str


@register
@dataclass(kw_only=True, slots=True)
class KvStatsReply(Message):
    TAG: ClassVar[str] = "kv_stats_reply"
    req_id: str
    stats: dict


# The control-channel topic that every worker subscribes to besides its own instance id.
TOPIC_ALL = b"all"

__all__ = [
    "PROTOCOL_VERSION",
    "TOPIC_ALL",
    "MESSAGE_TYPES",
    "Message",
    "ProtocolError",
    "register",
    "message_class",
    "Submit",
    "Abort",
    "StatusQuery",
    "StatusReply",
    "GatewayHello",
    "Register",
    "RegisterAck",
    "Heartbeat",
    "Deregister",
    "Assign",
    "AbortRequest",
    "RequestFinished",
    "TokenDelta",
    "RequestError",
    "RoleFlip",
    "FlipAck",
    "Drain",
    "Shutdown",
    "RequestHandoff",
    "KvEvent",
    "KvSnapshotRequest",
    "KvTransferBegin",
    "KvTransferReady",
    "KvTransferChunk",
    "KvTransferCancel",
    "KvTransferAck",
    "FlipRequest",
    "KvPut",
    "KvPutAck",
    "KvGet",
    "KvGetReply",
    "KvLookup",
    "KvLookupReply",
    "KvStatsQuery",
    "KvStatsReply",
]
