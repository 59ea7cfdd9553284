"""What `xllm bench pd` reads from the gateway's `GET /status`: how much of the layout serves, the
role flips the scheduler ordered, refused hand-offs, the TTFT predictor's error.

Every reader takes the decoded `/status` document and tolerates a field that is missing (an older
server, a fake one in a test): it then falls back to what the document does have, or answers None.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from bench.client import BenchError

__all__ = ["LayoutState", "StatusRecorder", "count_flips", "fetch_status", "layout_state", "poll_status",
           "predictor_error", "scheduler_flip_events", "sum_instance_stat", "wait_for_layout",
           "REFUSED_ROLE_KEY", "HONOURED_AFTER_FLIP_KEY"]

# Per-worker counters in `instances[*].stats`: a hand-off the decode end refused because it was in
# another role, and one it took although it had flipped since the scheduler named it.
REFUSED_ROLE_KEY = "kv_handoffs_refused_role"
HONOURED_AFTER_FLIP_KEY = "kv_handoffs_honoured_after_flip"


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _instances(doc: dict) -> list[dict]:
    return [i for i in doc.get("instances") or [] if isinstance(i, dict)]


@dataclass
class LayoutState:
    """How many workers serve now, of how many the layout has (None: nobody said)."""

    up: int
    expected: int | None
    by_role: dict[str, int]
    source: str  # "scheduler": its `workers` block; "instances": counted from the ready instances

    def complete(self, fallback_expected: int | None = None) -> bool:
        """Whole when `up` reaches the expected count (the scheduler's, else `fallback_expected`);
        with no count known at all, one serving worker is all that can be asked for."""
        expected = self.expected if self.expected is not None else fallback_expected
        return self.up >= (expected if expected is not None else 1)

    def as_dict(self) -> dict:
        return {"up": self.up, "expected": self.expected, "by_role": dict(self.by_role), "source": self.source}


def layout_state(doc: dict) -> LayoutState:
    """The scheduler's `workers` block when it sends one, else the instances whose `ready` is true."""
    workers = _dict(_dict(doc.get("scheduler")).get("workers"))
    if isinstance(workers.get("up"), int):
        expected = workers.get("expected")
        by_role = {str(k): int(v) for k, v in _dict(workers.get("by_role")).items() if isinstance(v, int)}
        return LayoutState(workers["up"], expected if isinstance(expected, int) else None, by_role, "scheduler")
    ready = [i for i in _instances(doc) if i.get("ready") is True]
    by_role: dict[str, int] = {}
    for inst in ready:
        role = str(inst.get("role"))
        by_role[role] = by_role.get(role, 0) + 1
    return LayoutState(len(ready), None, by_role, "instances")


def sum_instance_stat(doc: dict, key: str) -> int | None:
    """`key` of `instances[*].stats` summed over the instances that report it; None when none does."""
    values = [_dict(i.get("stats")).get(key) for i in _instances(doc)]
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return int(sum(numbers)) if numbers else None


def predictor_error(doc: dict) -> dict | None:
    """The TTFT predictor's median absolute percentage error, from `scheduler.policy.ttft_predictor`.

    `mdape_pct`/`samples` are over the predictor's recent window; `run_mdape_pct`/`run_samples`
    over everything it scored since the scheduler started (`since_start`), which for a server the
    bench started itself is the whole run. None when the scheduler reports no predictor at all.
    """
    pred = _dict(_dict(_dict(doc.get("scheduler")).get("policy")).get("ttft_predictor"))
    if not pred:
        return None
    since = _dict(pred.get("since_start"))

    def number(value: Any) -> float | int | None:
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    return {"mdape_pct": number(pred.get("mdape_pct")), "samples": number(pred.get("samples")),
            "run_mdape_pct": number(since.get("mdape_pct")), "run_samples": number(since.get("samples"))}


def scheduler_flip_events(doc: dict) -> list[dict]:
    """`scheduler.recent_flips`: the last few flips the scheduler ordered, oldest first."""
    return [dict(e) for e in _dict(doc.get("scheduler")).get("recent_flips") or [] if isinstance(e, dict)]


def count_flips(snapshots: list[tuple[float, dict[str, str]]]) -> list[dict]:
    """Role changes between consecutive `/status` snapshots (time, {instance id: role})."""
    events: list[dict] = []
    last: dict[str, str] = {}
    for t, roles in snapshots:
        for iid, role in roles.items():
            if iid in last and last[iid] != role:
                events.append({"t": round(t, 2), "instance": iid, "from": last[iid], "to": role})
            last[iid] = role
    return events


def _delta(first: Any, last: Any) -> int | None:
    """How much a counter grew over the run; its last value when the first is unknown."""
    if not isinstance(last, (int, float)):
        return None
    return int(last - first) if isinstance(first, (int, float)) else int(last)


def _event_key(event: dict) -> tuple:
    # The scheduler numbers its orders; without a number, what and when identify one.
    if event.get("flip_id") is not None:
        return ("id", event.get("instance"), event.get("flip_id"))
    return ("at", event.get("instance"), event.get("to"), event.get("at"))


@dataclass
class StatusRecorder:
    """Everything a run learns from polling `/status`, relative to its first observation.

    Observe the document once just before the measured workload starts, then at every poll, and
    once after the drain; `report()` turns that into the run's flips and counters.
    """

    wall_t0: float = field(default_factory=time.time)  # the scheduler stamps flips with time.time()
    snapshots: list[tuple[float, dict[str, str]]] = field(default_factory=list)
    first: dict | None = None
    last: dict | None = None
    min_up: int | None = None
    _events: dict[tuple, dict] = field(default_factory=dict)

    def observe(self, doc: dict, t: float) -> None:
        """One `/status` document, seen `t` seconds after the run started."""
        if self.first is None:
            self.first = doc
        self.last = doc
        roles = {str(i.get("id")): str(i.get("role")) for i in _instances(doc)}
        self.snapshots.append((t, roles))
        up = layout_state(doc).up
        self.min_up = up if self.min_up is None else min(self.min_up, up)
        for event in scheduler_flip_events(doc):
            at = event.get("at")
            if isinstance(at, (int, float)) and at < self.wall_t0:
                continue  # ordered before the measured run (warm-up)
            self._events.setdefault(_event_key(event), event)

    def report(self) -> dict:
        """Flips (the scheduler's count and events when it reports them, else the role changes the
        polls saw), hand-offs refused for the role, the predictor's error, the layout at the end."""
        first, last = self.first or {}, self.last or {}
        role_changes = count_flips(self.snapshots)
        events = []
        for event in self._events.values():
            at = event.get("at")
            events.append({**event, "t": round(at - self.wall_t0, 2) if isinstance(at, (int, float)) else None})
        sched_first, sched_last = _dict(first.get("scheduler")), _dict(last.get("scheduler"))
        flips_total = _delta(sched_first.get("flips_total"), sched_last.get("flips_total"))
        if flips_total is not None:
            flips, source, flip_events = flips_total, "scheduler", events
        else:
            flips, source, flip_events = len(role_changes), "roles", role_changes
        refused = _delta(sum_instance_stat(first, REFUSED_ROLE_KEY),
                              sum_instance_stat(last, REFUSED_ROLE_KEY))
        honoured = _delta(sum_instance_stat(first, HONOURED_AFTER_FLIP_KEY),
                               sum_instance_stat(last, HONOURED_AFTER_FLIP_KEY))
        policy = _dict(sched_last.get("policy"))
        return {
            "flips": flips, "flips_source": source, "flip_events": flip_events, "role_changes": role_changes,
            "refused_handoffs_role": refused, "handoffs_honoured_after_flip": honoured,
            "ttft_predictor": predictor_error(last),
            "policy_last_reason": policy.get("last_reason") if isinstance(policy.get("last_reason"), str) else None,
            "layout_end": layout_state(last).as_dict() if self.last is not None else None,
            "workers_up_min": self.min_up, "status_polls": len(self.snapshots),
        }


async def fetch_status(session: aiohttp.ClientSession, root: str, timeout_s: float = 2.0) -> dict | None:
    """`GET {root}/status` decoded, or None when it cannot be had right now."""
    try:
        async with session.get(root + "/status", timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                return None
            doc = await resp.json()
        return doc if isinstance(doc, dict) else None
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None


async def poll_status(session: aiohttp.ClientSession, root: str, recorder: StatusRecorder, t0: float,
                      stop: asyncio.Event, interval_s: float = 0.5) -> None:
    """Feed `recorder` every `interval_s` until `stop` is set (a missed poll is skipped)."""
    while not stop.is_set():
        doc = await fetch_status(session, root)
        if doc is not None:
            recorder.observe(doc, time.perf_counter() - t0)
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except asyncio.TimeoutError:
            pass


async def wait_for_layout(session: aiohttp.ClientSession, root: str, *, expected: int | None, timeout_s: float,
                          interval_s: float = 0.5) -> dict:
    """Wait until every worker of the layout serves, per `/status`; returns what was seen then.

    `expected` is the bench's own count of the workers it started (None against a server it did
    not start); the scheduler's `workers.expected`, when it reports one, takes precedence. A
    BenchError after `timeout_s` says how many were up.
    """
    start = time.monotonic()
    state: LayoutState | None = None
    while True:
        doc = await fetch_status(session, root)
        if doc is not None:
            state = layout_state(doc)
            if state.complete(expected):
                return {**state.as_dict(), "expected": state.expected if state.expected is not None else expected,
                        "waited_s": round(time.monotonic() - start, 2)}
        if time.monotonic() - start >= timeout_s:
            break
        await asyncio.sleep(interval_s)
    if state is None:
        raise BenchError(f"no answer from {root}/status for {timeout_s:g} s")
    want = state.expected if state.expected is not None else expected
    raise BenchError(f"only {state.up} of {want if want is not None else 'the'} workers were up after "
                     f"{timeout_s:g} s (by role: {state.by_role or 'none'}); not measuring a partial layout")
