"""The online TTFT model on synthetic data with a known linear ground truth."""

from __future__ import annotations

import random

import pytest

from services.scheduler.ttft_predictor import PredictionAccuracy, TtftPredictor


def test_prior_before_enough_samples() -> None:
    p = TtftPredictor(prior_a_s=0.05, prior_b_s_per_token=0.002, min_samples=4)
    assert p.predict(0, 100) == pytest.approx(0.05 + 0.2)
    for _ in range(3):
        p.observe(1000, 10.0)  # wildly different, but too few to trust
    assert not p.fitted
    assert p.predict(0, 100) == pytest.approx(0.25)


def test_converges_on_a_linear_ground_truth() -> None:
    rng = random.Random(0)
    a, b = 0.08, 0.0005  # 80 ms + 0.5 ms per token
    p = TtftPredictor()
    for _ in range(400):
        tokens = rng.randint(16, 4000)
        p.observe(tokens, a + b * tokens + rng.gauss(0, 0.01))
    fa, fb = p.coefficients
    assert fa == pytest.approx(a, abs=0.01)
    assert fb == pytest.approx(b, rel=0.05)
    assert p.predict(1000, 500) == pytest.approx(a + b * 1500, rel=0.05)


def test_tracks_a_slowdown() -> None:
    """Forgetting lets the model follow a worker that became 3x slower (cores now shared)."""
    rng = random.Random(1)
    p = TtftPredictor(forgetting=0.95)
    for b in (0.0003, 0.0009):
        for _ in range(200):
            tokens = rng.randint(100, 3000)
            p.observe(tokens, 0.02 + b * tokens)
    assert p.seconds_per_token() == pytest.approx(0.0009, rel=0.05)


def test_never_negative_and_ignores_unknowns() -> None:
    p = TtftPredictor(min_samples=2)
    p.observe(100, -1.0)  # unknown TTFT
    p.observe(float("nan"), 0.5)
    p.observe(-5, 0.5)
    assert p.samples == 0
    # Anti-correlated noise would fit a negative slope: predictions stay >= 0 and flat.
    for tokens, ttft in ((100, 1.0), (2000, 0.1), (4000, 0.01), (8000, 0.0)):
        p.observe(tokens, ttft)
    assert p.seconds_per_token() == 0.0
    for queued in (0, 1000, 100_000):
        assert p.predict(queued, 500) >= 0.0


def test_same_input_over_and_over_stays_stable() -> None:
    """No covariance windup: a constant x for a long time, then one outlier, moves little."""
    p = TtftPredictor(forgetting=0.95)
    for _ in range(2000):
        p.observe(500, 0.3)
    before = p.predict(0, 500)
    p.observe(500, 3.0)
    assert before == pytest.approx(0.3, rel=0.01)
    assert p.predict(0, 500) < 0.3 + 0.25 * 2.7


def test_bad_forgetting() -> None:
    with pytest.raises(ValueError):
        TtftPredictor(forgetting=1.5)


class FakeClock:
    def __init__(self) -> None:
        self.t = 50.0

    def __call__(self) -> float:
        return self.t


def test_accuracy_mdape_of_a_known_sequence() -> None:
    acc = PredictionAccuracy(window_s=60.0, clock=FakeClock())
    assert acc.mdape_pct() is None and acc.snapshot()["samples"] == 0
    # (predicted, measured): APEs 0 %, 100 %, 25 %, 50 %, 10 %; then two that cannot be scored.
    for pred, meas in ((1.0, 1.0), (2.0, 1.0), (1.5, 2.0), (0.5, 1.0), (1.1, 1.0)):
        acc.score("p0", pred, meas)
    assert acc.score("p0", None, 1.0) is None  # no prediction possible yet
    assert acc.score("p1", 0.3, 0.0) is None  # a zero TTFT has no percentage error
    assert acc.mdape_pct() == pytest.approx(25.0)
    snap = acc.snapshot()
    assert snap["mdape_pct"] == pytest.approx(25.0)
    assert (snap["samples"], snap["unpredicted"], snap["scored_total"]) == (5, 2, 5)
    assert snap["per_instance"] == {"p0": {"mdape_pct": pytest.approx(25.0), "samples": 5}}
    assert snap["since_start"] == {"mdape_pct": pytest.approx(25.0), "samples": 5}


def test_accuracy_window_slides_but_since_start_keeps() -> None:
    clock = FakeClock()
    acc = PredictionAccuracy(window_s=10.0, clock=clock)
    for _ in range(3):
        acc.score("p0", 2.0, 1.0)  # 100 %
    clock.t += 11
    assert acc.window_stats() == (None, 0)
    acc.score("p1", 1.1, 1.0)  # 10 %
    assert acc.mdape_pct() == pytest.approx(10.0)
    assert acc.mdape_pct("p0") is None and acc.mdape_pct("p1") == pytest.approx(10.0)
    assert acc.snapshot()["since_start"] == {"mdape_pct": pytest.approx(100.0), "samples": 4}
    acc.forget("p1")
    assert acc.window_stats("p1") == (None, 0) and acc.window_stats() == (pytest.approx(10.0), 1)
