"""The kvstore's tiers on real LMDB files: LRU and budgets, write-behind, promotion, checksums,
truncation, map_size growth, and persistence across a reopen."""

from __future__ import annotations

import hashlib
import threading

import lmdb
import pytest

from services.kvstore.dram_tier import DramTier
from services.kvstore.ssd_tier import HEADER, DirectoryInUse, SsdTier, encode_value
from services.kvstore.store import KvStore, namespace_key

NS = "model-a|float32|16"


def h(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def block(i: int, size: int = 1000) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=64).digest() * (size // 64) + bytes(size % 64)


# ---------------------------------------------------------------------------------- DRAM tier


def test_dram_lru_under_budget() -> None:
    tier = DramTier(3000)
    for i in range(3):
        assert tier.put(h(i), block(i)) == (True, [])
    assert tier.get(h(0)) == block(0)  # 0 is now the most recent
    stored, evicted = tier.put(h(3), block(3))
    assert stored and [key for key, _ in evicted] == [h(1)]
    assert tier.bytes_used == 3000 and len(tier) == 3
    assert tier.get(h(1)) is None and tier.misses == 1 and tier.evictions == 1


def test_dram_oversized_and_repeated_put() -> None:
    tier = DramTier(1500)
    assert tier.put(h(0), block(0)) == (True, [])
    assert tier.put(h(0), block(0)) == (False, [])  # refresh only
    stored, evicted = tier.put(h(1), block(1, 2000))
    assert not stored and evicted == [(h(1), block(1, 2000))]  # bigger than the whole budget
    assert h(0) in tier and tier.bytes_used == 1000


# ----------------------------------------------------------------------------------- SSD tier


def test_ssd_budget_evicts_oldest(tmp_path) -> None:
    tier = SsdTier(tmp_path / "ssd", budget_bytes=3 * (1000 + HEADER.size))
    try:
        tier.put_many([(h(i), block(i)) for i in range(3)])
        assert tier.get(h(0)) == (block(0), False)  # refresh 0
        stored, evicted = tier.put_many([(h(3), block(3))])
        assert stored == [h(3)] and evicted == [h(1)]
        assert tier.get(h(1)) == (None, False)
        assert len(tier) == 3 and tier.bytes_used <= tier.budget_bytes
    finally:
        tier.close()


def test_ssd_reopen_keeps_blocks_and_order(tmp_path) -> None:
    path = tmp_path / "ssd"
    tier = SsdTier(path, budget_bytes=3 * (1000 + HEADER.size))
    tier.put_many([(h(i), block(i)) for i in range(3)])
    tier.close()
    tier = SsdTier(path, budget_bytes=3 * (1000 + HEADER.size))
    try:
        assert len(tier) == 3 and tier.bytes_used == 3 * (1000 + HEADER.size)
        assert tier.get(h(2)) == (block(2), False)
        _, evicted = tier.put_many([(h(3), block(3))])
        assert evicted == [h(0)]  # the index came back oldest write first
    finally:
        tier.close()


def test_ssd_directory_lock(tmp_path) -> None:
    tier = SsdTier(tmp_path / "ssd", budget_bytes=1 << 20)
    try:
        with pytest.raises(DirectoryInUse):
            SsdTier(tmp_path / "ssd", budget_bytes=1 << 20)
    finally:
        tier.close()


def _rewrite_value(path, key: bytes, transform) -> None:
    env = lmdb.open(str(path), subdir=True)
    try:
        with env.begin(write=True) as txn:
            txn.put(key, transform(bytes(txn.get(key))))
    finally:
        env.close()


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "empty", "torn"])
def test_ssd_damaged_value_is_a_miss(tmp_path, damage: str) -> None:
    path = tmp_path / "ssd"
    tier = SsdTier(path, budget_bytes=1 << 20)
    tier.put_many([(h(0), block(0)), (h(1), block(1))])
    tier.close()

    def flip(value: bytes) -> bytes:
        middle = HEADER.size + 500
        return value[:middle] + bytes([value[middle] ^ 0xFF]) + value[middle + 1 :]

    transforms = {
        "flip": flip,
        "truncate": lambda value: value[:-100],
        "header": lambda value: b"JUNK" + value[4:],
        "empty": lambda value: b"",
        # A header that matches the value's length over a payload it was not computed for.
        "torn": lambda value: encode_value(h(0), block(0), 1)[: HEADER.size] + block(5),
    }
    _rewrite_value(path, h(0), transforms[damage])
    tier = SsdTier(path, budget_bytes=1 << 20)
    try:
        payload, damaged = tier.get(h(0))
        if damage in ("truncate", "header", "empty"):
            # Found already at open (the header does not match the value), removed there.
            assert (payload, damaged) == (None, False)
        else:
            assert (payload, damaged) == (None, True)
        assert tier.corrupt_entries == 1 and h(0) not in tier
        assert tier.get(h(1)) == (block(1), False)  # the neighbour is untouched
    finally:
        tier.close()
    env = lmdb.open(str(path), subdir=True)
    with env.begin() as txn:
        assert txn.get(h(0)) is None  # deleted on disk too
    env.close()


def test_ssd_map_size_grows(tmp_path) -> None:
    tier = SsdTier(tmp_path / "ssd", budget_bytes=16 << 20, initial_map_size=1 << 20)
    try:
        start = tier.map_size
        for i in range(40):  # 40 x 100 KB, far past the 1 MiB map
            stored, _ = tier.put_many([(h(i), block(i, 100_000))])
            assert stored == [h(i)]
        assert tier.map_grows >= 1 and tier.map_size > start
        assert all(tier.get(h(i)) == (block(i, 100_000), False) for i in range(40))
    finally:
        tier.close()
    tier = SsdTier(tmp_path / "ssd", budget_bytes=16 << 20, initial_map_size=1 << 20)
    try:  # reopened with the small initial size: LMDB keeps the grown map, nothing is lost
        assert len(tier) == 40 and tier.get(h(0)) == (block(0, 100_000), False)
    finally:
        tier.close()


def test_ssd_reads_run_beside_writes(tmp_path) -> None:
    tier = SsdTier(tmp_path / "ssd", budget_bytes=8 << 20, initial_map_size=1 << 20)
    tier.put_many([(h(0), block(0))])
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(300):
                assert tier.get(h(0)) == (block(0), False)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(1, 60):  # growing the map several times while the reader reads
            tier.put_many([(h(i), block(i, 50_000))])
    finally:
        thread.join()
        tier.close()
    assert not errors and tier.map_grows >= 1


def test_ssd_map_cap_evicts_instead(tmp_path) -> None:
    # A map that cannot grow: writes still succeed by evicting old entries.
    tier = SsdTier(tmp_path / "ssd", budget_bytes=64 << 20, initial_map_size=1 << 20, max_map_size=1 << 20)
    try:
        for i in range(30):
            tier.put_many([(h(i), block(i, 100_000))])
        assert h(29) in tier and len(tier) < 30 and tier.map_grows == 0
    finally:
        tier.close()


# ------------------------------------------------------------------------------------ store


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[str, str, list[bytes]]] = []

    def __call__(self, kind: str, tier: str, hashes: list[bytes]) -> None:
        with self.lock:
            self.items.append((kind, tier, list(hashes)))

    def of(self, kind: str, tier: str) -> list[bytes]:
        with self.lock:
            return [x for k, t, hs in self.items if (k, t) == (kind, tier) for x in hs]


def test_store_write_behind_and_promotion(tmp_path) -> None:
    events = Events()
    store = KvStore(tmp_path / "kv", dram_bytes=2000, ssd_bytes=1 << 20, on_event=events)
    try:
        assert store.put(NS, [h(i) for i in range(5)], [block(i) for i in range(5)]) == 5
        assert store.flush(30)
        stats = store.stats()
        assert stats["dram_blocks"] == 2 and stats["ssd_blocks"] == 3 and stats["dram_evictions"] == 3
        assert events.of("evicted", "dram") == [h(0), h(1), h(2)]
        assert sorted(events.of("stored", "ssd")) == sorted([h(0), h(1), h(2)])

        found = store.get(NS, [h(i) for i in range(6)])
        assert [x[0] for x in found] == [h(i) for i in range(5)]
        assert [x[2] for x in found] == [block(i) for i in range(5)]
        assert [x[1] for x in found][:3] == ["ssd", "ssd", "ssd"]
        assert h(2) in events.of("stored", "dram")  # promoted
        assert store.stats()["ssd_hits"] == 3
        # Promoted blocks stay on the SSD: evicting them again writes nothing new.
        writes = store.stats()["ssd_writes"]
        store.put(NS, [h(10), h(11)], [block(10), block(11)])
        assert store.flush(30)
        assert store.stats()["ssd_writes"] == writes + sum(
            1 for x in (h(3), h(4)) if x in events.of("stored", "ssd"))
    finally:
        store.close()


def test_store_leading_run_and_namespaces(tmp_path) -> None:
    store = KvStore(tmp_path / "kv", dram_bytes=1 << 20, ssd_bytes=1 << 20)
    try:
        store.put(NS, [h(0), h(2)], [block(0), block(2)])
        assert [x[0] for x in store.get(NS, [h(0), h(1), h(2)])] == [h(0)]  # stops at the hole
        assert store.get(NS, [h(1), h(2)]) == []
        assert store.get("model-b|float32|16", [h(0)]) == []  # other model, same hash: a miss
        assert store.lookup(NS, [h(0), h(1)]) == ["dram"]
        assert store.get(NS, [h(0), h(2)], max_bytes=1500) == [(h(0), "dram", block(0))]
        with pytest.raises(ValueError):
            store.put(NS, [h(0)], [])
    finally:
        store.close()


def test_store_reopen_serves_ssd_and_drops_corrupt(tmp_path) -> None:
    path = tmp_path / "kv"
    store = KvStore(path, dram_bytes=1000, ssd_bytes=1 << 20)
    store.put(NS, [h(i) for i in range(4)], [block(i) for i in range(4)])
    store.close()  # drains the write-behind queue: 0, 1, 2 are on the SSD
    _rewrite_value(path, namespace_key(NS, h(1)), lambda v: v[:-1] + bytes([v[-1] ^ 1]))
    events = Events()
    store = KvStore(path, dram_bytes=1000, ssd_bytes=1 << 20, on_event=events)
    try:
        assert store.lookup(NS, [h(0), h(1), h(2)]) == ["ssd", "ssd", "ssd"]  # not verified yet
        found = store.get(NS, [h(0), h(1), h(2)])
        assert found == [(h(0), "ssd", block(0))]  # the damaged block is a miss, never wrong KV
        assert store.stats()["corrupt_entries"] == 1
        assert events.of("evicted", "ssd") == [h(1)]
        assert store.lookup(NS, [h(0), h(1)]) == ["dram"]
        assert sorted(store.snapshot()["ssd"]) == sorted([h(0), h(2)])
    finally:
        store.close()


def test_store_write_behind_bound_drops(tmp_path) -> None:
    store = KvStore(tmp_path / "kv", dram_bytes=1000, ssd_bytes=1 << 20, writebehind_bytes=0)
    try:
        store.put(NS, [h(0), h(1)], [block(0), block(1)])
        assert store.stats()["writebehind_dropped"] == 1  # the queue takes nothing at all
        assert store.get(NS, [h(0)]) == []
    finally:
        store.close()
