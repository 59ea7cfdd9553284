"""The kvstore process's bus side: a ROUTER for requests and a PUB for stored/evicted events.

ROUTER (DEALERs of workers and the scheduler connect): KvPut (+ one uint8 frame per block),
KvGet, KvLookup, KvStatsQuery, KvSnapshotRequest. Every bad request (wrong hash size, frame
count != hash count, oversized block, namespace refused) is refused with a logged reason, and
with a reply where the request expects one; nothing a peer sends stops the service.

PUB (topic = this store's source id): KvEvent with `seq` increasing by one per event. The first
seq is taken from the clock, so a restarted store never continues its old sequence: whoever
indexes the events sees a gap and asks for a snapshot. Events raised on the write-behind thread
reach the event loop through `call_soon_threadsafe` and share one queue with snapshots, so a
snapshot and the events around it are published in the order they happened.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.codec import DEFAULT_MAX_MESSAGE_BYTES
from common.protocol import (
    KVSTORE,
    KVSTORE_EVENTS,
    KvEvent,
    KvGet,
    KvGetReply,
    KvLookup,
    KvLookupReply,
    KvPut,
    KvPutAck,
    KvSnapshotRequest,
    KvStatsQuery,
    KvStatsReply,
    KvStoreMessage,
    KvStoreReply,
    ProtocolError,
)
from common.service_config import CurveKeys
from services.kvstore.store import KvStore

__all__ = ["KvStoreServer", "HASH_BYTES", "MAX_HASHES_PER_REQUEST", "MAX_NAMESPACE_CHARS"]

logger = logging.getLogger(__name__)

Handler = Callable[[bytes, Any, list[torch.Tensor]], Awaitable[None]]

HASH_BYTES = 32  # blake2b-256, common/engine/block_manager.hash_page
MAX_HASHES_PER_REQUEST = 65_536
MAX_NAMESPACE_CHARS = 512
_REPLY_OVERHEAD = 1 << 20  # room for the msgpack header of a get reply


class KvStoreServer:
    def __init__(
        self,
        store: KvStore,
        addr: str,
        events_addr: str,
        *,
        source: str = "kvstore",
        max_block_bytes: int = 16 << 20,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        allowed_namespaces: set[str] | None = None,
        curve: CurveKeys | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.store = store
        self.addr = addr
        self.events_addr = events_addr
        self.source = source
        self.max_block_bytes = max_block_bytes
        self.max_message_bytes = max_message_bytes
        self.allowed_namespaces = allowed_namespaces
        self.curve = curve
        self._context = context or zmq.asyncio.Context.instance()
        self.router: zmq.asyncio.Socket | None = None
        self.pub: zmq.asyncio.Socket | None = None
        self.seq = time.time_ns() // 1000
        self.bad_requests = 0
        self.events_published = 0
        self._events: asyncio.Queue[tuple[str, str, list[bytes]]] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The router's channel end lets only these in: no fallback branch needed.
        self._handlers: dict[type[KvStoreMessage], Handler] = {
            KvPut: self._on_put,
            KvGet: self._on_get,
            KvLookup: self._on_lookup,
            KvStatsQuery: self._on_stats,
            KvSnapshotRequest: self._on_snapshot_request,
        }

    # ---- lifecycle ----------------------------------------------------------------------

    def bind(self) -> None:
        self.router = bus.make_socket(zmq.ROUTER, channel=KVSTORE.binder, context=self._context,
                                      max_message_bytes=self.max_message_bytes, sndhwm=1000, rcvhwm=1000)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted client may reuse its identity
        self.pub = bus.make_socket(zmq.PUB, channel=KVSTORE_EVENTS.binder, context=self._context,
                                   max_message_bytes=self.max_message_bytes)
        if self.curve is not None:
            for sock in (self.router, self.pub):
                self.curve.make_server(sock)
        self.addr = bus.bind(self.router, self.addr)
        self.events_addr = bus.bind(self.pub, self.events_addr)
        logger.info("kvstore listening: requests=%s events=%s", self.addr, self.events_addr)

    def close(self) -> None:
        for sock in (self.router, self.pub):
            if sock is not None:
                bus.close(sock, linger_ms=0)

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; sockets are closed on the way out (the store is the
        caller's to close)."""
        if self.router is None:
            self.bind()
        self._loop = asyncio.get_running_loop()
        self._events = asyncio.Queue()
        self.store.on_event = self._event_from_any_thread
        self._publish_snapshot()  # for subscribers already connected (a restart)
        tasks = [
            asyncio.create_task(self._receive_loop(), name="kvstore-requests"),
            asyncio.create_task(self._publish_loop(), name="kvstore-events"),
        ]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            self.store.on_event = None
            self.close()

    # ---- events -------------------------------------------------------------------------

    def _event_from_any_thread(self, kind: str, tier: str, hashes: list[bytes]) -> None:
        loop, queue = self._loop, self._events
        if loop is None or queue is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, tier, hashes))
        except RuntimeError:  # the loop is shutting down
            pass

    def _publish_snapshot(self) -> None:
        assert self._events is not None
        for tier, hashes in self.store.snapshot().items():
            self._events.put_nowait(("snapshot", tier, hashes))

    async def _publish_loop(self) -> None:
        assert self._events is not None and self.pub is not None
        while True:
            kind, tier, hashes = await self._events.get()
            event = KvEvent(source=self.source, seq=self.seq, kind=kind, tier=tier, hashes=hashes)
            self.seq += 1  # consumed even if the send fails: subscribers must see the gap
            try:
                await bus.send(self.pub, event, topic=self.source)
                self.events_published += 1
            except (ProtocolError, zmq.ZMQError) as exc:
                logger.error("could not publish a %s/%s event of %d hash(es): %s", kind, tier, len(hashes), exc)

    # ---- requests -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        assert self.router is not None
        while True:
            # Malformed messages, and any that is not a kvstore request, are dropped there.
            identity, msg, tensors = await bus.recv(self.router)
            try:
                await self._handlers[type(msg)](identity, msg, tensors)
            except Exception:
                # A bug or a disk error on one request must not stop the store.
                logger.exception("error handling %s from %r", msg.TAG, identity)
                await self._reply_failure(identity, msg)

    async def _on_get(self, identity: bytes, msg: KvGet, tensors: list[torch.Tensor]) -> None:
        reason = self._check(msg.namespace, msg.hashes) or self._no_tensors(tensors)
        if reason is not None:
            self._refuse(identity, msg, reason)
            await self._send(identity, KvGetReply(req_id=msg.req_id, hashes=[], tiers=[]))
            return
        found = self.store.get(msg.namespace, msg.hashes, max_bytes=self.max_message_bytes - _REPLY_OVERHEAD)
        reply = KvGetReply(req_id=msg.req_id, hashes=[h for h, _, _ in found], tiers=[t for _, t, _ in found])
        frames = [torch.frombuffer(payload, dtype=torch.uint8) for _, _, payload in found]
        await self._send(identity, reply, *frames)

    async def _on_lookup(self, identity: bytes, msg: KvLookup, tensors: list[torch.Tensor]) -> None:
        reason = self._check(msg.namespace, msg.hashes) or self._no_tensors(tensors)
        tiers: list[str] = []
        if reason is not None:
            self._refuse(identity, msg, reason)
        else:
            tiers = self.store.lookup(msg.namespace, msg.hashes)
        await self._send(identity, KvLookupReply(req_id=msg.req_id, num_hits=len(tiers), tiers=tiers))

    async def _on_stats(self, identity: bytes, msg: KvStatsQuery, tensors: list[torch.Tensor]) -> None:
        await self._send(identity, KvStatsReply(req_id=msg.req_id, stats=self.stats()))

    async def _on_snapshot_request(self, identity: bytes, msg: KvSnapshotRequest, tensors: list[torch.Tensor]) -> None:
        # One store per process: whatever source is named, this store's holdings are sent.
        logger.info("snapshot requested by %r (source %r)", identity, msg.source)
        self._publish_snapshot()

    async def _on_put(self, identity: bytes, msg: KvPut, tensors: list[torch.Tensor]) -> None:
        reason = self._check(msg.namespace, msg.hashes)
        if reason is None and len(tensors) != len(msg.hashes):
            reason = f"{len(msg.hashes)} hash(es) but {len(tensors)} payload frame(s)"
        if reason is None:
            for index, tensor in enumerate(tensors):
                if tensor.dtype != torch.uint8 or tensor.dim() != 1:
                    reason = f"payload {index} must be a 1-D uint8 tensor, got {tensor.dtype} {list(tensor.shape)}"
                elif not 0 < tensor.numel() <= self.max_block_bytes:
                    reason = f"payload {index} has {tensor.numel()} bytes (allowed 1..{self.max_block_bytes})"
                if reason is not None:
                    break
        if reason is not None:
            self._refuse(identity, msg, reason)
            if msg.want_ack:
                await self._send(identity, KvPutAck(req_id=msg.req_id, stored=0, reason=reason))
            return
        # Received frames are read-only views of ZeroMQ buffers: copy before keeping.
        payloads = [tensor.numpy().tobytes() for tensor in tensors]
        stored = self.store.put(msg.namespace, msg.hashes, payloads)
        if msg.want_ack:
            await self._send(identity, KvPutAck(req_id=msg.req_id, stored=stored))

    def _check(self, namespace: str, hashes: list[bytes]) -> str | None:
        if not namespace or len(namespace) > MAX_NAMESPACE_CHARS or not namespace.isprintable():
            return f"bad namespace {namespace[:80]!r}"
        if self.allowed_namespaces is not None and namespace not in self.allowed_namespaces:
            return f"namespace {namespace[:80]!r} is not served here"
        if len(hashes) > MAX_HASHES_PER_REQUEST:
            return f"{len(hashes)} hashes in one request (max {MAX_HASHES_PER_REQUEST})"
        for index, block_hash in enumerate(hashes):
            if len(block_hash) != HASH_BYTES:
                return f"hash {index} has {len(block_hash)} bytes, expected {HASH_BYTES}"
        return None

    @staticmethod
    def _no_tensors(tensors: list[torch.Tensor]) -> str | None:
        return f"{len(tensors)} unexpected payload frame(s)" if tensors else None

    def _refuse(self, identity: bytes, msg: KvStoreMessage, reason: str) -> None:
        self.bad_requests += 1
        logger.warning("refused %s %s from %r: %s", msg.TAG, getattr(msg, "req_id", ""), identity, reason)

    async def _reply_failure(self, identity: bytes, msg: KvStoreMessage) -> None:
        """An empty answer, so the client does not wait for its timeout."""
        reply: KvStoreReply | None = None
        if isinstance(msg, KvGet):
            reply = KvGetReply(req_id=msg.req_id, hashes=[], tiers=[])
        elif isinstance(msg, KvLookup):
            reply = KvLookupReply(req_id=msg.req_id, num_hits=0, tiers=[])
        elif isinstance(msg, KvPut) and msg.want_ack:
            reply = KvPutAck(req_id=msg.req_id, stored=0, reason="internal error")
        if reply is not None:
            try:
                await self._send(identity, reply)
            except Exception:
                logger.exception("could not send the failure reply")

    async def _send(self, identity: bytes, msg: KvStoreReply, *tensors: torch.Tensor) -> None:
        assert self.router is not None
        await bus.send(self.router, msg, *tensors, identity=identity)

    def stats(self) -> dict:
        return {
            **self.store.stats(), "source": self.source, "seq": self.seq,
            "events_published": self.events_published, "bad_requests": self.bad_requests,
        }
