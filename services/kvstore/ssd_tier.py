"""The kvstore's SSD tier: KV blocks in an LMDB environment under a byte budget.

Each value is a fixed header (magic, format version, payload length, write sequence, checksum)
followed by the payload. A batch of blocks is written in one LMDB transaction, so a reader sees
a block whole or not at all, and a process killed mid-write leaves the previous state. The
checksum (blake2b over key, length and payload) is verified on every read: a corrupted or
truncated value is a miss, deleted, and counted; it is never returned as KV.

Eviction is LRU over an in-memory index (key -> stored size) rebuilt at open from the headers,
oldest write first (reads refresh recency only in memory: not worth a disk write). LMDB's
`map_size` starts small and doubles on `MapFullError`, up to a cap derived from the budget.

Thread-safe, and a read never waits for a write's commit (fsync): LMDB readers run beside its
one writer. `_write_lock` serializes writers; `_index_lock` guards the in-memory index (held
only for dict operations); the reader gate lets `_grow_map` wait until no read transaction is
open, since LMDB resizes the map only when this process has no transaction active.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path

import lmdb

__all__ = ["SsdTier", "HEADER", "DirectoryInUse", "encode_value"]

logger = logging.getLogger(__name__)

MAGIC = b"XKVB"
FORMAT_VERSION = 1
# magic, version, flags, payload length, write sequence, checksum
HEADER = struct.Struct("<4sHHQQ16s")
_MIN_MAP_SIZE = 1 << 20


class DirectoryInUse(OSError):
    """Another live kvstore process holds this directory."""


def _checksum(key: bytes, payload: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(struct.pack("<HQ", len(key), len(payload)))
    h.update(key)
    h.update(payload)
    return h.digest()


def encode_value(key: bytes, payload: bytes, write_seq: int) -> bytes:
    """Header + payload as stored in LMDB (exposed for tests that forge damaged values)."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload), write_seq, _checksum(key, payload)) + payload


def _parse_header(value: memoryview) -> tuple[int, int, bytes] | None:
    """(payload length, write seq, checksum) when the header is sane and the length matches."""
    if len(value) < HEADER.size:
        return None
    magic, version, _flags, length, write_seq, digest = HEADER.unpack_from(value)
    if magic != MAGIC or version != FORMAT_VERSION or len(value) - HEADER.size != length:
        return None
    return length, write_seq, digest


class SsdTier:
    def __init__(
        self,
        path: str | os.PathLike,
        budget_bytes: int,
        *,
        initial_map_size: int = 64 << 20,
        max_map_size: int | None = None,
        sync: bool = True,
    ) -> None:
        if budget_bytes < 0:
            raise ValueError("the SSD budget must be >= 0")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.budget_bytes = budget_bytes
        # Room for LMDB's own pages (branch pages, free list) on top of the data.
        self.max_map_size = max_map_size or max(2 * budget_bytes + (64 << 20), initial_map_size)
        self._write_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._gate = threading.Condition()  # guards _readers / _resizing
        self._readers = 0
        self._resizing = False
        self._lock_file = self._take_directory_lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()  # key -> stored value size, LRU first
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.corrupt_entries = 0
        self.writes = 0
        self.map_grows = 0
        self._next_write_seq = 1
        self.env = lmdb.open(
            str(self.path), map_size=max(initial_map_size, _MIN_MAP_SIZE), subdir=True,
            readahead=False, sync=sync, metasync=sync, max_dbs=0, lock=True,
        )
        self.env.reader_check()  # clear reader slots a kill -9'd process left behind
        self._map_size = self.env.info()["map_size"]
        self._rebuild_index()

    # ---- lifecycle ----------------------------------------------------------------------

    def _take_directory_lock(self):
        lock_file = open(self.path / "kvstore.lock", "a+b")
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise DirectoryInUse(f"{self.path} is used by another kvstore process") from None
        return lock_file

    def _rebuild_index(self) -> None:
        entries: list[tuple[int, bytes, int]] = []
        damaged: list[bytes] = []
        with self.env.begin(buffers=True) as txn:
            for key, value in txn.cursor():
                header = _parse_header(value)
                if header is None:
                    damaged.append(bytes(key))
                    continue
                entries.append((header[1], bytes(key), len(value)))
        entries.sort()
        for write_seq, key, size in entries:
            self._index[key] = size
            self.bytes_used += size
            self._next_write_seq = max(self._next_write_seq, write_seq + 1)
        if damaged:
            logger.warning("ssd tier %s: %d damaged entr(ies) found at open, removed", self.path, len(damaged))
            self.corrupt_entries += len(damaged)
            self._delete_keys(damaged)
        if self.bytes_used > self.budget_bytes:  # the budget was lowered since the last run
            self._delete_keys(self._pick_victims(self.bytes_used - self.budget_bytes))

    def close(self) -> None:
        with self._write_lock, self._no_readers():
            self.env.close()
            self._lock_file.close()

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        with self._gate:
            while self._resizing:
                self._gate.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._gate:
                self._readers -= 1
                self._gate.notify_all()

    @contextlib.contextmanager
    def _no_readers(self) -> Iterator[None]:
        with self._gate:
            self._resizing = True
            while self._readers:
                self._gate.wait()
        try:
            yield
        finally:
            with self._gate:
                self._resizing = False
                self._gate.notify_all()

    # ---- reads --------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, key: bytes) -> bool:
        return key in self._index

    def keys(self) -> list[bytes]:
        with self._index_lock:
            return list(self._index)

    @property
    def map_size(self) -> int:
        return self._map_size

    def get(self, key: bytes) -> tuple[bytes | None, bool]:
        """(payload, False) on a hit; (None, True) when the entry was damaged (now deleted);
        (None, False) on a plain miss."""
        with self._index_lock:
            if key not in self._index:
                self.misses += 1
                return None, False
        payload = None
        with self._reading(), self.env.begin(buffers=True) as txn:
            value = txn.get(key)
            if value is not None:
                header = _parse_header(value)
                if header is not None and _checksum(key, value[HEADER.size:]) == header[2]:
                    payload = bytes(value[HEADER.size:])
        if payload is not None:
            with self._index_lock:
                if key in self._index:
                    self._index.move_to_end(key)
                self.hits += 1
            return payload, False
        if value is None:  # evicted between the index check and the read: a plain miss
            with self._index_lock:
                self.misses += 1
            return None, False
        logger.warning("ssd tier: block %s failed its checksum or is truncated: treated as a miss",
                       key[-32:].hex()[:16])
        with self._write_lock:
            self._delete_keys([key])
        with self._index_lock:
            self.misses += 1
            self.corrupt_entries += 1
        return None, True

    # ---- writes -------------------------------------------------------------------------

    def put_many(self, entries: Iterable[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes]]:
        """Write blocks in one transaction; returns (keys stored, keys evicted to make room).

        Present keys are only refreshed; a block bigger than the whole budget is skipped.
        """
        with self._write_lock:
            batch: dict[bytes, bytes] = {}
            with self._index_lock:
                for key, payload in entries:
                    if key in self._index:
                        self._index.move_to_end(key)
                    elif HEADER.size + len(payload) <= self.budget_bytes:
                        batch[key] = payload
            if not batch:
                return [], []
            freed_early: list[bytes] = []
            while True:
                incoming = sum(HEADER.size + len(p) for p in batch.values())
                if incoming > self.budget_bytes:  # a batch bigger than the budget: keep its tail
                    del batch[next(iter(batch))]
                    continue
                victims = self._pick_victims(self.bytes_used + incoming - self.budget_bytes)
                try:
                    values = self._write(batch, victims)
                    break
                except lmdb.MapFullError:
                    if self._grow_map():
                        continue
                    if not self._index:
                        logger.warning("ssd tier: map full with nothing left to evict; %d block(s) dropped",
                                       len(batch))
                        return [], freed_early
                    # At the map cap: free the oldest eighth in a transaction of its own (LMDB
                    # reuses freed pages only once the freeing transaction committed).
                    early = self._pick_victims(0, max(1, len(self._index) // 8))
                    self._delete_keys(early)
                    freed_early.extend(early)
            with self._index_lock:
                for key in victims:
                    self.bytes_used -= self._index.pop(key)
                self.evictions += len(victims) + len(freed_early)
                for key, size in values.items():
                    self._index[key] = size
                    self.bytes_used += size
                self.writes += len(values)
            return list(values), freed_early + victims

    def _write(self, batch: dict[bytes, bytes], victims: list[bytes]) -> dict[bytes, int]:
        sizes: dict[bytes, int] = {}
        seq = self._next_write_seq
        with self.env.begin(write=True) as txn:  # aborted (nothing written) if this raises
            for key in victims:
                txn.delete(key)
            for key, payload in batch.items():
                value = encode_value(key, payload, seq)
                seq += 1
                txn.put(key, value)
                sizes[key] = len(value)
        self._next_write_seq = seq
        return sizes

    def _pick_victims(self, need_bytes: int, extra: int = 0) -> list[bytes]:
        """Oldest keys whose sizes add up to `need_bytes`, plus `extra` more (map full)."""
        victims: list[bytes] = []
        freed = 0
        with self._index_lock:
            for key, size in self._index.items():
                if freed >= need_bytes and extra <= 0:
                    break
                if freed >= need_bytes:
                    extra -= 1
                victims.append(key)
                freed += size
        return victims

    def _grow_map(self) -> bool:
        current = self._map_size
        if current >= self.max_map_size:
            return False
        new_size = min(current * 2, self.max_map_size)
        with self._no_readers():
            self.env.set_mapsize(new_size)
            self._map_size = self.env.info()["map_size"]
        self.map_grows += 1
        logger.info("ssd tier: map_size %d -> %d", current, new_size)
        return True

    def delete(self, keys: Iterable[bytes]) -> list[bytes]:
        with self._write_lock:
            present = [key for key in keys if key in self._index]
            self._delete_keys(present)
            return present

    def _delete_keys(self, keys: list[bytes]) -> None:
        """Caller holds the write lock (or is __init__)."""
        if not keys:
            return
        with self.env.begin(write=True) as txn:
            for key in keys:
                txn.delete(key)
        with self._index_lock:
            for key in keys:
                size = self._index.pop(key, None)
                if size is not None:
                    self.bytes_used -= size

    def stats(self) -> dict[str, int]:
        map_size = self._map_size
        return {
            "ssd_blocks": len(self._index), "ssd_bytes": self.bytes_used, "ssd_budget_bytes": self.budget_bytes,
            "ssd_hits": self.hits, "ssd_misses": self.misses, "ssd_evictions": self.evictions,
            "ssd_writes": self.writes, "ssd_map_size": map_size, "ssd_map_grows": self.map_grows,
            "corrupt_entries": self.corrupt_entries,
        }
