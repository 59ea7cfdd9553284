"""The global prefix index: which KV holder has which prefix blocks, in which tier.

Built from KvEvents: workers report their HBM blocks, the kvstore its DRAM and SSD blocks. Pure
data structure (no sockets); the scheduler feeds it events and sends a KvSnapshotRequest when
`apply` says it missed one.

Sequence numbers: each source numbers its events one by one. An event whose `seq` is not the
expected one means events were lost (a PUB subscriber dropped them, or the source restarted and
started a new sequence): the event is still applied (it is the newest news) but `apply` returns
False, and the caller must ask that source for a snapshot. A `snapshot` event replaces the
source's set for its tier and resets the expected seq. A source never seen before is trusted
only when its first event is a snapshot or has seq 0 (a holder that starts empty numbers its
events from 0); otherwise its holdings are unknown and `apply` returns False.

Lookups are proportional to the matched prefix: `hash -> {(source, tier)}` holders, walked from
the first hash while any holder still holds the run.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from common.protocol import KvEvent

__all__ = ["PrefixIndex", "TIERS", "TIER_RANK"]

TIERS = ("hbm", "dram", "ssd")
# Where a reused block is cheapest to get from: already on the worker, then memory, then disk.
TIER_RANK = {"hbm": 0, "dram": 1, "ssd": 2}
_KINDS = ("stored", "evicted", "snapshot")

Holder = tuple[str, str]  # (source, tier)


class PrefixIndex:
    def __init__(self) -> None:
        self._holders: dict[bytes, set[Holder]] = {}
        self._held: dict[Holder, set[bytes]] = {}
        self._next_seq: dict[str, int] = {}
        self.gaps = 0  # resyncs asked for (metric)
        self.events_applied = 0
        self.events_refused = 0

    # ---- updates ------------------------------------------------------------------------

    def apply(self, event: KvEvent) -> bool:
        """Apply one event; False when the caller must send a KvSnapshotRequest to
        `event.source` (a gap in its seq, or an unknown source). An event with an unknown kind
        or tier is ignored (counted) and asks for nothing."""
        if event.kind not in _KINDS or event.tier not in TIER_RANK:
            self.events_refused += 1
            return True
        self.events_applied += 1
        holder = (event.source, event.tier)
        expected = self._next_seq.get(event.source)
        self._next_seq[event.source] = event.seq + 1
        if event.kind == "snapshot":
            self._replace(holder, event.hashes)
            return True
        if event.kind == "stored":
            self._add(holder, event.hashes)
        else:
            self._remove(holder, event.hashes)
        in_order = event.seq == expected if expected is not None else event.seq == 0
        if not in_order:
            self.gaps += 1
        return in_order

    def forget(self, source: str) -> None:
        """Drop everything a source held (a worker died or deregistered)."""
        for tier in TIERS:
            self._replace((source, tier), ())
        self._next_seq.pop(source, None)

    def _add(self, holder: Holder, hashes: Iterable[bytes]) -> None:
        held = self._held.get(holder)
        for block_hash in hashes:
            if held is None:  # created on the first hash: no empty sets left behind
                held = self._held[holder] = set()
            if block_hash not in held:
                held.add(block_hash)
                self._holders.setdefault(block_hash, set()).add(holder)

    def _remove(self, holder: Holder, hashes: Iterable[bytes]) -> None:
        held = self._held.get(holder)
        if not held:
            return
        for block_hash in hashes:
            if block_hash in held:
                held.discard(block_hash)
                holders = self._holders[block_hash]
                holders.discard(holder)
                if not holders:
                    del self._holders[block_hash]
        if not held:
            del self._held[holder]

    def _replace(self, holder: Holder, hashes: Iterable[bytes]) -> None:
        old = self._held.get(holder, set())
        new = set(hashes)
        self._remove(holder, old - new)
        self._add(holder, new - old)

    # ---- queries ------------------------------------------------------------------------

    def match(self, hashes: Sequence[bytes]) -> dict[str, dict[str, int]]:
        """For each source holding at least the first hash: the length of the leading run of
        `hashes` it holds, per tier (tiers with a run of 0 are left out)."""
        result: dict[str, dict[str, int]] = {}
        if not hashes:
            return result
        alive = set(self._holders.get(hashes[0], ()))
        position = 1
        while alive and position < len(hashes):
            holders = self._holders.get(hashes[position], ())
            for holder in alive - holders if holders else list(alive):
                result.setdefault(holder[0], {})[holder[1]] = position
            alive = alive & holders if holders else set()
            position += 1
        for source, tier in alive:
            result.setdefault(source, {})[tier] = position
        return result

    def best(self, hashes: Sequence[bytes], sources: Iterable[str] | None = None) -> tuple[str, str, int] | None:
        """(source, tier, run length) of the longest leading run; ties go to the faster tier.
        `sources` limits the candidates (e.g. to live workers plus the kvstore)."""
        allowed = set(sources) if sources is not None else None
        choice: tuple[str, str, int] | None = None
        for source, tiers in self.match(hashes).items():
            if allowed is not None and source not in allowed:
                continue
            for tier, run in tiers.items():
                if choice is None or (run, -TIER_RANK[tier]) > (choice[2], -TIER_RANK[choice[1]]):
                    choice = (source, tier, run)
        return choice

    def holds(self, source: str, tier: str) -> frozenset[bytes]:
        return frozenset(self._held.get((source, tier), ()))

    def sources(self) -> set[str]:
        return {source for source, _ in self._held} | set(self._next_seq)

    def expected_seq(self, source: str) -> int | None:
        return self._next_seq.get(source)

    def sizes(self) -> dict[str, int]:
        """For metrics: distinct hashes, and blocks per tier summed over sources."""
        per_tier = {f"prefix_index_{tier}_blocks": 0 for tier in TIERS}
        for (_, tier), held in self._held.items():
            per_tier[f"prefix_index_{tier}_blocks"] += len(held)
        return {"prefix_index_hashes": len(self._holders), **per_tier,
                "prefix_index_sources": len(self.sources()), "prefix_index_gaps": self.gaps}
