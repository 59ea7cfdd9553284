"""The workers' (and scheduler's) client of the kvstore service: a DEALER to its ROUTER.

The kvstore is a cache: a worker must keep serving when it is down or slow. So nothing here
raises into the caller and nothing waits longer than its timeout:

- `put` is fire-and-forget: blocks go into a bounded queue that a background task sends; when
  the store cannot keep up (or is down) the oldest queued put is dropped and counted.
- `get` / `lookup` / `stats` return an empty answer on timeout, on a send that cannot go out, or
  while the store is marked down. The first failure marks it down (one log line); after a
  backoff (doubling up to a cap) the next request is sent as a probe, and an answer marks it up
  again (one log line). The DEALER reconnects by itself when the store restarts; replies whose
  `req_id` is unknown (answers to requests that already timed out) are ignored.

`ZMQ_IMMEDIATE` keeps messages from queueing on a connection that does not exist yet, so a
request to a store that is down fails at once instead of after its timeout.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch
import zmq
import zmq.asyncio

from common import bus
from common.codec import DEFAULT_MAX_MESSAGE_BYTES
from common.protocol import (
    KVSTORE,
    KvGet,
    KvGetReply,
    KvLookup,
    KvLookupReply,
    KvPut,
    KvSnapshotRequest,
    KvStatsQuery,
    KvStatsReply,
    KvStoreMessage,
    KvStoreReply,
    KvStoreRequest,
    ProtocolError,
)
from common.service_config import CurveKeys

__all__ = ["KvStoreClient", "kvstore_addresses"]

logger = logging.getLogger(__name__)

_HEADER_ROOM = 1 << 20  # msgpack header of a put, besides its payload frames


def kvstore_addresses(run_dir: str | os.PathLike) -> tuple[str, str]:
    """(request ROUTER, event PUB) addresses of the kvstore of the deployment in `run_dir`."""
    base = Path(run_dir).absolute()
    return f"ipc://{base / 'kvstore.sock'}", f"ipc://{base / 'kvstore-events.sock'}"


def _as_block(payload: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """A payload as the 1-D uint8 CPU tensor the kvstore takes."""
    if not isinstance(payload, torch.Tensor):
        return torch.frombuffer(payload, dtype=torch.uint8) if len(payload) else torch.empty(0, dtype=torch.uint8)
    tensor = payload.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    return tensor.contiguous().reshape(-1).view(torch.uint8)


class KvStoreClient:
    def __init__(
        self,
        addr: str,
        *,
        context: zmq.asyncio.Context | None = None,
        timeout_s: float = 1.0,
        max_queued_puts: int = 256,
        retry_after_s: float = 1.0,
        max_retry_after_s: float = 30.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        curve: CurveKeys | None = None,
    ) -> None:
        self.addr = addr
        self.timeout_s = timeout_s
        self.retry_after_s = retry_after_s
        self.max_retry_after_s = max_retry_after_s
        self.max_message_bytes = max_message_bytes
        self._context = context or zmq.asyncio.Context.instance()
        self._curve = curve
        self._sock: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._puts: collections.deque[tuple[str, list[bytes], list[torch.Tensor]]] = collections.deque(
            maxlen=max(1, max_queued_puts))
        self._put_ready = asyncio.Event()
        self._waiting: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self.available = True  # optimistic until a request fails
        self._retry_at = 0.0
        self._backoff_s = retry_after_s
        # counters for metrics
        self.timeouts = 0
        self.errors = 0
        self.dropped_puts = 0
        self.puts_sent = 0
        self.blocks_sent = 0
        self.gets = 0
        self.blocks_received = 0
        self.stale_replies = 0

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and start the receive and put tasks (call from the event loop)."""
        if self._sock is not None:
            return
        sock = bus.make_socket(zmq.DEALER, channel=KVSTORE.connector, context=self._context,
                               max_message_bytes=self.max_message_bytes, sndhwm=64, rcvhwm=64)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if self._curve is not None:
            self._curve.make_client(sock)
        bus.connect(sock, self.addr)
        self._sock = sock
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="kvstore-client-recv"),
            asyncio.create_task(self._put_loop(), name="kvstore-client-put"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()
        if self._sock is not None:
            bus.close(self._sock, linger_ms=0)
            self._sock = None

    # ---- API ----------------------------------------------------------------------------

    def put(self, namespace: str, hashes: Sequence[bytes],
            payloads: Sequence[torch.Tensor | bytes | bytearray | memoryview]) -> bool:
        """Queue blocks for the store (never blocks, never raises). A payload tensor must not be
        modified until it was sent: pass a copy of a page that will be reused. False when the
        arguments are refused."""
        if len(hashes) != len(payloads):
            self.errors += 1
            logger.warning("kvstore put refused: %d hashes but %d payloads", len(hashes), len(payloads))
            return False
        try:
            blocks = [_as_block(payload) for payload in payloads]
        except (TypeError, ValueError, RuntimeError) as exc:
            self.errors += 1
            logger.warning("kvstore put refused: %s", exc)
            return False
        limit = self.max_message_bytes - _HEADER_ROOM
        start, size = 0, 0
        for index, block in enumerate(blocks):  # one message per run of blocks that fits
            if index > start and size + block.numel() > limit:
                self._queue_put(namespace, list(hashes[start:index]), blocks[start:index])
                start, size = index, 0
            size += block.numel()
        if start < len(blocks):
            self._queue_put(namespace, list(hashes[start:]), blocks[start:])
        return True

    async def get(self, namespace: str, hashes: Sequence[bytes],
                  timeout_s: float | None = None) -> list[tuple[bytes, str, torch.Tensor]]:
        """The longest leading run of `hashes` the store holds, as (hash, tier, payload); [] on a
        miss, a timeout or while the store is down. Payloads are read-only views of the
        received message: copy them before keeping or writing."""
        self.gets += 1
        if not hashes:
            return []
        answer = await self._request(KvGet(req_id=self._next_id(), namespace=namespace, hashes=list(hashes)),
                                     timeout_s)
        if answer is None:
            return []
        reply, tensors = answer
        if not isinstance(reply, KvGetReply) or len(reply.hashes) != len(tensors) or len(reply.tiers) != len(tensors):
            self.errors += 1
            logger.warning("kvstore: malformed get reply (%s)", reply.TAG)
            return []
        # Trust only a true leading run of what was asked.
        run = 0
        while run < len(reply.hashes) and run < len(hashes) and reply.hashes[run] == hashes[run]:
            run += 1
        self.blocks_received += run
        return [(reply.hashes[i], reply.tiers[i], tensors[i]) for i in range(run)]

    async def lookup(self, namespace: str, hashes: Sequence[bytes], timeout_s: float | None = None) -> list[str]:
        """Tiers of the longest leading run of `hashes` the store holds ([] when unknown)."""
        if not hashes:
            return []
        answer = await self._request(KvLookup(req_id=self._next_id(), namespace=namespace, hashes=list(hashes)),
                                     timeout_s)
        if answer is None or not isinstance(answer[0], KvLookupReply):
            return []
        return answer[0].tiers[: len(hashes)]

    async def stats(self, timeout_s: float | None = None) -> dict | None:
        """The store's stats dict, or None when it did not answer."""
        answer = await self._request(KvStatsQuery(req_id=self._next_id()), timeout_s)
        if answer is None or not isinstance(answer[0], KvStatsReply):
            return None
        return answer[0].stats

    def request_snapshot(self, source: str = "kvstore") -> bool:
        """Ask the store to re-publish its holdings as one `snapshot` event per tier (the prefix
        index saw a gap in its seq). `source` is the store's source id, as in its events."""
        return self._send_now(KvSnapshotRequest(source=source)) == "sent"

    def metrics(self) -> dict[str, int]:
        return {
            "kvstore_available": int(self.available), "kvstore_timeouts": self.timeouts,
            "kvstore_errors": self.errors, "kvstore_dropped_puts": self.dropped_puts,
            "kvstore_puts_sent": self.puts_sent, "kvstore_blocks_sent": self.blocks_sent,
            "kvstore_gets": self.gets, "kvstore_blocks_received": self.blocks_received,
            "kvstore_queued_puts": len(self._puts),
        }

    # ---- internals ----------------------------------------------------------------------

    def _next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    def _queue_put(self, namespace: str, hashes: list[bytes], blocks: list[torch.Tensor]) -> None:
        if len(self._puts) == self._puts.maxlen:
            self.dropped_puts += 1  # the deque drops the oldest: the store is slow or down
        self._puts.append((namespace, hashes, blocks))
        self._put_ready.set()

    def _send_now(self, msg: KvStoreMessage, *tensors: torch.Tensor) -> str:
        """Send without waiting: "sent", "again" (no connection: the store is down, or its queue
        is full: the store is slow) or "error" (refused by the codec; logged and counted)."""
        if self._sock is None:
            return "again"
        try:
            frames = bus.encode_for(self._sock, msg, *tensors)
            # No send is ever awaited on this socket, so a NOBLOCK send resolves at once.
            future = self._sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            if future.done():
                future.result()
        except zmq.Again:
            return "again"
        except (ProtocolError, zmq.ZMQError) as exc:
            self.errors += 1
            logger.warning("kvstore: cannot send %s: %s", msg.TAG, exc)
            return "error"
        return "sent"

    async def _request(
        self, msg: KvStoreRequest, timeout_s: float | None
    ) -> tuple[KvStoreReply, list[torch.Tensor]] | None:
        if self._sock is None:
            return None
        if not self.available and time.monotonic() < self._retry_at:
            return None  # down: do not wait on it until the next probe
        req_id = msg.req_id
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[req_id] = future
        try:
            outcome = self._send_now(msg)
            if outcome != "sent":
                if outcome == "again":
                    self._mark_down("not connected or not keeping up")
                return None
            try:
                answer = await asyncio.wait_for(future, self.timeout_s if timeout_s is None else timeout_s)
            except asyncio.TimeoutError:
                self.timeouts += 1
                self._mark_down("request timed out")
                return None
            self._mark_up()
            return answer
        finally:
            self._waiting.pop(req_id, None)

    def _mark_down(self, why: str) -> None:
        now = time.monotonic()
        if self.available:
            logger.warning("kvstore at %s unavailable (%s): serving without it, retrying in %.1f s",
                           self.addr, why, self._backoff_s)
            self.available = False
        else:
            self._backoff_s = min(self._backoff_s * 2, self.max_retry_after_s)
        self._retry_at = now + self._backoff_s

    def _mark_up(self) -> None:
        if not self.available:
            logger.warning("kvstore at %s is back", self.addr)
        self.available = True
        self._backoff_s = self.retry_after_s

    async def _receive_loop(self) -> None:
        assert self._sock is not None
        while True:
            # Invalid messages, and any that is not a kvstore reply, are dropped there.
            _, msg, tensors = await bus.recv(self._sock)
            reply = cast(KvStoreReply, msg)
            future = self._waiting.get(reply.req_id)
            if future is None or future.done():
                self.stale_replies += 1  # an answer to a request that timed out already
                continue
            future.set_result((reply, tensors))

    async def _put_loop(self) -> None:
        while True:
            await self._put_ready.wait()
            while self._puts:
                namespace, hashes, blocks = self._puts[0]
                outcome = self._send_now(KvPut(req_id=self._next_id(), namespace=namespace, hashes=hashes), *blocks)
                if outcome == "again":
                    # Down or slow: retry later; meanwhile new puts push the oldest out.
                    await asyncio.sleep(0.05 if self.available else min(self._backoff_s, 0.5))
                    continue
                if outcome == "sent":
                    self.puts_sent += 1
                    self.blocks_sent += len(hashes)
                self._puts.popleft()  # no await since the send: still the same head
            self._put_ready.clear()
