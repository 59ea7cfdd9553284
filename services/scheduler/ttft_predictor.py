"""Online TTFT model: TTFT ≈ a + b · (queued prefill tokens + prompt length).

Why this form: a prefill worker computes prompt tokens first-come first-served under a token
budget, so a new prompt waits for the tokens queued ahead of it and then for its own; both
cost about the same per token (b, seconds per token), plus a fixed part (a: one step's
overhead, the hop to the worker and the first token's way back). Attention makes long prompts
slightly super-linear, which the forgetting below absorbs by tracking the recent operating
point rather than fitting a curve.

The fit is recursive least squares with exponential forgetting (factor λ: old samples weigh
λ^age, so the model follows a worker whose speed changes, e.g. when other processes share its
cores). Tokens are scaled to thousands to keep the 2×2 covariance well conditioned. Until
`min_samples` observations arrived the prior (a0, b0) is used as is; predictions are clamped
so a noisy fit never predicts a negative time nor a negative cost per token.

`PredictionAccuracy` is the model's scorecard: each measured TTFT is compared with what the
model predicted for the same inputs *before* the model learns from it (scored after, a sample
would flatter the fit it just moved), and the median absolute percentage error (MdAPE) of the
recent ones is reported. The median, because one request stuck behind a hiccup would own a mean.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable

from services.scheduler.metrics_window import SampleWindow

__all__ = ["TtftPredictor", "PredictionAccuracy", "DEFAULT_PRIOR_A_S", "DEFAULT_PRIOR_B_S_PER_TOKEN",
           "DEFAULT_ACCURACY_WINDOW_S"]

logger = logging.getLogger(__name__)

# Prior: ~20 ms fixed, 1 ms per prompt token (a small model on a couple of CPU cores).
DEFAULT_PRIOR_A_S = 0.02
DEFAULT_PRIOR_B_S_PER_TOKEN = 1e-3
_SCALE = 1000.0  # tokens per regression unit
# Covariance bound: without fresh excitation (the same x again and again), forgetting makes P
# grow without limit ("windup") and one outlier would then throw the fit anywhere.
_MAX_P_TRACE = 1e4
# Long enough for a median over a few dozen requests at a couple per second; the policy's 15 s
# latency window would leave a handful.
DEFAULT_ACCURACY_WINDOW_S = 60.0
# Scored samples kept for the since-start figure: a whole benchmark run at a few requests/s.
_HISTORY = 4096


class TtftPredictor:
    """Recursive least squares over (1, tokens/1000) → TTFT seconds."""

    def __init__(
        self,
        prior_a_s: float = DEFAULT_PRIOR_A_S,
        prior_b_s_per_token: float = DEFAULT_PRIOR_B_S_PER_TOKEN,
        forgetting: float = 0.98,
        min_samples: int = 4,
        prior_strength: float = 10.0,
    ) -> None:
        if not 0.5 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0.5, 1]")
        self.prior = (float(prior_a_s), float(prior_b_s_per_token))
        self.forgetting = forgetting
        self.min_samples = min_samples
        # theta = [a (s), b' (s per 1000 tokens)]; P = covariance (up to the noise scale).
        self._theta = [prior_a_s, prior_b_s_per_token * _SCALE]
        self._p = [[prior_strength, 0.0], [0.0, prior_strength]]
        self.samples = 0

    @property
    def fitted(self) -> bool:
        return self.samples >= self.min_samples

    @property
    def coefficients(self) -> tuple[float, float]:
        """(a seconds, b seconds per token) as used for predictions."""
        if not self.fitted:
            return self.prior
        return self._theta[0], self._theta[1] / _SCALE

    def observe(self, tokens: float, ttft_s: float) -> None:
        """One finished prefill: `tokens` = queued prefill tokens at routing + prompt length."""
        if not (math.isfinite(tokens) and math.isfinite(ttft_s)) or tokens < 0 or ttft_s < 0:
            return  # unknown (−1) or garbage: skip
        x = (1.0, tokens / _SCALE)
        p, th, lam = self._p, self._theta, self.forgetting
        px = (p[0][0] * x[0] + p[0][1] * x[1], p[1][0] * x[0] + p[1][1] * x[1])
        denom = lam + x[0] * px[0] + x[1] * px[1]
        k = (px[0] / denom, px[1] / denom)
        err = ttft_s - (th[0] * x[0] + th[1] * x[1])
        th[0] += k[0] * err
        th[1] += k[1] * err
        # P = (P - k xᵀ P) / λ, kept symmetric explicitly against rounding drift.
        new = [[(p[i][j] - k[i] * px[j]) / lam for j in range(2)] for i in range(2)]
        off = 0.5 * (new[0][1] + new[1][0])
        new[0][1] = new[1][0] = off
        trace = new[0][0] + new[1][1]
        if trace > _MAX_P_TRACE:
            f = _MAX_P_TRACE / trace
            new = [[v * f for v in row] for row in new]
        self._p = new
        self.samples += 1

    def predict(self, queued_prefill_tokens: float, prompt_len: float) -> float:
        """Expected TTFT in seconds for a prompt of `prompt_len` behind `queued_prefill_tokens`."""
        a, b = self.coefficients
        tokens = max(0.0, float(queued_prefill_tokens)) + max(0.0, float(prompt_len))
        # A negative slope is noise (more work never makes a prompt faster): use a flat model.
        return max(0.0, a + max(0.0, b) * tokens)

    def seconds_per_token(self) -> float:
        """The fitted marginal cost of one prompt token (never negative)."""
        return max(0.0, self.coefficients[1])


def _mdape(window: SampleWindow) -> tuple[float | None, int]:
    values = window.values()
    return (statistics.median(values) if values else None), len(values)


class PredictionAccuracy:
    """Absolute percentage errors of TTFT predictions, overall and per instance.

    `mdape_pct()` is over the last `window_s` seconds; `since_start` over the last `history`
    scored samples whatever their age (a benchmark run's figure). A sample with no prediction
    behind it (the model had too few points and would only have echoed its prior) or with a
    measured TTFT of zero (no percentage of zero exists) is counted in `unpredicted` instead.
    """

    def __init__(self, window_s: float = DEFAULT_ACCURACY_WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 history: int = _HISTORY) -> None:
        self.window_s = window_s
        self.clock = clock
        self._recent = SampleWindow(window_s, clock)
        self._since_start = SampleWindow(math.inf, clock, max_samples=history)
        self._per_instance: dict[str, SampleWindow] = {}
        self.scored_total = 0
        self.unpredicted = 0

    def score(self, instance_id: str, predicted_s: float | None, measured_s: float) -> float | None:
        """Record one measurement against its prediction; the APE in % (None: not scored)."""
        if predicted_s is None or not math.isfinite(predicted_s) or not measured_s > 0 or not math.isfinite(measured_s):
            self.unpredicted += 1
            return None
        ape = abs(predicted_s - measured_s) / measured_s * 100.0
        self._recent.add(ape)
        self._since_start.add(ape)
        window = self._per_instance.get(instance_id)
        if window is None:
            window = self._per_instance[instance_id] = SampleWindow(self.window_s, self.clock, max_samples=1024)
        window.add(ape)
        self.scored_total += 1
        return ape

    def mdape_pct(self, instance_id: str | None = None) -> float | None:
        """Median APE (%) over the window, overall or of one instance; None without samples."""
        return self.window_stats(instance_id)[0]

    def window_stats(self, instance_id: str | None = None) -> tuple[float | None, int]:
        """(MdAPE %, samples) over the window, overall or of one instance."""
        if instance_id is None:
            return _mdape(self._recent)
        window = self._per_instance.get(instance_id)
        return _mdape(window) if window is not None else (None, 0)

    def forget(self, instance_id: str) -> None:
        self._per_instance.pop(instance_id, None)

    def snapshot(self) -> dict:
        mdape, samples = self.window_stats()
        run_mdape, run_samples = _mdape(self._since_start)
        per_instance = {}
        for instance_id in sorted(self._per_instance):
            inst_mdape, inst_samples = self.window_stats(instance_id)
            if inst_samples:
                per_instance[instance_id] = {"mdape_pct": _round(inst_mdape), "samples": inst_samples}
        return {"mdape_pct": _round(mdape), "samples": samples, "unpredicted": self.unpredicted,
                "window_s": self.window_s, "scored_total": self.scored_total,
                "since_start": {"mdape_pct": _round(run_mdape), "samples": run_samples},
                "per_instance": per_instance}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
