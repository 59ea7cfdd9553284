"""The scheduler's global prefix index: events, sequence gaps, snapshots, forget, match."""

from __future__ import annotations

import hashlib

from common.protocol import KvEvent
from services.scheduler.prefix_index import PrefixIndex


def h(i: int) -> bytes:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=32).digest()


def ev(source: str, seq: int, kind: str, tier: str, *ids: int) -> KvEvent:
    return KvEvent(source=source, seq=seq, kind=kind, tier=tier, hashes=[h(i) for i in ids])


def chain(n: int) -> list[bytes]:
    return [h(i) for i in range(n)]


def test_match_per_source_and_tier() -> None:
    index = PrefixIndex()
    assert index.apply(ev("w0", 0, "stored", "hbm", 0, 1, 2))
    assert index.apply(ev("w1", 0, "stored", "hbm", 0, 1))
    assert index.apply(ev("kv", 5, "snapshot", "dram", 0, 1, 2, 3))
    assert index.apply(ev("kv", 6, "snapshot", "ssd", 0, 1, 2, 3, 4, 5))
    assert index.match(chain(8)) == {
        "w0": {"hbm": 3}, "w1": {"hbm": 2}, "kv": {"dram": 4, "ssd": 6},
    }
    assert index.best(chain(8)) == ("kv", "ssd", 6)
    assert index.best(chain(2)) == ("w0", "hbm", 2) or index.best(chain(2)) == ("w1", "hbm", 2)
    assert index.best(chain(3), sources={"w1", "kv"}) == ("kv", "dram", 3)  # a tie goes to the faster tier
    assert index.match([h(9)] + chain(3)) == {}  # the run starts at the first hash
    assert index.best([]) is None


def test_hole_stops_the_run() -> None:
    index = PrefixIndex()
    index.apply(ev("w0", 0, "stored", "hbm", 0, 1, 3))
    assert index.match(chain(4)) == {"w0": {"hbm": 2}}


def test_evicted_and_sizes() -> None:
    index = PrefixIndex()
    index.apply(ev("w0", 0, "stored", "hbm", 0, 1, 2))
    assert index.apply(ev("w0", 1, "evicted", "hbm", 1))
    assert index.match(chain(3)) == {"w0": {"hbm": 1}}
    assert index.holds("w0", "hbm") == {h(0), h(2)}
    sizes = index.sizes()
    assert sizes["prefix_index_hashes"] == 2 and sizes["prefix_index_hbm_blocks"] == 2
    index.apply(ev("w0", 2, "evicted", "hbm", 0, 2, 7))  # evicting an unknown hash is harmless
    assert index.sizes()["prefix_index_hashes"] == 0


def test_gap_is_reported_and_snapshot_resyncs() -> None:
    index = PrefixIndex()
    assert index.apply(ev("w0", 0, "stored", "hbm", 0))
    assert index.apply(ev("w0", 1, "stored", "hbm", 1))
    # seq 2 (say "evicted 0") was lost; seq 3 arrives: applied, but a resync is needed.
    assert not index.apply(ev("w0", 3, "stored", "hbm", 2))
    assert index.gaps == 1
    assert index.match(chain(3)) == {"w0": {"hbm": 3}}  # stale: 0 is gone in truth
    assert index.apply(ev("w0", 4, "stored", "hbm", 5))  # in order again after the gap
    # The snapshot replaces the tier's whole set and resets the expected seq.
    assert index.apply(ev("w0", 10, "snapshot", "hbm", 1, 2, 5))
    assert index.holds("w0", "hbm") == {h(1), h(2), h(5)}
    assert index.match(chain(3)) == {}
    assert index.apply(ev("w0", 11, "stored", "hbm", 0))
    assert index.match(chain(3)) == {"w0": {"hbm": 3}}


def test_restarted_source_is_a_gap() -> None:
    index = PrefixIndex()
    index.apply(ev("kv", 1000, "snapshot", "ssd", 0, 1))
    assert index.apply(ev("kv", 1001, "stored", "ssd", 2))
    # A restarted kvstore numbers its events from a new start: never the expected one.
    assert not index.apply(ev("kv", 5000, "stored", "dram", 3))
    assert index.expected_seq("kv") == 5001


def test_unknown_source_needs_snapshot_unless_it_starts_at_zero() -> None:
    index = PrefixIndex()
    assert not index.apply(ev("kv", 77, "stored", "dram", 0))  # holdings before 77 unknown
    assert index.match(chain(1)) == {"kv": {"dram": 1}}  # but what it said is applied
    assert index.apply(ev("w9", 0, "stored", "hbm", 0))  # a fresh worker starts empty at 0
    assert index.apply(ev("kv2", 3, "snapshot", "ssd", 0))


def test_snapshot_only_replaces_its_own_tier() -> None:
    index = PrefixIndex()
    index.apply(ev("kv", 0, "stored", "dram", 0, 1))
    index.apply(ev("kv", 1, "stored", "ssd", 0, 1, 2))
    index.apply(ev("kv", 2, "snapshot", "dram", 0))
    assert index.match(chain(3)) == {"kv": {"dram": 1, "ssd": 3}}
    index.apply(ev("kv", 3, "snapshot", "ssd"))  # empty snapshot
    assert index.match(chain(3)) == {"kv": {"dram": 1}}


def test_forget_drops_a_source() -> None:
    index = PrefixIndex()
    index.apply(ev("w0", 0, "stored", "hbm", 0, 1))
    index.apply(ev("w1", 0, "stored", "hbm", 0))
    index.forget("w0")
    assert index.match(chain(2)) == {"w1": {"hbm": 1}}
    assert index.expected_seq("w0") is None and "w0" not in index.sources()
    assert index.sizes()["prefix_index_hbm_blocks"] == 1
    assert index.apply(ev("w0", 0, "stored", "hbm", 1))  # a restarted worker starts over at 0


def test_bad_kind_or_tier_is_ignored() -> None:
    index = PrefixIndex()
    assert index.apply(ev("w0", 0, "weird", "hbm", 0))
    assert index.apply(ev("w0", 0, "stored", "tape", 0))
    assert index.events_refused == 2 and index.match(chain(1)) == {}
    assert index.apply(ev("w0", 0, "stored", "hbm", 0))  # did not consume a seq


def test_match_many_holders_long_chain() -> None:
    index = PrefixIndex()
    for w in range(20):
        index.apply(ev(f"w{w}", 0, "stored", "hbm", *range(w * 5)))
    result = index.match(chain(200))
    assert {source: tiers["hbm"] for source, tiers in result.items()} == {f"w{w}": w * 5 for w in range(1, 20)}
    assert index.best(chain(200)) == ("w19", "hbm", 95)
