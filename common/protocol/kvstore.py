"""The kvstore channels: its ROUTER for requests (DEALERs of workers and the scheduler) and its PUB
of prefix-index events (topic = the store's source id).

Requests carry a `req_id` that the reply echoes. Block payloads are raw frames (uint8 tensors),
one per hash, in the order of `hashes`. KvEvent and KvSnapshotRequest also travel on the backend
channel: a worker reports its HBM blocks to the scheduler's prefix index the same way the store
reports its DRAM / SSD blocks, and is asked for a snapshot the same way.
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.backend import BACKEND, BackendMessage
from common.protocol.base import Channel, Message, register

__all__ = [
    "KvStoreMessage",
    "KvStoreRequest",
    "KvStoreReply",
    "KVSTORE",
    "KVSTORE_EVENTS",
    "KvPut",
    "KvPutAck",
    "KvGet",
    "KvGetReply",
    "KvLookup",
    "KvLookupReply",
    "KvStatsQuery",
    "KvStatsReply",
    "KvEvent",
    "KvSnapshotRequest",
]


class KvStoreMessage(Message):
    """A message on a kvstore channel."""


class KvStoreRequest(KvStoreMessage):
    """A request that expects a reply with the same `req_id` (KvPut: only when `want_ack`)."""

    req_id: str


class KvStoreReply(KvStoreMessage):
    req_id: str


KVSTORE = Channel("kvstore", KvStoreMessage, binder="kvstore", connector="kvstore client")
KVSTORE_EVENTS = Channel("kvstore-events", KvStoreMessage, binder="kvstore", connector="prefix index")


@register
@KVSTORE.carries(to="kvstore")
class KvPut(KvStoreRequest):
    TAG: ClassVar[str] = "kv_put"
    namespace: str
    hashes: list[bytes]
    want_ack: bool = False


@register
@KVSTORE.carries(to="kvstore client")
class KvPutAck(KvStoreReply):
    TAG: ClassVar[str] = "kv_put_ack"
    stored: int
    reason: str = ""


@register
@KVSTORE.carries(to="kvstore")
class KvGet(KvStoreRequest):
    """Fetch blocks; the reply holds the longest run of `hashes`, from the first, that the store has."""

    TAG: ClassVar[str] = "kv_get"
    namespace: str
    hashes: list[bytes]


@register
@KVSTORE.carries(to="kvstore client")
class KvGetReply(KvStoreReply):
    TAG: ClassVar[str] = "kv_get_reply"
    hashes: list[bytes]
    tiers: list[str]  # where each returned block was found: "dram" or "ssd"


@register
@KVSTORE.carries(to="kvstore")
class KvLookup(KvStoreRequest):
    TAG: ClassVar[str] = "kv_lookup"
    namespace: str
    hashes: list[bytes]


@register
@KVSTORE.carries(to="kvstore client")
class KvLookupReply(KvStoreReply):
    TAG: ClassVar[str] = "kv_lookup_reply"
    num_hits: int  # length of the leading run of `hashes` the store has
    tiers: list[str]


@register
@KVSTORE.carries(to="kvstore")
class KvStatsQuery(KvStoreRequest):
    TAG: ClassVar[str] = "kv_stats_query"


@register
@KVSTORE.carries(to="kvstore client")
class KvStatsReply(KvStoreReply):
    TAG: ClassVar[str] = "kv_stats_reply"
    stats: dict


@register
@KVSTORE_EVENTS.carries(to="prefix index")
@BACKEND.carries(to="scheduler")
class KvEvent(KvStoreMessage, BackendMessage):
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
@KVSTORE.carries(to="kvstore")
@BACKEND.carries(to="worker")
class KvSnapshotRequest(KvStoreMessage, BackendMessage):
    """Ask a KV holder for a `snapshot` KvEvent per tier (the index saw a gap in `seq`)."""

    TAG: ClassVar[str] = "kv_snapshot_request"
    source: str
