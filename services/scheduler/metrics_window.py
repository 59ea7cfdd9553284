"""Time-based sliding windows for the scheduler's policies (pure, injectable clock).

`SampleWindow` keeps (time, value) samples younger than `window_s` and answers mean and
percentiles over them (TTFT and TPOT of recently finished requests). `RateWindow` turns a
monotonic counter reported in heartbeats (prompt tokens computed, tokens generated) into a
rate over the window. Both prune lazily on access, so an idle window costs nothing, and both
take the clock as an argument so tests can drive time by hand.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

__all__ = ["SampleWindow", "RateWindow", "percentile"]

Clock = Callable[[], float]


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile of an ascending list; q in [0, 1]."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    q = min(1.0, max(0.0, q))
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class SampleWindow:
    """Samples of the last `window_s` seconds (at most `max_samples`, oldest dropped first)."""

    def __init__(self, window_s: float, clock: Clock = time.monotonic, max_samples: int = 4096) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self.clock = clock
        # A bound on memory under a flood of finishes; the window is still time-based below it.
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, value: float, t: float | None = None) -> None:
        """Record a sample; NaN/inf are ignored (a bad report must not poison a percentile)."""
        if not math.isfinite(value):
            return
        self._samples.append((self.clock() if t is None else t, float(value)))

    def clear(self) -> None:
        self._samples.clear()

    def _prune(self, now: float) -> None:
        cutoff = now - self.window_s
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()

    def values(self, since: float | None = None) -> list[float]:
        """Values still in the window (and recorded at or after `since`, when given)."""
        self._prune(self.clock())
        if since is None:
            return [v for _, v in self._samples]
        return [v for t, v in self._samples if t >= since]

    def count(self, since: float | None = None) -> int:
        return len(self.values(since))

    def mean(self, since: float | None = None) -> float | None:
        vals = self.values(since)
        return sum(vals) / len(vals) if vals else None

    def percentile(self, q: float, since: float | None = None) -> float | None:
        vals = self.values(since)
        return percentile(sorted(vals), q) if vals else None


class RateWindow:
    """Rate (units per second) of a monotonic counter over the last `window_s` seconds.

    The counter may reset (a restarted worker reports from zero): a decrease starts the window
    over rather than producing a negative rate.
    """

    def __init__(self, window_s: float, clock: Clock = time.monotonic) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self.clock = clock
        self._points: deque[tuple[float, float]] = deque()

    def observe(self, counter: float, t: float | None = None) -> None:
        now = self.clock() if t is None else t
        if self._points and counter < self._points[-1][1]:
            self._points.clear()
        self._points.append((now, float(counter)))

    def rate(self) -> float:
        """Units per second between the oldest and newest point in the window; 0 when unknown."""
        now = self.clock()
        cutoff = now - self.window_s
        # Keep one point at or before the cutoff so the rate spans the whole window.
        while len(self._points) >= 2 and self._points[1][0] <= cutoff:
            self._points.popleft()
        if len(self._points) < 2:
            return 0.0
        (t0, c0), (t1, c1) = self._points[0], self._points[-1]
        if now - t1 > self.window_s:
            return 0.0  # nothing reported for a whole window: no evidence of any rate
        return (c1 - c0) / (t1 - t0) if t1 > t0 else 0.0
