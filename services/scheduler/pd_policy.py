"""Dynamic prefill/decode policy: when to flip a worker's role, and which worker.

Pure (no sockets, injectable clock): the scheduler feeds it heartbeats and per-request latencies,
calls `decide()` every 0.5-1 s, sends the returned flips and reports them with `note_flip()`.
What the policies observe (windows, TTFT models, the models' measured error) is `pd_observations`.

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
* Every flip carries the predicted TTFT behind it and the predictor's recent MdAPE (in its
  reason and in `recent_decisions`); one made while that error exceeds the hysteresis gap
  (1 − low/high water) is marked SUSPECT, so a flip on a bad model shows in /status.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from common.protocol import Heartbeat
from services.scheduler.metrics_window import percentile
from services.scheduler.pd_observations import InstanceState, PdObservations
from services.scheduler.ttft_predictor import DEFAULT_ACCURACY_WINDOW_S

__all__ = ["Flip", "PdPolicy", "StaticPolicy", "DynamicPdPolicy", "make_policy", "POLICIES"]

logger = logging.getLogger(__name__)

PREFILL, DECODE = "prefill", "decode"
_PD_ROLES = (PREFILL, DECODE)


@dataclass
class Flip:
    instance_id: str
    role: str
    reason: str
    # The predicted TTFT that motivated the flip (None: no prediction did) and how wrong the
    # predictor has recently been, so a flip made on a bad model can be told apart afterwards.
    predicted_ttft_s: float | None = None
    predictor_mdape_pct: float | None = None


class PdPolicy(Protocol):
    def observe_heartbeat(self, beat: Heartbeat, role: str) -> None: ...
    def observe_ttft(self, instance_id: str, prompt_len: int, queued_prefill_tokens: int, ttft_s: float) -> None: ...
    def observe_tpot(self, instance_id: str, tpot_s: float) -> None: ...
    def forget(self, instance_id: str) -> None: ...
    def decide(self) -> list[Flip]: ...
    def note_flip(self, instance_id: str, role: str) -> None: ...
    def predict_ttft(self, instance_id: str, prompt_len: int) -> float: ...
    def snapshot(self) -> dict: ...


class StaticPolicy(PdObservations):
    """Never flips; keeps the windows and the TTFT model so routing (and /status) can still use them."""

    name = "static"

    def decide(self) -> list[Flip]:
        self.last_reason = "static policy"
        return []


@dataclass
class _Pressure:
    now: float  # pressure with the current workers (1.0 = at the SLO)
    without_one: float  # the same with one worker of this side gone (inf: cannot lose one)
    detail: str
    predicted_s: float | None = None  # TTFT predicted for a typical prompt now
    predicted_without_s: float | None = None  # the same with the leaving worker's queue spread


class DynamicPdPolicy(StaticPolicy):
    """Flips P/D workers between roles to keep both TTFT and TPOT under their SLOs."""

    name = "dynamic"

    def __init__(self, ttft_slo_s: float, tpot_slo_s: float, *, min_dwell_s: float = 20.0,
                 cooldown_s: float = 5.0, sustain_s: float = 1.5, window_s: float = 15.0,
                 high_water: float = 1.0, low_water: float = 0.6, saturation: float = 0.9,
                 prefill_busy_limit: float = 0.8, min_observed: int = 3, stale_s: float = 3.0,
                 pending_timeout_s: float = 30.0, accuracy_window_s: float = DEFAULT_ACCURACY_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(ttft_slo_s, tpot_slo_s, window_s=window_s, stale_s=stale_s,
                         pending_timeout_s=pending_timeout_s, accuracy_window_s=accuracy_window_s, clock=clock)
        if not 0 < low_water < high_water:
            raise ValueError("need 0 < low_water < high_water")
        self.min_dwell_s, self.cooldown_s, self.sustain_s = min_dwell_s, cooldown_s, sustain_s
        self.high_water, self.low_water = high_water, low_water
        self.saturation, self.prefill_busy_limit = saturation, prefill_busy_limit
        self.min_observed = min_observed
        self._since: dict[str, float] = {}  # direction -> when its condition started holding
        self.last_pressure: dict[str, float] = {}
        self.decisions: deque[tuple[float, dict]] = deque(maxlen=8)  # (clock time, record)
        # A predictor whose typical error exceeds the gap between the water marks (40 % with
        # the defaults) could have put the same load on either side of the hysteresis band.
        self.suspect_mdape_pct = 100.0 * (1.0 - low_water / high_water)

    # ---- pressures ---------------------------------------------------------------------

    def _observed_ratio(self, insts: list[InstanceState], which: str, slo: float) -> float | None:
        samples = [v for i in insts for v in getattr(i, which).values(since=self.epoch)]
        if len(samples) < self.min_observed:
            return None
        return percentile(sorted(samples), 0.9) / slo

    def _prefill_pressure(self, prefills: list[InstanceState], leaving: InstanceState | None) -> _Pressure:
        typical = self.typical_prompt_len()
        pred = min(self._predictor(i).predict(i.queued_prefill_tokens, typical) for i in prefills)
        obs = self._observed_ratio(prefills, "ttft", self.ttft_slo_s)
        now = max(pred / self.ttft_slo_s, obs or 0.0)
        if leaving is None or len(prefills) < 2:
            return _Pressure(now, math.inf, f"pred {pred:.3f}s obs_p90/slo {obs}", pred)
        rest = [i for i in prefills if i is not leaving]
        share = leaving.queued_prefill_tokens / len(rest)
        pred1 = min(self._predictor(i).predict(i.queued_prefill_tokens + share, typical) for i in rest)
        # Slack is judged on the headroom above the bare prefill time of a typical prompt (no
        # queue): no number of workers lowers that floor, so "60% of the SLO" would be out of
        # reach whenever the floor alone is above it, and prefill could never give a worker back.
        floor = min(self._predictor(i).predict(0, typical) for i in rest)
        headroom = self.ttft_slo_s - floor
        if headroom <= 0:
            return _Pressure(now, math.inf, f"pred {pred:.3f}s, bare prefill {floor:.3f}s over the SLO", pred, pred1)
        worst = max(pred1, (obs or 0.0) * self.ttft_slo_s)
        without = max(0.0, worst - floor) / headroom
        # Busy fraction = prompt tokens/s × seconds per token; the same work on one worker fewer
        # must stay below the limit where queues start to grow without bound.
        busy = sum(i.prompt_rate.rate() * self._predictor(i).seconds_per_token() for i in prefills)
        busy1 = busy / len(rest)
        if busy1 >= self.prefill_busy_limit:
            without = max(without, busy1 / self.prefill_busy_limit)
        return _Pressure(now, without, f"pred {pred:.3f}s floor {floor:.3f}s busy {busy:.2f} obs_p90/slo {obs}",
                         pred, pred1)

    def _decode_pressure(self, decodes: list[InstanceState], leaving: InstanceState | None) -> _Pressure:
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

    def _eligible(self, insts: list[InstanceState], now: float) -> list[InstanceState]:
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

    def _flip(self, inst: InstanceState, role: str, reason: str, predicted_s: float | None = None) -> list[Flip]:
        self._since.clear()
        mdape, samples = self.accuracy.window_stats()
        suspect = mdape is None or mdape > self.suspect_mdape_pct
        if predicted_s is None:
            basis = "no TTFT prediction involved"
        else:
            basis = f"decided on predicted TTFT {predicted_s * 1000:.0f} ms"
        quality = (f"predictor MdAPE {mdape:.1f} % over {samples}" if mdape is not None
                   else "predictor MdAPE unknown (no scored sample)")
        if predicted_s is not None and suspect:
            quality += ": SUSPECT prediction"
        reason = f"{reason}; {basis}, {quality}"
        self.last_reason = f"flip {inst.instance_id} -> {role}: {reason}"
        logger.info("dynamic PD: %s", self.last_reason)
        self.decisions.append((self.clock(), {
            "instance": inst.instance_id, "role": role, "reason": reason,
            "predicted_ttft_ms": None if predicted_s is None else round(predicted_s * 1000, 1),
            "predictor_mdape_pct": None if mdape is None else round(mdape, 2), "predictor_samples": samples,
            "suspect_prediction": predicted_s is not None and suspect}))
        return [Flip(inst.instance_id, role, reason, predicted_s, mdape)]

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
                                                  f"{d.without_one:.2f} without it", p.predicted_s)
        if self._sustained(DECODE, to_decode, now):
            # The prediction that allowed it: TTFT on the prefill workers that stay.
            return self._flip(give_p[0], DECODE, f"TPOT pressure {d.now:.2f} ({d.detail}); prefill slack "
                                                 f"{p.without_one:.2f} without it", p.predicted_without_s)
        if to_prefill or to_decode:
            return self._hold("pressure not sustained yet")
        if p.now >= self.high_water and d.now >= self.high_water:
            return self._hold(f"both sides over SLO (TTFT {p.now:.2f}, TPOT {d.now:.2f}): a flip would move it")
        if p.now >= self.high_water or d.now >= self.high_water:
            return self._hold(f"pressure but no slack (TTFT {p.now:.2f}/{d.without_one:.2f}, "
                              f"TPOT {d.now:.2f}/{p.without_one:.2f})")
        return self._hold(f"within SLOs (TTFT {p.now:.2f}, TPOT {d.now:.2f})")

    def snapshot(self) -> dict:
        now = self.clock()
        recent = [{**record, "age_s": round(now - at, 1)} for at, record in self.decisions]
        return {**super().snapshot(), "pressure": dict(self.last_pressure), "recent_decisions": recent}


POLICIES = {"static": StaticPolicy, "dynamic": DynamicPdPolicy}


def make_policy(name: str, ttft_slo_s: float, tpot_slo_s: float, **kwargs) -> PdPolicy:
    """`static` (never flips) or `dynamic`; keyword arguments go to the policy's constructor."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown PD policy {name!r}; choose from {', '.join(POLICIES)}") from None
    return cls(ttft_slo_s, tpot_slo_s, **kwargs)
