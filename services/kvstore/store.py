"""The two tiers together: DRAM in front, SSD (LMDB) behind, with write-behind between them.

put -> DRAM. Blocks the DRAM LRU evicts go to a bounded write-behind queue that a background
thread drains into the SSD tier in batches (one LMDB transaction each), so no request waits on
disk writes. get -> DRAM, else the write-behind queue, else SSD (promoted back into DRAM); the
answer is the longest leading run of the asked hashes. The SSD tier is inclusive: a promoted
block stays on disk, so evicting it from DRAM again costs no write.

Keys are `blake2b(namespace)[:16] + hash`, so two models (or KV layouts) never share a block
even if their hashes collided. Events name blocks by their hash only (the engine's hashes
already cover the namespace).

Threading: put/get/lookup/snapshot run on one thread (the server's event loop); the writer
thread only touches the SSD tier (which has its own lock) and the pending map (under `_cond`).
`on_event(kind, tier, hashes)` is called from both threads; the caller makes it thread-safe.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

from services.kvstore.dram_tier import DramTier
from services.kvstore.ssd_tier import SsdTier

__all__ = ["KvStore", "namespace_key", "EventSink"]

logger = logging.getLogger(__name__)

EventSink = Callable[[str, str, list[bytes]], None]  # kind, tier, hashes
_NS_BYTES = 16
_BATCH_BLOCKS = 64
_BATCH_BYTES = 32 << 20


@functools.lru_cache(maxsize=256)
def _namespace_digest(namespace: str) -> bytes:
    return hashlib.blake2b(namespace.encode(), digest_size=_NS_BYTES).digest()


def namespace_key(namespace: str, block_hash: bytes) -> bytes:
    """The storage key of a block: its namespace's digest, then its hash."""
    return _namespace_digest(namespace) + block_hash


def _hash_of(key: bytes) -> bytes:
    return key[_NS_BYTES:]


class KvStore:
    def __init__(
        self,
        directory: str | os.PathLike,
        dram_bytes: int,
        ssd_bytes: int,
        *,
        writebehind_bytes: int = 64 << 20,
        on_event: EventSink | None = None,
        sync: bool = True,
        initial_map_size: int = 64 << 20,
    ) -> None:
        self.dram = DramTier(dram_bytes)
        self.ssd = SsdTier(directory, ssd_bytes, initial_map_size=initial_map_size, sync=sync)
        self.writebehind_bytes = writebehind_bytes
        self.on_event: EventSink | None = on_event  # set by the server once its loop runs
        self._cond = threading.Condition()
        self._queue: OrderedDict[bytes, bytes] = OrderedDict()  # evicted from DRAM, not yet on SSD
        self._queue_bytes = 0
        self._writing: dict[bytes, bytes] = {}  # the batch the writer holds right now
        self._stopping = False
        self.writebehind_dropped = 0
        self.writebehind_errors = 0
        self.put_blocks = 0
        self.get_requests = 0
        self.blocks_served = 0
        self._writer = threading.Thread(target=self._writer_loop, name="kvstore-writebehind", daemon=True)
        self._writer.start()

    def _emit(self, kind: str, tier: str, hashes: list[bytes]) -> None:
        sink = self.on_event
        if sink is not None:
            sink(kind, tier, hashes)

    # ---- requests (event loop thread) --------------------------------------------------

    def put(self, namespace: str, hashes: Sequence[bytes], payloads: Sequence[bytes]) -> int:
        """Store blocks in DRAM; returns how many were new there."""
        if len(hashes) != len(payloads):
            raise ValueError(f"{len(hashes)} hashes but {len(payloads)} payloads")
        stored: list[bytes] = []
        evicted: list[tuple[bytes, bytes]] = []
        for block_hash, payload in zip(hashes, payloads):
            key = namespace_key(namespace, block_hash)
            was_stored, out = self.dram.put(key, payload)
            if was_stored:
                stored.append(block_hash)
            evicted.extend(out)
        self.put_blocks += len(hashes)
        if stored:
            self._emit("stored", "dram", stored)
        self._spill(evicted)
        return len(stored)

    def get(self, namespace: str, hashes: Sequence[bytes], max_bytes: int | None = None) -> list[tuple[bytes, str, bytes]]:
        """The longest leading run of `hashes` held, as (hash, tier, payload); at most
        `max_bytes` of payload (a reply must fit in one bus message)."""
        self.get_requests += 1
        found: list[tuple[bytes, str, bytes]] = []
        total = 0
        promoted: list[bytes] = []
        ssd_damaged: list[bytes] = []
        for block_hash in hashes:
            key = namespace_key(namespace, block_hash)
            tier = "dram"
            payload = self.dram.get(key)
            if payload is None:
                payload = self._pending(key)
            if payload is None:
                tier = "ssd"
                payload, damaged = self.ssd.get(key)
                if damaged:
                    ssd_damaged.append(block_hash)
                if payload is not None:
                    was_stored, out = self.dram.put(key, payload)
                    if was_stored:
                        promoted.append(block_hash)
                    if out:
                        # Events in the order things happened: a block promoted earlier in this
                        # request may be the one pushed out now. Spill at once, so what is
                        # pushed out stays findable (pending) for the rest of this request.
                        if promoted:
                            self._emit("stored", "dram", promoted)
                            promoted = []
                        self._spill(out)
            if payload is None or (max_bytes is not None and total + len(payload) > max_bytes):
                break
            total += len(payload)
            found.append((block_hash, tier, payload))
        if ssd_damaged:
            self._emit("evicted", "ssd", ssd_damaged)
        if promoted:
            self._emit("stored", "dram", promoted)
        self.blocks_served += len(found)
        return found

    def lookup(self, namespace: str, hashes: Sequence[bytes]) -> list[str]:
        """Tiers of the longest leading run of `hashes` held (no payload read, no promotion)."""
        tiers: list[str] = []
        for block_hash in hashes:
            key = namespace_key(namespace, block_hash)
            if key in self.dram or self._pending(key) is not None:
                tiers.append("dram")
            elif key in self.ssd:
                tiers.append("ssd")
            else:
                break
        return tiers

    def snapshot(self) -> dict[str, list[bytes]]:
        """Every hash held, per tier (blocks waiting for the SSD count as DRAM)."""
        with self._cond:
            waiting = list(self._queue) + list(self._writing)
        dram = {_hash_of(key) for key in self.dram.keys()}
        dram.update(_hash_of(key) for key in waiting)
        return {"dram": list(dram), "ssd": [_hash_of(key) for key in self.ssd.keys()]}

    def stats(self) -> dict[str, int]:
        with self._cond:
            queued, queued_bytes = len(self._queue) + len(self._writing), self._queue_bytes
        return {
            "dram_blocks": len(self.dram), "dram_bytes": self.dram.bytes_used,
            "dram_budget_bytes": self.dram.budget_bytes, "dram_hits": self.dram.hits,
            "dram_misses": self.dram.misses, "dram_evictions": self.dram.evictions,
            **self.ssd.stats(),
            "writebehind_queued": queued, "writebehind_bytes": queued_bytes,
            "writebehind_dropped": self.writebehind_dropped, "writebehind_errors": self.writebehind_errors,
            "put_blocks": self.put_blocks, "get_requests": self.get_requests, "blocks_served": self.blocks_served,
        }

    # ---- write-behind ------------------------------------------------------------------

    def _pending(self, key: bytes) -> bytes | None:
        with self._cond:
            payload = self._queue.get(key)
            return payload if payload is not None else self._writing.get(key)

    def _spill(self, evicted: list[tuple[bytes, bytes]]) -> None:
        """Queue DRAM evictions for the SSD (those not there already); never blocks."""
        left_dram = [_hash_of(key) for key, payload in evicted if key not in self.dram]
        with self._cond:
            for key, payload in evicted:
                if key in self.ssd or key in self._queue or key in self._writing or key in self.dram:
                    continue
                if self._queue_bytes + len(payload) > self.writebehind_bytes:
                    # The disk cannot keep up: losing a cache block is better than stalling puts.
                    self.writebehind_dropped += 1
                    continue
                self._queue[key] = payload
                self._queue_bytes += len(payload)
            self._cond.notify_all()  # flush() may wait on the same condition
        if left_dram:
            self._emit("evicted", "dram", left_dram)

    def _writer_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping and drained
                batch_bytes = 0
                while self._queue and len(self._writing) < _BATCH_BLOCKS and batch_bytes < _BATCH_BYTES:
                    key, payload = self._queue.popitem(last=False)
                    self._queue_bytes -= len(payload)
                    self._writing[key] = payload
                    batch_bytes += len(payload)
                batch = list(self._writing.items())
            try:
                stored, victims = self.ssd.put_many(batch)
            except Exception:  # a disk error must not kill the writer: count, log, drop the batch
                logger.exception("ssd write of %d block(s) failed", len(batch))
                self.writebehind_errors += 1
                stored, victims = [], []
            with self._cond:
                self._writing.clear()
                self._cond.notify_all()
            if victims:
                self._emit("evicted", "ssd", [_hash_of(key) for key in victims])
            if stored:
                self._emit("stored", "ssd", [_hash_of(key) for key in stored])

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued block reached the SSD; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._writing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout_s: float = 30.0) -> None:
        """Drain the write-behind queue (up to `timeout_s`), stop the writer, close LMDB."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._writer.join(timeout_s)
        if self._writer.is_alive():
            logger.warning("write-behind did not drain in %.0f s: %d block(s) not written",
                           timeout_s, len(self._queue))
            with self._cond:
                self._queue.clear()
            self._writer.join(5.0)
        self.ssd.close()
