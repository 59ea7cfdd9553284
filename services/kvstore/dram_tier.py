"""The kvstore's DRAM tier: an LRU map from block key to payload bytes under a byte budget.

Pure data structure, not thread-safe: the store calls it from the event loop thread only.
Evicted entries are handed back to the caller (the store writes them behind to the SSD tier),
so the tier itself never blocks on disk.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

__all__ = ["DramTier"]


class DramTier:
    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("the DRAM budget must be >= 0")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()  # least recently used first
        self.bytes_used = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def keys(self) -> Iterator[bytes]:
        return iter(self._entries)

    def get(self, key: bytes) -> bytes | None:
        """The payload (and mark it most recently used), or None."""
        payload = self._entries.get(key)
        if payload is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return payload

    def put(self, key: bytes, payload: bytes) -> tuple[bool, list[tuple[bytes, bytes]]]:
        """Insert or refresh `key`; returns (stored, evicted entries, oldest first).

        A payload bigger than the whole budget is not kept: it comes back as evicted at once,
        so the store can still send it to the SSD tier. Re-putting a present key only refreshes
        its recency (the content is addressed by hash, so it cannot differ).
        """
        if key in self._entries:
            self._entries.move_to_end(key)
            return False, []
        size = len(payload)
        if size > self.budget_bytes:
            return False, [(key, payload)]
        evicted: list[tuple[bytes, bytes]] = []
        while self.bytes_used + size > self.budget_bytes and self._entries:
            old_key, old_payload = self._entries.popitem(last=False)
            self.bytes_used -= len(old_payload)
            self.evictions += 1
            evicted.append((old_key, old_payload))
        self._entries[key] = payload
        self.bytes_used += size
        return True, evicted

    def pop(self, key: bytes) -> bytes | None:
        payload = self._entries.pop(key, None)
        if payload is not None:
            self.bytes_used -= len(payload)
        return payload
