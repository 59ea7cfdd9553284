"""Dynamic prefill/decode policy: when to flip a worker's role, and which worker.

Pure (no sockets, injectable clock): the scheduler feeds it heartbeats and per-request latencies,
calls `decide()` every 0.5-1 s, sends the returned flips and reports them with `note_flip()`.

Signals, and why
----------------
* **TTFT pressure** (is prefill the bottleneck?) = max of
  - the *predicted* TTFT of a typical new prompt (median recent prompt length) on the best
    prefill instance, from its queued prefill tokens and an online fit
    TTFT ≈ a + b·(queued + prompt) (`ttft_predictor`). It looks forward: a growing queue shows
    up here seconds before any request finishes late;
  - the *observed* p90 TTFT of prefill instances, a guard for what the linear model misses;
  each divided by the TTFT SLO (1.0 = at the SLO).
* **TPOT pressure** (is decode the bottleneck?) = max of the observed p90 TPOT of decode
  instances / TPOT SLO, batch occupancy (running + waiting over max_num_seqs) and KV page use,
  the last two divided by `saturation` (0.9): a decode pool that is nearly full is at risk
  before its TPOT shows it, and a full one queues requests, which TPOT never sees at all.
* **Slack** of a side is its pressure *as if one of its workers left*. Prefill: the leaving
  worker's queue spread over the others, measured as the share of the headroom between the
  bare prefill time of a typical prompt (the floor no worker count lowers) and the SLO; and
  the prefill busy fraction (prompt tokens/s × seconds per token) over one worker fewer must
  stay under `prefill_busy_limit` (0.8), where queues start to grow without bound. Decode: the
  same running sequences over one worker's less capacity, and TPOT scaled by n/(n−1) (the
  worst case, step time proportional to batch size: it errs on the side of keeping decode
  capacity). A side with one worker has no slack.

Rules
-----
* Flip decode→prefill when TTFT pressure ≥ `high_water` (1.0) and decode slack < `low_water`
  (0.6); prefill→decode when TPOT pressure ≥ high_water and prefill slack < low_water. Both
  sides pressured, or neither: no flip (a flip would only move the problem). The gap between
  1.0 and 0.6 is the hysteresis: the opposite flip needs the side that gave a worker to be
  clearly idle even after giving one back, not merely under its SLO.
* A condition must hold for `sustain_s` (one noisy heartbeat flips nothing), at most one flip
  per decision, a global `cooldown_s` after any flip, and `min_dwell_s` per instance before it
  may flip again, so a flip is never undone by the next decision (xLLM's service re-indexes
  instances by their static type and can revert a flip immediately; here the role of record
  is the one we ordered until the worker confirms it or `pending_timeout_s` passes).
* Observed latencies only count from the last flip on: samples from the old topology say
  nothing about the new one (and would otherwise trigger a second flip for the same backlog).
* No decision while a flip is settling (ours pending, or a worker reports `flipping`).
* Never leave a role with no worker while there are ≥ 2 P/D workers (and so never while it has
  work); if a role is empty anyway (a start-up layout), a worker of a side with ≥ 2 moves to it.
* The candidate is the least loaded: the decode with fewest running sequences, the prefill
  with the fewest queued prefill tokens. Mixed workers never take part.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from common.protocol import Heartbeat
from services.scheduler.metrics_window import RateWindow, SampleWindow, percentile
from services.scheduler.ttft_predictor import TtftPredictor

__all__ = ["Flip", "PdPolicy", "StaticPolicy", "DynamicPdPolicy", "make_policy", "POLICIES"]

logger = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
_PD_ROLES = (PREFILL, DECODE)
_DEFAULT_PROMPT_LEN = 256  # typical prompt before any was seen


@dataclass
class Flip:
    instance_id: str
    role: str
    reason: str


class PdPolicy(Protocol):
    def observe_heartbeat(self, beat: Heartbeat, role: str) -> None: ...
    def observe_ttft(self, instance_id: str, prompt_len: int, queued_prefill_tokens: int, ttft_s: float) -> None: ...
    def observe_tpot(self, instance_id: str, tpot_s: float) -> None: ...
    def forget(self, instance_id: str) -> None: ...
    def decide(self) -> list[Flip]: ...
    def note_flip(self, instance_id: str, role: str) -> None: ...
    def predict_ttft(self, instance_id: str, prompt_len: int) -> float: ...


@dataclass
class _Instance:
    instance_id: str
    role: str
    window_s: float
    clock: Callable[[], float]
    waiting: int = 0
    running: int = 0
    queued_prefill_tokens: int = 0
    max_num_seqs: int = 1
    free_pages: int = 0
    total_pages: int = 0
    flipping: bool = False
    last_seen: float = -math.inf
    last_flip_at: float = -math.inf
    pending_role: str | None = None
    pending_since: float = -math.inf
    ttft: SampleWindow = field(init=False)
    tpot: SampleWindow = field(init=False)
    prompt_rate: RateWindow = field(init=False)
    gen_rate: RateWindow = field(init=False)
    predictor: TtftPredictor = field(default_factory=TtftPredictor)

    def __post_init__(self) -> None:
        self.ttft = SampleWindow(self.window_s, self.clock)
        self.tpot = SampleWindow(self.window_s, self.clock)
        self.prompt_rate = RateWindow(self.window_s, self.clock)
        self.gen_rate = RateWindow(self.window_s, self.clock)


class StaticPolicy:
    """Never flips; keeps the windows and the TTFT model so routing can still use them."""

    name = "static"

    def __init__(self, ttft_slo_s: float, tpot_slo_s: float, *, window_s: float = 15.0,
                 stale_s: float = 3.0, pending_timeout_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttft_slo_s <= 0 or tpot_slo_s <= 0:
            raise ValueError("SLOs must be > 0")
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.window_s, self.stale_s, self.pending_timeout_s = window_s, stale_s, pending_timeout_s
        self.clock = clock
        self.instances: dict[str, _Instance] = {}
        self.global_predictor = TtftPredictor()
        self.prompt_lens = SampleWindow(window_s, clock)
        self.flips_total = 0
        self.last_reason = "no decision yet"
        self.last_flip_at = -math.inf
        # Observed latencies count from here on (the last flip, or when it settled).
        self.epoch = -math.inf

    # ---- observations ------------------------------------------------------------------

    def _get(self, instance_id: str, role: str = "") -> _Instance:
        inst = self.instances.get(instance_id)
        if inst is None:
            inst = self.instances[instance_id] = _Instance(instance_id, role, self.window_s, self.clock)
        return inst

    def observe_heartbeat(self, beat: Heartbeat, role: str) -> None:
        """`role`: the instance's role as the registry has it (the ordered one, while a flip is
        unacknowledged), which may differ from the one `beat` reports."""
        now = self.clock()
        instance_id = beat.instance_id
        inst = self._get(instance_id, role)
        inst.last_seen = now
        inst.waiting, inst.running = max(0, beat.waiting), max(0, beat.running)
        inst.queued_prefill_tokens = max(0, beat.queued_prefill_tokens)
        inst.max_num_seqs = max(1, beat.max_num_seqs)
        inst.free_pages, inst.total_pages = beat.free_pages, beat.total_pages
        inst.flipping = beat.flipping
        inst.prompt_rate.observe(beat.prompt_tokens_total, now)
        inst.gen_rate.observe(beat.generated_tokens_total, now)
        if inst.pending_role is None:
            inst.role = role
        elif role == inst.pending_role and not inst.flipping:
            logger.info("flip of %s to %s settled", instance_id, role)
            inst.pending_role, inst.role = None, role
            self.epoch = now
        elif now - inst.pending_since > self.pending_timeout_s:
            # The worker never confirmed: believe what it says it is.
            logger.warning("flip of %s to %s not confirmed after %.0f s; it reports %s",
                           instance_id, inst.pending_role, self.pending_timeout_s, role)
            inst.pending_role, inst.role = None, role
            self.epoch = now
        # else: a heartbeat sent before the flip arrived; keep the role we ordered.

    def observe_ttft(self, instance_id: str, prompt_len: int, queued_prefill_tokens: int, ttft_s: float) -> None:
        if not math.isfinite(ttft_s) or ttft_s < 0:
            return
        inst = self._get(instance_id)
        inst.ttft.add(ttft_s)
        tokens = max(0, queued_prefill_tokens) + max(0, prompt_len)
        inst.predictor.observe(tokens, ttft_s)
        self.global_predictor.observe(tokens, ttft_s)
        if prompt_len > 0:
            self.prompt_lens.add(prompt_len)

    def observe_tpot(self, instance_id: str, tpot_s: float) -> None:
        if math.isfinite(tpot_s) and tpot_s >= 0:
            self._get(instance_id).tpot.add(tpot_s)

    def forget(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)

    def note_flip(self, instance_id: str, role: str) -> None:
        now = self.clock()
        inst = self._get(instance_id, role)
        inst.pending_role, inst.pending_since, inst.last_flip_at, inst.role = role, now, now, role
        self.last_flip_at = self.epoch = now
        self.flips_total += 1

    # ---- predictions -------------------------------------------------------------------

    def _predictor(self, inst: _Instance | None) -> TtftPredictor:
        return inst.predictor if inst is not None and inst.predictor.fitted else self.global_predictor

    def predict_ttft(self, instance_id: str, prompt_len: int, queued_prefill_tokens: int | None = None) -> float:
        """Expected TTFT (s) of a `prompt_len` prompt sent to `instance_id` now."""
        inst = self.instances.get(instance_id)
        queued = queued_prefill_tokens if queued_prefill_tokens is not None else (
            inst.queued_prefill_tokens if inst is not None else 0)
        return self._predictor(inst).predict(queued, prompt_len)

    def typical_prompt_len(self) -> int:
        lens = self.prompt_lens.values()
        return int(statistics.median(lens)) if lens else _DEFAULT_PROMPT_LEN

    def live(self) -> list[_Instance]:
        now = self.clock()
        return [i for i in self.instances.values() if now - i.last_seen <= self.stale_s]

    def decide(self) -> list[Flip]:
        self.last_reason = "static policy"
        return []

    def snapshot(self) -> dict:
        """For /status: what the policy believes and why it did (not) flip last time."""
        return {"policy": self.name, "flips": self.flips_total, "last_reason": self.last_reason,
                "ttft_slo_s": self.ttft_slo_s, "tpot_slo_s": self.tpot_slo_s,
                "roles": {i.instance_id: i.role for i in self.instances.values()}}


@dataclass
class _Pressure:
    now: float  # pressure with the current workers (1.0 = at the SLO)
    without_one: float  # the same with one worker of this side gone (inf: cannot lose one)
    detail: str


class DynamicPdPolicy(StaticPolicy):
    """Flips P/D workers between roles to keep both TTFT and TPOT under their SLOs."""

    name = "dynamic"

    def __init__(self, ttft_slo_s: float, tpot_slo_s: float, *, min_dwell_s: float = 20.0,
                 cooldown_s: float = 5.0, sustain_s: float = 1.5, window_s: float = 15.0,
                 high_water: float = 1.0, low_water: float = 0.6, saturation: float = 0.9,
                 prefill_busy_limit: float = 0.8, min_observed: int = 3, stale_s: float = 3.0,
                 pending_timeout_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttft_slo_s, tpot_slo_s, window_s=window_s, stale_s=stale_s,
                         pending_timeout_s=pending_timeout_s, clock=clock)
        if not 0 < low_water < high_water:
            raise ValueError("need 0 < low_water < high_water")
        self.min_dwell_s, self.cooldown_s, self.sustain_s = min_dwell_s, cooldown_s, sustain_s
        self.high_water, self.low_water = high_water, low_water
        self.saturation, self.prefill_busy_limit = saturation, prefill_busy_limit
        self.min_observed = min_observed
        self._since: dict[str, float] = {}  # direction -> when its condition started holding
        self.last_pressure: dict[str, float] = {}

    # ---- pressures ---------------------------------------------------------------------

    def _observed_ratio(self, insts: list[_Instance], which: str, slo: float) -> float | None:
        samples = [v for i in insts for v in getattr(i, which).values(since=self.epoch)]
        if len(samples) < self.min_observed:
            return None
        return percentile(sorted(samples), 0.9) / slo

    def _prefill_pressure(self, prefills: list[_Instance], leaving: _Instance | None) -> _Pressure:
        typical = self.typical_prompt_len()
        pred = min(self._predictor(i).predict(i.queued_prefill_tokens, typical) for i in prefills)
        obs = self._observed_ratio(prefills, "ttft", self.ttft_slo_s)
        now = max(pred / self.ttft_slo_s, obs or 0.0)
        if leaving is None or len(prefills) < 2:
            return _Pressure(now, math.inf, f"pred {pred:.3f}s obs_p90/slo {obs}")
        rest = [i for i in prefills if i is not leaving]
        share = leaving.queued_prefill_tokens / len(rest)
        pred1 = min(self._predictor(i).predict(i.queued_prefill_tokens + share, typical) for i in rest)
        # Slack is judged on the headroom above the bare prefill time of a typical prompt (no
        # queue): no number of workers lowers that floor, so "60% of the SLO" would be out of
        # reach whenever the floor alone is above it, and prefill could never give a worker back.
        floor = min(self._predictor(i).predict(0, typical) for i in rest)
        headroom = self.ttft_slo_s - floor
        if headroom <= 0:
            return _Pressure(now, math.inf, f"pred {pred:.3f}s, bare prefill {floor:.3f}s over the SLO")
        worst = max(pred1, (obs or 0.0) * self.ttft_slo_s)
        without = max(0.0, worst - floor) / headroom
        # Busy fraction = prompt tokens/s × seconds per token; the same work on one worker fewer
        # must stay below the limit where queues start to grow without bound.
        busy = sum(i.prompt_rate.rate() * self._predictor(i).seconds_per_token() for i in prefills)
        busy1 = busy / len(rest)
        if busy1 >= self.prefill_busy_limit:
            without = max(without, busy1 / self.prefill_busy_limit)
        return _Pressure(now, without, f"pred {pred:.3f}s floor {floor:.3f}s busy {busy:.2f} obs_p90/slo {obs}")

    def _decode_pressure(self, decodes: list[_Instance], leaving: _Instance | None) -> _Pressure:
        obs = self._observed_ratio(decodes, "tpot", self.tpot_slo_s)
        load = sum(i.running + i.waiting for i in decodes)
        seats = sum(i.max_num_seqs for i in decodes)
        used = sum(max(0, i.total_pages - i.free_pages) for i in decodes)
        pages = sum(i.total_pages for i in decodes)
        page_use = used / pages if pages > 0 else 0.0
        now = max(obs or 0.0, load / seats / self.saturation, page_use / self.saturation)
        detail = f"tpot_p90/slo {obs} seqs {load}/{seats} pages {page_use:.2f}"
        if leaving is None or len(decodes) < 2:
            return _Pressure(now, math.inf, detail)
        n = len(decodes)
        seats1 = seats - leaving.max_num_seqs
        pages1 = pages - leaving.total_pages
        without = max((obs or 0.0) * n / (n - 1), load / max(1, seats1) / self.saturation,
                      (used / pages1 if pages1 > 0 else 0.0) / self.saturation)
        return _Pressure(now, without, detail)

    # ---- the decision ------------------------------------------------------------------

    def _eligible(self, insts: list[_Instance], now: float) -> list[_Instance]:
        return [i for i in insts if now - i.last_flip_at >= self.min_dwell_s]

    def _sustained(self, direction: str, holds: bool, now: float) -> bool:
        if not holds:
            self._since.pop(direction, None)
            return False
        start = self._since.setdefault(direction, now)
        return now - start >= self.sustain_s

    def _hold(self, reason: str) -> list[Flip]:
        self.last_reason = reason
        return []

    def _flip(self, inst: _Instance, role: str, reason: str) -> list[Flip]:
        self._since.clear()
        self.last_reason = f"flip {inst.instance_id} -> {role}: {reason}"
        logger.info("dynamic PD: %s", self.last_reason)
        return [Flip(inst.instance_id, role, reason)]

    def decide(self) -> list[Flip]:
        now = self.clock()
        pd = [i for i in self.live() if i.role in _PD_ROLES]
        if len(pd) < 2:
            return self._hold("fewer than 2 prefill/decode workers")
        if any(i.pending_role is not None or i.flipping for i in pd):
            self._since.clear()
            return self._hold("a flip is settling")
        if now - self.last_flip_at < self.cooldown_s:
            self._since.clear()
            return self._hold("cooldown after the last flip")
        prefills = sorted((i for i in pd if i.role == PREFILL), key=lambda i: (i.queued_prefill_tokens, i.waiting,
                                                                                i.instance_id))
        decodes = sorted((i for i in pd if i.role == DECODE), key=lambda i: (i.running, i.waiting, -i.free_pages,
                                                                              i.instance_id))
        if not prefills or not decodes:
            missing, donors = (PREFILL, decodes) if not prefills else (DECODE, prefills)
            candidates = self._eligible(donors, now)
            if len(donors) >= 2 and candidates:
                return self._flip(candidates[0], missing, f"no {missing} worker")
            return self._hold(f"no {missing} worker and none can move yet")

        give_d = self._eligible(decodes, now)
        give_p = self._eligible(prefills, now)
        p = self._prefill_pressure(prefills, give_p[0] if give_p else None)
        d = self._decode_pressure(decodes, give_d[0] if give_d else None)
        self.last_pressure = {"ttft": p.now, "ttft_without_one_prefill": p.without_one,
                              "tpot": d.now, "tpot_without_one_decode": d.without_one}
        to_prefill = p.now >= self.high_water and d.without_one < self.low_water
        to_decode = d.now >= self.high_water and p.without_one < self.low_water
        if self._sustained(PREFILL, to_prefill, now):
            return self._flip(give_d[0], PREFILL, f"TTFT pressure {p.now:.2f} ({p.detail}); decode slack "
                                                  f"{d.without_one:.2f} without it")
        if self._sustained(DECODE, to_decode, now):
            return self._flip(give_p[0], DECODE, f"TPOT pressure {d.now:.2f} ({d.detail}); prefill slack "
                                                 f"{p.without_one:.2f} without it")
        if to_prefill or to_decode:
            return self._hold("pressure not sustained yet")
        if p.now >= self.high_water and d.now >= self.high_water:
            return self._hold(f"both sides over SLO (TTFT {p.now:.2f}, TPOT {d.now:.2f}): a flip would move it")
        if p.now >= self.high_water or d.now >= self.high_water:
            return self._hold(f"pressure but no slack (TTFT {p.now:.2f}/{d.without_one:.2f}, "
                              f"TPOT {d.now:.2f}/{p.without_one:.2f})")
        return self._hold(f"within SLOs (TTFT {p.now:.2f}, TPOT {d.now:.2f})")

    def snapshot(self) -> dict:
        return {**super().snapshot(), "pressure": dict(self.last_pressure)}


POLICIES = {"static": StaticPolicy, "dynamic": DynamicPdPolicy}


def make_policy(name: str, ttft_slo_s: float, tpot_slo_s: float, **kwargs) -> PdPolicy:
    """`static` (never flips) or `dynamic`; keyword arguments go to the policy's constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown PD policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(ttft_slo_s, tpot_slo_s, **kwargs)
