"""DP load balance: which running sequences to move between decode-capable instances (pure).

Routing spreads new requests, but load still skews: a burst lands while one worker is slow to
heartbeat, a prefix pins requests to the worker caching it, a worker joins late. The balancer
looks at the instances' load (the sequences each holds, free KV pages, batch slots) every tick
and, when one decode-capable instance is overloaded and another has room, plans "move request
R from A to B" (the worker side moves the sequence: services/worker/migrations.py).

- Trigger (with hysteresis): A's load exceeds B's by at least `threshold` sequences ("running"),
  or A's free KV pages fell under `kv_low_ratio` while B has three times that ("kv_pages");
  once a pair is being balanced, moves go on until the gap is under `release_gap`.
- Room: the target keeps a batch slot and its free pages hold the sequence's prompt and output.
- Damping: at most `max_per_tick` moves a tick, none from or to an instance within `cooldown_s`
  of its last one, never the same request twice within `recent_window_s`, and the planned moves
  count as done for the rest of the tick (the next heartbeat shows them).
- Which sequence: decode-phase single-choice requests only (older than `min_age_s`; the worker
  refuses anything else), fewest tokens to move first (prompt, then age as a stand-in for tokens
  generated), longest remaining output (max_tokens) breaking ties.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["BalanceSettings", "InstanceLoad", "Candidate", "Migration", "BalanceState", "plan_migrations"]


@dataclass(frozen=True)
class BalanceSettings:
    threshold: int = 4  # sequences more on the source than on the target to start moving
    release_gap: int = 2  # ...and go on moving (same pair) while the gap is at least this
    max_per_tick: int = 2
    cooldown_s: float = 1.0
    recent_window_s: float = 10.0
    min_age_s: float = 0.5
    kv_low_ratio: float = 0.1

    def problems(self) -> list[str]:
        problems = []
        if self.threshold < 2:
            problems.append("--dp-balance-threshold must be >= 2 (moving one sequence must narrow the gap)")
        if self.max_per_tick < 1:
            problems.append("--dp-balance-max-per-tick must be >= 1")
        if self.cooldown_s < 0 or self.recent_window_s < 0 or self.min_age_s < 0:
            problems.append("--dp-balance cooldown, window and minimum age must be >= 0")
        if not 0 <= self.kv_low_ratio < 1:
            problems.append("--dp-balance-kv-low-ratio must be in [0, 1)")
        return problems


@dataclass(frozen=True)
class InstanceLoad:
    """One decode-capable, live instance: the sequences it holds (`running` + `waiting`; the
    scheduler passes its request table's count, fresher than a heartbeat) and its last reported
    pages and batch size."""

    instance_id: str
    running: int
    waiting: int
    free_pages: int
    total_pages: int
    page_size: int
    max_num_seqs: int  # 0: not known

    @property
    def load(self) -> int:
        return self.running + self.waiting

    @property
    def free_ratio(self) -> float:
        return self.free_pages / self.total_pages if self.total_pages else 1.0


@dataclass(frozen=True)
class Candidate:
    """A request the scheduler's table places on an instance."""

    request_id: str
    instance_id: str
    prompt_len: int
    max_tokens: int  # 0: not known
    age_s: float  # since it was submitted (or last moved)
    n: int = 1


@dataclass(frozen=True)
class Migration:
    request_id: str
    source: str
    target: str
    reason: str  # "running" or "kv_pages"
    est_tokens: int  # the sequence's tokens as far as the scheduler can tell (prompt + max output)


@dataclass
class BalanceState:
    """What the balancer remembers between ticks."""

    last_move_at: dict[str, float] = field(default_factory=dict)  # instance -> last move from/to it
    moved_at: dict[str, float] = field(default_factory=dict)  # request -> when it was last moved
    active_pairs: set[tuple[str, str]] = field(default_factory=set)  # being balanced (hysteresis)

    def note(self, migration: Migration, now: float) -> None:
        self.last_move_at[migration.source] = self.last_move_at[migration.target] = now
        self.moved_at[migration.request_id] = now

    def prune(self, now: float, window_s: float) -> None:
        self.moved_at = {rid: t for rid, t in self.moved_at.items() if now - t < window_s}


def _pages_for(candidate: Candidate, page_size: int) -> int:
    return -(-(candidate.prompt_len + candidate.max_tokens) // max(1, page_size))


def _has_room(target: InstanceLoad, load: int, free_pages: int, candidate: Candidate) -> bool:
    if target.max_num_seqs and load >= target.max_num_seqs:
        return False
    return free_pages >= _pages_for(candidate, target.page_size)


def _trigger(src: InstanceLoad, dst: InstanceLoad, loads: dict[str, int], free: dict[str, int],
             settings: BalanceSettings, active: bool) -> str | None:
    gap = loads[src.instance_id] - loads[dst.instance_id]
    if gap >= (settings.release_gap if active else settings.threshold):
        return "running"
    src_ratio = free[src.instance_id] / src.total_pages if src.total_pages else 1.0
    dst_ratio = free[dst.instance_id] / dst.total_pages if dst.total_pages else 1.0
    if (settings.kv_low_ratio > 0 and src_ratio < settings.kv_low_ratio and dst_ratio >= 3 * settings.kv_low_ratio
            and gap >= 1):
        return "kv_pages"
    return None


def plan_migrations(instances: list[InstanceLoad], candidates: list[Candidate], settings: BalanceSettings,
                    state: BalanceState, now: float, in_flight: set[str] = frozenset()) -> list[Migration]:
    """This tick's moves (updates `state`); `in_flight`: requests being moved already."""
    state.prune(now, settings.recent_window_s)
    loads = {i.instance_id: i.load for i in instances}
    free = {i.instance_id: i.free_pages for i in instances}
    by_id = {i.instance_id: i for i in instances}
    pairs_now: set[tuple[str, str]] = set()
    moves: list[Migration] = []
    while len(moves) < settings.max_per_tick:
        ready = [i for i in instances if now - state.last_move_at.get(i.instance_id, -1e18) >= settings.cooldown_s
                 or any(m.source == i.instance_id or m.target == i.instance_id for m in moves)]
        move = _best_move(ready, by_id, candidates, loads, free, settings, state, now, in_flight, moves)
        if move is None:
            break
        moves.append(move)
        pairs_now.add((move.source, move.target))
        src, dst = by_id[move.source], by_id[move.target]
        loads[src.instance_id] -= 1
        loads[dst.instance_id] += 1
        pages = _pages_for(next(c for c in candidates if c.request_id == move.request_id), dst.page_size)
        free[dst.instance_id] -= pages
        free[src.instance_id] += pages
    for move in moves:
        state.note(move, now)
    # A pair stays active (balanced down to release_gap) only while it keeps moving sequences.
    state.active_pairs = pairs_now or {p for p in state.active_pairs if p[0] in by_id and p[1] in by_id
                                       and loads[p[0]] - loads[p[1]] >= settings.release_gap}
    return moves


def _best_move(ready: list[InstanceLoad], by_id: dict[str, InstanceLoad], candidates: list[Candidate],
               loads: dict[str, int], free: dict[str, int], settings: BalanceSettings, state: BalanceState,
               now: float, in_flight: set[str], planned: list[Migration]) -> Migration | None:
    if len(ready) < 2:
        return None
    planned_ids = {m.request_id for m in planned}
    # The most loaded source first, towards the least loaded target.
    for src in sorted(ready, key=lambda i: (-loads[i.instance_id], i.instance_id)):
        for dst in sorted(ready, key=lambda i: (loads[i.instance_id], -free[i.instance_id], i.instance_id)):
            if dst is src:
                continue
            reason = _trigger(src, dst, loads, free, settings, (src.instance_id, dst.instance_id) in state.active_pairs)
            if reason is None:
                continue
            movable = [c for c in candidates
                       if c.instance_id == src.instance_id and c.n == 1 and c.age_s >= settings.min_age_s
                       and c.request_id not in state.moved_at and c.request_id not in in_flight
                       and c.request_id not in planned_ids
                       and _has_room(dst, loads[dst.instance_id], free[dst.instance_id], c)]
            if not movable:
                continue
            best = min(movable, key=lambda c: (c.prompt_len, c.age_s, -c.max_tokens, c.request_id))
            return Migration(best.request_id, src.instance_id, dst.instance_id, reason,
                             best.prompt_len + best.max_tokens)
    return None
