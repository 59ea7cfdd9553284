"""The encoder's embedding cache: image embeddings by content hash, least recently used out first.

An image's embedding depends only on its pixels (the content hash covers the decoded RGB pixels
and the size, `common.image_inputs`) and on the vision tower, so a repeated image (the same
picture in every turn of a chat, a logo in many requests) is encoded once. The budget is in
bytes, since one large image's embedding weighs as much as hundreds of small ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

__all__ = ["EmbeddingCache"]


class EmbeddingCache:
    """A thread-safe LRU of `[num_tokens, hidden]` tensors under a byte budget (0: disabled)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"the embedding cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the encode thread inserts while the loop reads stats
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    @property
    def bytes_used(self) -> int:
        return self._bytes

    def get(self, key: str) -> torch.Tensor | None:
        """The cached embedding (now most recently used), or None; counts a hit or a miss."""
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return tensor

    def put(self, key: str, tensor: torch.Tensor) -> bool:
        """Cache `tensor` under `key`, evicting the least recently used to make room; False when
        it is larger than the whole budget (not cached)."""
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return False
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
            # A private contiguous copy: the caller's tensor may view a bus frame or a batch.
            self._entries[key] = tensor.detach().contiguous().clone()
            self._bytes += size
        return True

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def stats(self) -> dict[str, float | int]:
        return {"embedding_cache_entries": len(self._entries), "embedding_cache_bytes": self._bytes,
                "embedding_cache_max_bytes": self.max_bytes, "embedding_cache_hits": self.hits,
                "embedding_cache_misses": self.misses, "embedding_cache_evictions": self.evictions,
                "embedding_cache_hit_rate": round(self.hit_rate, 4)}
