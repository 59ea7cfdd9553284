"""The encoder's embedding cache: LRU order, byte budget, hit accounting, private copies."""

from __future__ import annotations

import pytest
import torch

from services.encoder.embedding_cache import EmbeddingCache


def _emb(rows: int, value: float = 1.0) -> torch.Tensor:
    return torch.full((rows, 4), value, dtype=torch.float32)  # 16 bytes per row


def test_hit_returns_the_same_values_and_counts() -> None:
    cache = EmbeddingCache(max_bytes=1024)
    assert cache.get("a") is None
    cache.put("a", _emb(2, 3.0))
    got = cache.get("a")
    assert got is not None and torch.equal(got, _emb(2, 3.0))
    assert (cache.hits, cache.misses) == (1, 1)
    assert cache.hit_rate == 0.5
    assert cache.stats()["embedding_cache_entries"] == 1


def test_least_recently_used_goes_first_under_the_byte_budget() -> None:
    cache = EmbeddingCache(max_bytes=3 * 32)  # three 2-row embeddings
    for key in "abc":
        cache.put(key, _emb(2))
    cache.get("a")  # a is now the most recent: b is the oldest
    cache.put("d", _emb(2))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.bytes_used == 96 and cache.evictions == 1
    cache.put("e", _emb(4))  # needs two slots: c and a go (a was used before d)
    assert "e" in cache and "d" in cache and "c" not in cache and "a" not in cache
    assert cache.bytes_used <= cache.max_bytes


def test_larger_than_the_budget_is_not_cached_and_evicts_nothing() -> None:
    cache = EmbeddingCache(max_bytes=64)
    cache.put("a", _emb(2))
    assert cache.put("huge", _emb(100)) is False
    assert "a" in cache and "huge" not in cache


def test_replacing_a_key_keeps_the_byte_count_right() -> None:
    cache = EmbeddingCache(max_bytes=1024)
    cache.put("a", _emb(2))
    cache.put("a", _emb(4))
    assert len(cache) == 1 and cache.bytes_used == 64


def test_cached_tensor_is_a_private_copy() -> None:
    cache = EmbeddingCache(max_bytes=1024)
    source = _emb(2, 1.0)
    cache.put("a", source)
    source.fill_(9.0)  # e.g. a bus frame reused, or a batch buffer overwritten
    assert torch.equal(cache.get("a"), _emb(2, 1.0))


def test_zero_budget_disables_and_negative_is_refused() -> None:
    cache = EmbeddingCache(max_bytes=0)
    assert cache.put("a", _emb(1)) is False and cache.get("a") is None
    with pytest.raises(ValueError, match="budget"):
        EmbeddingCache(max_bytes=-1)
