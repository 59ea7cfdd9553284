"""The dynamic PD policy on synthetic metric streams (no processes, a fake clock)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from common.protocol import Heartbeat
from services.scheduler.pd_policy import DynamicPdPolicy, Flip, StaticPolicy, make_policy

TTFT_SLO, TPOT_SLO = 1.0, 0.1
TICK = 0.5


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@dataclass
class W:
    """What a fake worker reports."""
    role: str
    running: int = 0
    waiting: int = 0
    queued: int = 0  # queued prefill tokens
    prompt_total: int = 0
    gen_total: int = 0
    max_num_seqs: int = 64
    free_pages: int = 1000
    total_pages: int = 1000
    flipping: bool = False


def beat(policy, workers: dict[str, W]) -> None:
    for iid, w in workers.items():
        policy.observe_heartbeat(Heartbeat(
            instance_id=iid, role=w.role, waiting=w.waiting, running=w.running, free_pages=w.free_pages,
            total_pages=w.total_pages, used_pages=w.total_pages - w.free_pages, prefix_hit_rate=0.0,
            queued_prefill_tokens=w.queued, max_num_seqs=w.max_num_seqs, draining=False, flipping=w.flipping,
            kv_namespace="", prompt_tokens_total=w.prompt_total, generated_tokens_total=w.gen_total, stats={},
        ), w.role)


def make(clock: FakeClock, **kw) -> DynamicPdPolicy:
    kw.setdefault("min_dwell_s", 20.0)
    kw.setdefault("cooldown_s", 5.0)
    kw.setdefault("sustain_s", 1.5)
    return DynamicPdPolicy(TTFT_SLO, TPOT_SLO, clock=clock, **kw)


def run(policy, clock: FakeClock, workers: dict[str, W], seconds: float, apply: bool = True,
        feed=None, until_flip: bool = False) -> list[Flip]:
    """Heartbeat + decide every tick; flips are applied (the worker confirms on its next beat)."""
    flips: list[Flip] = []
    for _ in range(int(seconds / TICK)):
        clock.t += TICK
        if feed is not None:
            feed(policy, workers)
        beat(policy, workers)
        for f in policy.decide():
            flips.append(f)
            if apply:
                policy.note_flip(f.instance_id, f.role)
                workers[f.instance_id].role = f.role
        if flips and until_flip:
            break
    return flips


def prefill_heavy(workers: dict[str, W]) -> None:
    for w in workers.values():
        if w.role == "prefill":
            w.queued, w.running = 6000, 0  # ~6 s predicted with the 1 ms/token prior
        else:
            w.queued, w.running, w.free_pages = 0, 1, 990


def decode_heavy(workers: dict[str, W]) -> None:
    for w in workers.values():
        if w.role == "prefill":
            w.queued, w.running = 0, 0
        else:
            w.queued, w.running, w.free_pages = 0, 62, 100  # 62/64 seats: saturated


def tpot_feed(value: float):
    def feed(policy, workers):
        for iid, w in workers.items():
            if w.role == "decode":
                policy.observe_tpot(iid, value)
    return feed


def test_flips_decode_to_prefill_under_prefill_pressure_with_decode_slack() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    prefill_heavy(workers)
    workers["d0"].running = 3  # d1 is the less loaded decode
    flips = run(policy, clock, workers, 10, feed=tpot_feed(0.01))
    assert [(f.instance_id, f.role) for f in flips] == [("d1", "prefill")]
    assert "TTFT pressure" in flips[0].reason
    assert policy.snapshot()["flips"] == 1


def test_flips_back_when_tpot_at_risk_and_prefill_has_slack() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    prefill_heavy(workers)
    assert len(run(policy, clock, workers, 10, feed=tpot_feed(0.01))) == 1
    decode_heavy(workers)
    flips = run(policy, clock, workers, 40, feed=tpot_feed(0.15))
    assert len(flips) == 1 and flips[0].role == "decode"
    assert sorted(w.role for w in workers.values()) == ["decode", "decode", "prefill"]


def test_no_flip_without_pressure() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill", queued=100), "p1": W("prefill"), "d0": W("decode", running=3),
               "d1": W("decode", running=2)}
    def feed(policy, workers):
        policy.observe_ttft("p0", 200, 100, 0.3)
        policy.observe_tpot("d0", 0.03)
    assert run(policy, clock, workers, 120, feed=feed) == []
    assert "within SLOs" in policy.last_reason


def test_no_flip_when_both_sides_are_pressured() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "p1": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    for w in workers.values():
        w.queued = 8000 if w.role == "prefill" else 0
        w.running = 60 if w.role == "decode" else 0
    assert run(policy, clock, workers, 60, feed=tpot_feed(0.2)) == []
    assert "both sides" in policy.last_reason


def test_never_flips_the_last_worker_of_a_role() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill", queued=50_000), "d0": W("decode")}  # decode idle, prefill drowning
    assert run(policy, clock, workers, 60) == []
    workers = {"p0": W("prefill"), "d0": W("decode", running=64, waiting=10)}
    policy = make(clock)
    assert run(policy, clock, workers, 60, feed=tpot_feed(0.5)) == []


def test_an_empty_role_is_refilled() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"d0": W("decode", running=4), "d1": W("decode"), "d2": W("decode", running=1)}
    flips = run(policy, clock, workers, 5)
    assert [(f.instance_id, f.role) for f in flips] == [("d1", "prefill")]


def test_respects_dwell_time() -> None:
    clock = FakeClock()
    policy = make(clock, min_dwell_s=30.0, cooldown_s=2.0)
    workers = {"a": W("prefill"), "b": W("prefill"), "c": W("decode")}
    beat(policy, workers)
    policy.note_flip("a", "prefill")  # both prefills were just flipped (say by an operator)
    policy.note_flip("b", "prefill")
    decode_heavy(workers)
    t0 = clock.t
    flips = run(policy, clock, workers, 60, feed=tpot_feed(0.3), until_flip=True)
    assert len(flips) == 1
    assert clock.t - t0 >= 30.0
    assert flips[0].role == "decode"
    # The one that moved is not moved again within its dwell, whatever the pressure says.
    prefill_heavy(workers)
    moved = flips[0].instance_id
    later = run(policy, clock, workers, 25, feed=tpot_feed(0.001))
    assert all(f.instance_id != moved for f in later)


def test_stale_heartbeat_does_not_undo_a_flip() -> None:
    clock = FakeClock()
    policy = make(clock, pending_timeout_s=10.0)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    beat(policy, workers)
    policy.note_flip("d1", "prefill")
    clock.t += 0.5
    beat(policy, workers)  # d1's heartbeat was sent before it got the order: still "decode"
    assert policy.snapshot()["roles"]["d1"] == "prefill"
    assert policy.decide() == [] and "settling" in policy.last_reason
    workers["d1"].role = "prefill"
    workers["d1"].flipping = True
    beat(policy, workers)
    assert policy.decide() == [] and "settling" in policy.last_reason
    workers["d1"].flipping = False
    beat(policy, workers)
    assert policy.instances["d1"].pending_role is None


def test_unconfirmed_flip_times_out() -> None:
    clock = FakeClock()
    policy = make(clock, pending_timeout_s=10.0)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    beat(policy, workers)
    policy.note_flip("d1", "prefill")
    clock.t += 11
    beat(policy, workers)  # it never flipped
    assert policy.snapshot()["roles"]["d1"] == "decode"
    assert policy.instances["d1"].pending_role is None


def test_no_oscillation_over_a_long_noisy_stream() -> None:
    """A toy closed loop: prompt tokens arrive, prefill workers drain them, decode workers hold
    running sequences. 10 minutes of noisy load that shifts twice; flips are counted."""
    rng = random.Random(7)
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode"), "d2": W("decode")}
    prefill_speed = 4000.0  # tokens/s per prefill worker
    phases = [(200, 6000.0, 20), (200, 800.0, 150), (200, 6000.0, 20)]  # (s, prompt tok/s, running seqs)
    queue = 0.0
    flips: list[Flip] = []
    history: list[tuple[float, str, str]] = []
    for seconds, prompt_rate, seqs in phases:
        for _ in range(int(seconds / TICK)):
            clock.t += TICK
            prefills = [w for w in workers.values() if w.role == "prefill"]
            decodes = [w for w in workers.values() if w.role == "decode"]
            arrived = max(0.0, rng.gauss(prompt_rate, prompt_rate * 0.4)) * TICK
            done = min(queue + arrived, prefill_speed * len(prefills) * TICK)
            queue = queue + arrived - done
            for w in prefills:
                w.queued = int(queue / len(prefills))
                w.prompt_total += int(done / len(prefills))
                w.running = 0
            per = max(0, int(rng.gauss(seqs, seqs * 0.2))) // len(decodes)
            for w in decodes:
                w.queued, w.running, w.waiting = 0, min(per, 64), max(0, per - 64)
                w.free_pages = 1000 - 10 * w.running
            # TPOT grows with the per-worker batch; TTFT of a finished prompt from the current queue.
            tpot = 0.01 + 0.0012 * min(per, 64) + abs(rng.gauss(0, 0.004))
            for iid, w in workers.items():
                if w.role == "decode":
                    policy.observe_tpot(iid, tpot)
                elif rng.random() < 0.5:
                    prompt = rng.randint(500, 1500)
                    policy.observe_ttft(iid, prompt, w.queued,
                                        0.05 + (w.queued + prompt) / prefill_speed + abs(rng.gauss(0, 0.05)))
            beat(policy, workers)
            for f in policy.decide():
                flips.append(f)
                history.append((clock.t, f.instance_id, f.role))
                policy.note_flip(f.instance_id, f.role)
                workers[f.instance_id].role = f.role
    # Each shift needs at most a couple of flips; noise must not add more.
    assert 3 <= len(flips) <= 6, history
    start = 1000.0
    for seconds, _, _ in phases:  # each phase: one or two adjustments, then quiet
        assert 1 <= sum(start < t <= start + seconds for t, _, _ in history) <= 2, history
        start += seconds
    for (t1, i1, r1), (t2, i2, r2) in zip(history, history[1:]):
        assert t2 - t1 >= 5.0  # global cooldown
        if i1 == i2:
            assert t2 - t1 >= 20.0  # dwell
    # The loop ends on prompt-heavy load: prefill got the extra worker.
    assert sum(w.role == "prefill" for w in workers.values()) >= 2


def test_static_never_flips_but_predicts() -> None:
    clock = FakeClock()
    policy = StaticPolicy(TTFT_SLO, TPOT_SLO, clock=clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    prefill_heavy(workers)
    assert run(policy, clock, workers, 60, feed=tpot_feed(0.01)) == []
    assert policy.predict_ttft("p0", 1000) == pytest.approx(0.02 + 0.001 * 7000)
    assert policy.predict_ttft("p0", 1000, queued_prefill_tokens=0) == pytest.approx(1.02)


def test_predict_ttft_learns_per_instance() -> None:
    clock = FakeClock()
    policy = StaticPolicy(TTFT_SLO, TPOT_SLO, clock=clock)
    for i in range(50):
        tokens = 100 + 37 * i
        policy.observe_ttft("fast", tokens, 0, 0.01 + 0.0001 * tokens)
        policy.observe_ttft("slow", tokens, 0, 0.01 + 0.001 * tokens)
    assert policy.predict_ttft("fast", 1000, queued_prefill_tokens=0) == pytest.approx(0.11, rel=0.05)
    assert policy.predict_ttft("slow", 1000, queued_prefill_tokens=0) == pytest.approx(1.01, rel=0.05)
    assert policy.predict_ttft("unknown", 1000) > 0  # the global fit
    policy.observe_ttft("fast", 100, 0, -1.0)  # unknown TTFT: ignored
    policy.forget("slow")
    assert "slow" not in policy.instances


def test_make_policy() -> None:
    assert isinstance(make_policy("static", 1.0, 0.1), StaticPolicy)
    assert isinstance(make_policy("dynamic", 1.0, 0.1, min_dwell_s=5), DynamicPdPolicy)
    with pytest.raises(ValueError, match="unknown PD policy"):
        make_policy("magic", 1.0, 0.1)
    with pytest.raises(ValueError):
        make_policy("dynamic", 1.0, 0.1, low_water=1.2)


def test_ttft_is_scored_before_the_model_learns_it() -> None:
    clock = FakeClock()
    policy = StaticPolicy(TTFT_SLO, TPOT_SLO, clock=clock)
    for i in range(4):  # the global model needs 4 points: these cannot be scored
        policy.observe_ttft("p0", 100 + 100 * i, 0, 0.05 + 0.002 * (100 + 100 * i))
    snap = policy.snapshot()["ttft_predictor"]
    assert (snap["mdape_pct"], snap["samples"], snap["unpredicted"]) == (None, 0, 4)
    expected = policy.predict_ttft("p0", 500, queued_prefill_tokens=300)  # what it says before seeing it
    measured = 1.0
    policy.observe_ttft("p0", 500, 300, measured)
    assert policy.predict_ttft("p0", 500, queued_prefill_tokens=300) != pytest.approx(expected)  # it learned
    snap = policy.snapshot()["ttft_predictor"]
    assert snap["samples"] == 1 and snap["unpredicted"] == 4
    assert snap["mdape_pct"] == pytest.approx(abs(expected - measured) / measured * 100, abs=0.01)
    policy.observe_ttft("p0", 500, 300, -1.0)  # unknown TTFT: not a measurement at all
    assert policy.snapshot()["ttft_predictor"]["unpredicted"] == 4


def test_snapshot_reports_the_predictor_for_both_policies() -> None:
    for policy in (StaticPolicy(TTFT_SLO, TPOT_SLO, clock=FakeClock()), make(FakeClock())):
        for i in range(30):
            tokens = 100 + 50 * i
            policy.observe_ttft("p0", tokens, 0, 0.02 + 0.001 * tokens)  # the prior, exactly
        snap = policy.snapshot()["ttft_predictor"]
        assert {"mdape_pct", "samples", "unpredicted", "model"} <= set(snap)
        assert snap["mdape_pct"] == pytest.approx(0.0, abs=0.01)
        assert (snap["samples"], snap["unpredicted"]) == (26, 4)
        assert snap["model"]["a_s"] == pytest.approx(0.02) and snap["model"]["b_s_per_token"] == pytest.approx(0.001)
        assert snap["per_instance"]["p0"]["samples"] == 26
        policy.forget("p0")
        assert "p0" not in policy.snapshot()["ttft_predictor"]["per_instance"]


def test_flip_reason_carries_the_prediction_and_its_error() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    prefill_heavy(workers)
    flips = run(policy, clock, workers, 10, feed=tpot_feed(0.01))
    assert len(flips) == 1
    flip = flips[0]
    # The prior model: 20 ms + 1 ms/token over 6000 queued + a 256-token typical prompt.
    assert flip.predicted_ttft_s == pytest.approx(6.276)
    assert flip.predictor_mdape_pct is None
    assert "decided on predicted TTFT 6276 ms" in flip.reason
    assert "MdAPE unknown" in flip.reason and "SUSPECT" in flip.reason  # nothing measured backs it
    decision = policy.snapshot()["recent_decisions"][-1]
    assert decision["instance"] == flip.instance_id and decision["role"] == "prefill"
    assert decision["predicted_ttft_ms"] == pytest.approx(6276.0)
    assert decision["suspect_prediction"] is True and decision["reason"] == flip.reason
    assert decision["age_s"] >= 0


def test_flip_on_a_good_or_bad_predictor() -> None:
    for ape, suspect in ((5.0, False), (80.0, True)):
        clock = FakeClock()
        policy = make(clock)
        for _ in range(20):
            policy.accuracy.score("p0", 1.0 + ape / 100, 1.0)
        workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
        prefill_heavy(workers)
        flips = run(policy, clock, workers, 10, feed=tpot_feed(0.01))
        assert flips[0].predictor_mdape_pct == pytest.approx(ape)
        assert f"predictor MdAPE {ape:.1f} % over 20" in flips[0].reason
        assert ("SUSPECT" in flips[0].reason) is suspect
        assert policy.snapshot()["recent_decisions"][-1]["suspect_prediction"] is suspect


def test_flip_to_decode_carries_the_prediction_for_the_prefills_left() -> None:
    clock = FakeClock()
    policy = make(clock)
    workers = {"p0": W("prefill"), "d0": W("decode"), "d1": W("decode")}
    prefill_heavy(workers)
    run(policy, clock, workers, 10, feed=tpot_feed(0.01))
    decode_heavy(workers)
    flips = run(policy, clock, workers, 40, feed=tpot_feed(0.15))
    assert flips[0].role == "decode" and flips[0].predicted_ttft_s is not None
    assert "decided on predicted TTFT" in flips[0].reason
    assert [d["role"] for d in policy.snapshot()["recent_decisions"]] == ["prefill", "decode"]


def test_refilling_an_empty_role_involves_no_prediction() -> None:
    clock = FakeClock()
    policy = make(clock)
    flips = run(policy, clock, {"d0": W("decode", running=4), "d1": W("decode")}, 5)
    assert flips[0].predicted_ttft_s is None and "no TTFT prediction involved" in flips[0].reason
    assert policy.snapshot()["recent_decisions"][-1]["suspect_prediction"] is False
