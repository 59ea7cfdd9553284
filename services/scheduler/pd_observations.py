"""What the P/D policies know: per-instance load, latency windows, TTFT models and their accuracy.

`PdObservations` takes in heartbeats and finished requests' latencies and answers predictions;
`pd_policy` builds the policies (static, dynamic) on top of it and adds the decisions. Kept
apart so the decision rules stay readable on their own.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.protocol import Heartbeat
from services.scheduler.metrics_window import RateWindow, SampleWindow
from services.scheduler.ttft_predictor import DEFAULT_ACCURACY_WINDOW_S, PredictionAccuracy, TtftPredictor

__all__ = ["InstanceState", "PdObservations"]

logger = logging.getLogger(__name__)

_DEFAULT_PROMPT_LEN = 256  # typical prompt before any was seen


@dataclass
class InstanceState:
    """One worker as the policy sees it; `role` is the ordered one while a flip is unconfirmed."""

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


class PdObservations:
    """The state every policy keeps; it decides nothing (see `pd_policy`)."""

    name = "observe"

    def __init__(self, ttft_slo_s: float, tpot_slo_s: float, *, window_s: float = 15.0,
                 stale_s: float = 3.0, pending_timeout_s: float = 30.0,
                 accuracy_window_s: float = DEFAULT_ACCURACY_WINDOW_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttft_slo_s <= 0 or tpot_slo_s <= 0:
            raise ValueError("SLOs must be > 0")
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.window_s, self.stale_s, self.pending_timeout_s = window_s, stale_s, pending_timeout_s
        self.clock = clock
        self.instances: dict[str, InstanceState] = {}
        self.global_predictor = TtftPredictor()
        self.accuracy = PredictionAccuracy(accuracy_window_s, clock)
        self.prompt_lens = SampleWindow(window_s, clock)
        self.flips_total = 0
        self.last_reason = "no decision yet"
        self.last_flip_at = -math.inf
        # Observed latencies count from here on (the last flip, or when it settled).
        self.epoch = -math.inf

    # ---- observations ------------------------------------------------------------------

    def _get(self, instance_id: str, role: str = "") -> InstanceState:
        inst = self.instances.get(instance_id)
        if inst is None:
            inst = self.instances[instance_id] = InstanceState(instance_id, role, self.window_s, self.clock)
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
        # Scored with the model the decisions would have used, before it learns this sample.
        model = self._predictor(inst)
        self.accuracy.score(instance_id, model.predict(tokens, 0) if model.fitted else None, ttft_s)
        inst.predictor.observe(tokens, ttft_s)
        self.global_predictor.observe(tokens, ttft_s)
        if prompt_len > 0:
            self.prompt_lens.add(prompt_len)

    def observe_tpot(self, instance_id: str, tpot_s: float) -> None:
        if math.isfinite(tpot_s) and tpot_s >= 0:
            self._get(instance_id).tpot.add(tpot_s)

    def forget(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        self.accuracy.forget(instance_id)

    def note_flip(self, instance_id: str, role: str) -> None:
        now = self.clock()
        inst = self._get(instance_id, role)
        inst.pending_role, inst.pending_since, inst.last_flip_at, inst.role = role, now, now, role
        self.last_flip_at = self.epoch = now
        self.flips_total += 1

    # ---- predictions -------------------------------------------------------------------

    def _predictor(self, inst: InstanceState | None) -> TtftPredictor:
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

    def live(self) -> list[InstanceState]:
        now = self.clock()
        return [i for i in self.instances.values() if now - i.last_seen <= self.stale_s]

    def predictor_snapshot(self) -> dict:
        """The TTFT model in use before any instance has its own, and how wrong predictions were."""
        a, b = self.global_predictor.coefficients
        return {**self.accuracy.snapshot(), "fitted": self.global_predictor.fitted,
                "model": {"a_s": a, "b_s_per_token": b}}

    def snapshot(self) -> dict:
        """For /status: what the policy believes and why it did (not) flip last time."""
        return {"policy": self.name, "flips": self.flips_total, "last_reason": self.last_reason,
                "ttft_slo_s": self.ttft_slo_s, "tpot_slo_s": self.tpot_slo_s,
                "roles": {i.instance_id: i.role for i in self.instances.values()},
                "ttft_predictor": self.predictor_snapshot()}
