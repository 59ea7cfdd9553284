"""Tiered KV store hooks: prefix-cache events, offload on eviction, reload into a fresh engine."""

from __future__ import annotations

import pytest
import torch
from test_engine_handoff import PAGE, PAGE_BYTES, drain, make_engine, prompt, tiny_path, tokens  # noqa: F401

from common.engine import SamplingParams
from common.engine.block_manager import prefix_hashes

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
P1 = prompt(21, 20)  # 5 full pages
P2 = prompt(22, 44)  # with its outputs, needs all 12 pages of the small pool


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, list[bytes]]] = []
        self.offloaded: dict[bytes, torch.Tensor] = {}

    def on_event(self, kind: str, hashes: list[bytes]) -> None:
        self.events.append((kind, list(hashes)))

    def on_offload(self, hashes: list[bytes], payloads: list[torch.Tensor]) -> None:
        assert len(hashes) == len(payloads)
        for h, p in zip(hashes, payloads):
            self.offloaded[h] = p.clone()

    def hashes(self, kind: str) -> list[bytes]:
        return [h for k, hs in self.events if k == kind for h in hs]


@pytest.fixture(scope="module")
def offloaded(tiny_path):
    """Run P1, snapshot its cached pages, then P2 evicts them all through the offload hook."""
    engine = make_engine(tiny_path, pages=12)
    rec = Recorder()
    engine.store_hooks.set_kv_event_hook(rec.on_event)
    engine.store_hooks.set_offload_hook(rec.on_offload)
    engine.add_request("p1", P1, GREEDY)
    first = tokens(drain(engine)["p1"])
    hashes = engine.store_hooks.prefix_hashes(P1)
    assert hashes == prefix_hashes(P1, PAGE, engine.kv_namespace) and len(hashes) == 5
    assert engine.store_hooks.cached_prefix_pages(P1) == 5
    snapshot = {h: engine.store_hooks.page_payload(engine.block_manager._hash_to_page[h]) for h in hashes}
    assert rec.hashes("stored")[:5] == hashes
    engine.add_request("p2", P2, GREEDY)
    drain(engine)
    engine.check_integrity()
    return engine, rec, first, snapshot


def test_event_and_offload_hooks_fire_on_eviction(offloaded):
    engine, rec, _, snapshot = offloaded
    assert set(snapshot) <= set(rec.hashes("evicted"))
    assert set(rec.hashes("evicted")) == set(rec.offloaded)
    assert engine.store_hooks.cached_prefix_pages(P1) == 0
    for h, payload in snapshot.items():
        got = rec.offloaded[h]
        assert got.dtype == torch.uint8 and got.dim() == 1 and got.numel() == PAGE_BYTES
        assert torch.equal(got, payload)
    # The payload layout: [layers, 2, kv_heads, page_size, head_dim] in the cache dtype.
    raw = engine.store_hooks.page_payload(3).view(torch.float32).view(3, 2, 2, PAGE, 16)
    for layer in range(3):
        assert torch.equal(raw[layer], engine.kv_caches[layer][:, :, 3])


def test_reloaded_pages_give_prefix_hits_and_the_same_tokens(tiny_path, offloaded):
    _, _, first, _ = offloaded
    rec = offloaded[1]
    fresh = make_engine(tiny_path, pages=12)
    events: list[tuple[str, list[bytes]]] = []
    fresh.store_hooks.set_kv_event_hook(lambda kind, hs: events.append((kind, hs)))
    hashes = fresh.store_hooks.prefix_hashes(P1)
    payloads = [rec.offloaded[h] for h in hashes]
    # The chain must start at a cached page: page 2 cannot be inserted before pages 0 and 1.
    assert fresh.store_hooks.insert_cached_pages(P1, 2, payloads[2:]) == 0
    with pytest.raises(ValueError, match="bytes"):
        fresh.store_hooks.insert_cached_pages(P1, 0, [payloads[0][:-4]])
    assert fresh.store_hooks.insert_cached_pages(P1, 0, payloads[:2]) == 2
    assert fresh.store_hooks.cached_prefix_pages(P1) == 2
    # Overlapping pages already cached are skipped; raw bytes are accepted too.
    assert fresh.store_hooks.insert_cached_pages(P1, 1, [bytes(p.numpy()) for p in payloads[1:]]) == 3
    assert fresh.store_hooks.insert_cached_pages(P1, 0, payloads) == 0
    assert fresh.store_hooks.cached_prefix_pages(P1) == 5
    assert [h for kind, hs in events if kind == "stored" for h in hs] == hashes
    stats = fresh.load_stats()["prefix_cache"]
    assert stats["pages_evictable"] == 5 and stats["pages_used"] == 0
    fresh.check_integrity()

    fresh.add_request("again", P1, GREEDY)
    outs = drain(fresh)["again"]
    assert outs[0].num_cached_tokens == 16  # 4 of the 5 pages: one token is always recomputed
    assert tokens(outs) == first
    fresh.check_integrity()


def test_insert_stops_when_the_pool_is_full(tiny_path, offloaded):
    rec = offloaded[1]
    engine = make_engine(tiny_path, pages=12)
    hashes = engine.store_hooks.prefix_hashes(P1)
    engine.add_request("busy", prompt(23, 36), SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.block_manager.num_used_pages < 9:
        engine.step()
    free = engine.block_manager.num_free_pages
    assert free == 3
    assert engine.store_hooks.insert_cached_pages(P1, 0, [rec.offloaded[h] for h in hashes]) == 3
    assert engine.store_hooks.cached_prefix_pages(P1) == 3
    engine.check_integrity()
    drain(engine)  # the running request evicts what it needs; nothing referenced was touched
    engine.check_integrity()


def test_prefix_hashes_and_cached_prefix_pages_do_not_touch_the_cache(tiny_path):
    engine = make_engine(tiny_path, pages=12)
    engine.add_request("p1", P1, GREEDY)
    drain(engine)
    before = engine.load_stats()["prefix_cache"]
    order = list(engine.block_manager._evictable)
    assert engine.store_hooks.cached_prefix_pages(P1 + [1, 2, 3]) == 5
    assert engine.store_hooks.cached_prefix_pages([9] + P1) == 0
    assert engine.load_stats()["prefix_cache"] == before
    assert list(engine.block_manager._evictable) == order
