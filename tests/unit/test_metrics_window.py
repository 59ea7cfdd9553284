"""Sliding windows of the scheduler's policies, driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from services.scheduler.metrics_window import RateWindow, SampleWindow, percentile


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_percentile_interpolates() -> None:
    assert percentile([1.0], 0.9) == 1.0
    assert percentile([0.0, 10.0], 0.5) == 5.0
    assert percentile(list(map(float, range(11))), 0.9) == pytest.approx(9.0)
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_sample_window_forgets_old_samples() -> None:
    clock = FakeClock()
    w = SampleWindow(10.0, clock)
    assert w.mean() is None and w.percentile(0.9) is None
    for v in (1.0, 2.0, 3.0):
        w.add(v)
        clock.t += 1
    assert w.count() == 3 and w.mean() == pytest.approx(2.0)
    clock.t += 8.5  # the first sample (t=100) is now 11.5 s old, the second 10.5 s, the third 9.5 s
    assert w.values() == [3.0]
    clock.t += 20
    assert w.count() == 0 and w.mean() is None


def test_sample_window_since_and_bad_values() -> None:
    clock = FakeClock()
    w = SampleWindow(60.0, clock)
    w.add(1.0)
    clock.t += 5
    w.add(float("nan"))
    w.add(math.inf)
    w.add(7.0)
    assert w.values() == [1.0, 7.0]
    assert w.values(since=103.0) == [7.0]
    assert w.percentile(0.5, since=103.0) == 7.0


def test_sample_window_bounded() -> None:
    w = SampleWindow(60.0, FakeClock(), max_samples=5)
    for v in range(10):
        w.add(float(v))
    assert w.values() == [5.0, 6.0, 7.0, 8.0, 9.0]


def test_rate_window_from_counter() -> None:
    clock = FakeClock()
    r = RateWindow(10.0, clock)
    assert r.rate() == 0.0
    for _ in range(21):  # 100 tokens per 0.5 s heartbeat = 200 tok/s, for 10 s
        r.observe(200 * (clock.t - 100.0))
        clock.t += 0.5
    clock.t -= 0.5
    assert r.rate() == pytest.approx(200.0)


def test_rate_window_follows_a_change_and_resets() -> None:
    clock = FakeClock()
    r = RateWindow(4.0, clock)
    counter = 0.0
    for _ in range(20):  # 100/s for 10 s
        counter += 50
        r.observe(counter)
        clock.t += 0.5
    for _ in range(20):  # then 10/s for 10 s: after a full window only the new rate remains
        counter += 5
        r.observe(counter)
        clock.t += 0.5
    assert r.rate() == pytest.approx(10.0)
    r.observe(3)  # the worker restarted: counter from zero, no negative rate
    assert r.rate() == 0.0
    clock.t += 1
    r.observe(13)
    assert r.rate() == pytest.approx(10.0)
    clock.t += 30  # silent for longer than the window: no evidence of any rate
    assert r.rate() == 0.0


def test_windows_reject_bad_width() -> None:
    with pytest.raises(ValueError):
        SampleWindow(0)
    with pytest.raises(ValueError):
        RateWindow(-1)
