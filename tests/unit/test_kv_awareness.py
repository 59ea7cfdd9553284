"""The scheduler's view of KV placement: prefix index events -> cached prompt tokens per worker."""

from __future__ import annotations

import zmq.asyncio

from common.engine.block_manager import prefix_hashes
from common.protocol import KvEvent
from services.scheduler.kv_awareness import KvAwareness
from services.scheduler.registry import Instance

PAGE = 4
NS = "model|float32|4"


def worker(instance_id: str) -> Instance:
    return Instance(instance_id=instance_id, identity=instance_id.encode(), role="mixed", kv_addr="", num_pages=64,
                    page_size=PAGE, model="m", max_model_len=4096, registered_at=0.0, last_heartbeat=0.0,
                    kv_namespace=NS)


def test_cached_tokens_follow_worker_events_and_keep_the_last_token_uncached() -> None:
    kv = KvAwareness(zmq.asyncio.Context.instance())
    prompt = list(range(1, 18))  # 17 tokens: 4 full pages
    hashes = prefix_hashes(prompt, PAGE, NS)
    a, b = worker("a"), worker("b")
    assert kv.on_worker_event(KvEvent(source="a", seq=0, kind="stored", tier="hbm", hashes=hashes[:3]))
    assert kv.on_worker_event(KvEvent(source="b", seq=0, kind="stored", tier="hbm", hashes=hashes))
    assert kv.cached_tokens([a, b], prompt) == {"a": 12, "b": 16}
    # A prompt of exactly 4 pages: its last token is always computed, so at most 15 are cached.
    assert kv.cached_tokens([b], prompt[:16])["b"] == 15
    assert kv.on_worker_event(KvEvent(source="b", seq=1, kind="evicted", tier="hbm", hashes=hashes[1:]))
    assert kv.cached_tokens([a, b], prompt) == {"a": 12, "b": 4}


def test_a_gap_asks_for_a_snapshot_and_forget_drops_a_worker() -> None:
    kv = KvAwareness(zmq.asyncio.Context.instance())
    hashes = prefix_hashes(list(range(8)), PAGE, NS)
    assert kv.on_worker_event(KvEvent(source="a", seq=0, kind="stored", tier="hbm", hashes=hashes[:1]))
    assert not kv.on_worker_event(KvEvent(source="a", seq=5, kind="stored", tier="hbm", hashes=hashes[1:]))
    assert kv.on_worker_event(KvEvent(source="a", seq=9, kind="snapshot", tier="hbm", hashes=hashes))
    assert kv.cached_tokens([worker("a")], list(range(9)))["a"] == 8
    kv.forget("a")
    assert kv.cached_tokens([worker("a")], list(range(9)))["a"] == 0


def test_workers_without_a_known_layout_are_left_out() -> None:
    kv = KvAwareness(zmq.asyncio.Context.instance())
    unknown = worker("x")
    unknown.kv_namespace = ""
    assert kv.cached_tokens([unknown], list(range(20))) == {}
