"""`xllm bench pd` over seeds: mean and spread, the JSON shape of a policy's runs, the diagnosis
of runs whose numbers move without a flip, the comparison between policies and the table."""

from __future__ import annotations

import json

import pytest

from bench.pd_report import (aggregate_policy, compare_policies, diagnose, error_entry, mean_or_none, print_table,
                             seed_entry, seed_facts, spread)


def _phase(name: str, pct: float | None, *, requests: int = 10, failed: int = 0, cancelled: int = 0,
           ttft_only: int = 0, tpot_only: int = 0, offered: float | None = 1.0, target: float | None = 1.0,
           lag_ms: float = 5.0, tok_s: float = 50.0) -> dict:
    return {"phase": name, "requests": requests, "completed": requests - failed, "failed": failed,
            "slo_attainment_pct": pct, "ttft_attainment_pct": pct, "tpot_attainment_pct": 100.0,
            "misses": {"ttft_only": ttft_only, "tpot_only": tpot_only, "both": 0, "cancelled": cancelled},
            "ttft_ms": {"p50": 100.0, "p90": 900.0}, "tpot_ms": {"p50": 50.0, "p90": 80.0},
            "send_lag_ms": {"p50": 1.0, "max": lag_ms}, "output_tok_per_s": tok_s,
            "errors": ["still running 15 s after the last arrival"] if failed else [],
            "target_rate": target, "offered_rate": offered}


def _run(seed: int, pct: float, phases: tuple[float, float], *, flips: int = 1, failed: int = 0,
         refused: int | None = None, mdape: float | None = None, layout_up: int = 3, end_up: int = 3,
         min_up: int = 3, warmup_failures: int = 0, lag_ms: float = 5.0) -> dict:
    summary = {
        "overall": _phase("all", pct, requests=20, failed=failed, cancelled=failed, ttft_only=4, tpot_only=1,
                          offered=None, target=None, tok_s=100.0 + seed),
        "phases": [_phase("prompt-heavy", phases[0], offered=2.2, target=2.5, lag_ms=lag_ms),
                   _phase("decode-heavy", phases[1])],
        "flips": flips, "flips_source": "scheduler", "flip_events": [], "role_changes": [],
        "refused_handoffs_role": refused,
        "ttft_predictor": None if mdape is None else {"mdape_pct": mdape + 1, "samples": 5, "run_mdape_pct": mdape,
                                                      "run_samples": 40},
        "policy_last_reason": "no pressure", "layout_end": {"up": end_up, "expected": 3},
        "workers_up_min": min_up, "warmup_failures": warmup_failures, "wall_s": 60.0,
        "layout": {"up": layout_up, "expected": 3, "by_role": {}, "source": "scheduler", "waited_s": 1.0},
    }
    return seed_entry(seed, summary)


def test_mean_and_spread() -> None:
    assert mean_or_none([60, 70, 80]) == pytest.approx(70.0)
    assert spread([60, 70, 80]) == {"min": 60.0, "max": 80.0, "stdev": pytest.approx(10.0), "n": 3}
    assert spread([None, 42.0]) == {"min": 42.0, "max": 42.0, "stdev": 0.0, "n": 1}
    assert spread([]) == {"min": None, "max": None, "stdev": None, "n": 0} and mean_or_none([None]) is None


def test_policy_json_shape_is_mean_over_seeds_with_each_seed_kept() -> None:
    entries = [_run(0, 60.0, (40.0, 80.0), flips=2, refused=0, mdape=10.0),
               _run(1, 70.0, (50.0, 90.0), flips=1, refused=3, mdape=20.0),
               _run(2, 80.0, (60.0, 100.0), flips=3, refused=None, mdape=None),
               error_entry(3, "xllm serve exited with status 1 before it was ready")]
    run = aggregate_policy("dynamic", entries)
    json.dumps(run)  # plain JSON all the way down
    assert run["seeds_ok"] == 3 and run["seeds_total"] == 4
    overall = run["overall"]
    assert overall["slo_attainment_pct"] == pytest.approx(70.0)  # the mean, the error seed left out
    assert overall["spread"] == {"min": 60.0, "max": 80.0, "stdev": pytest.approx(10.0), "n": 3}
    assert overall["output_tok_per_s"] == pytest.approx(101.0) and overall["failed"] == 0
    assert [(p["phase"], p["slo_attainment_pct"]) for p in run["phases"]] == [("prompt-heavy", pytest.approx(50.0)),
                                                                             ("decode-heavy", pytest.approx(90.0))]
    assert run["phases"][0]["spread"]["min"] == 40.0 and run["phases"][1]["spread"]["max"] == 100.0
    assert run["flips"] == {"mean": pytest.approx(2.0), "total": 6, "per_seed": [2, 1, 3]}
    assert run["refused_handoffs_role"] == {"total": 3, "per_seed": [0, 3, None]}
    assert run["ttft_predictor_mdape_pct"] == {"mean": pytest.approx(15.0), "per_seed": [10.0, 20.0, None]}
    assert [e["slo_attainment_pct"] for e in run["seeds"][:3]] == [60.0, 70.0, 80.0]
    assert run["seeds"][0]["overall"]["requests"] == 20 and run["seeds"][3]["error"]
    assert run["diagnosis"][0].startswith("dynamic seed 3: no result: xllm serve exited")
    # No measurement at all still aggregates (and reports nothing to average).
    none = aggregate_policy("static", [error_entry(0, "boom")])
    assert none["overall"]["slo_attainment_pct"] is None and none["phases"] == [] and none["seeds_ok"] == 0


def test_seed_facts_state_what_was_measured() -> None:
    facts = seed_facts(_run(0, 40.0, (20.0, 60.0), flips=0, failed=3, layout_up=2, end_up=2, min_up=1,
                            warmup_failures=1, lag_ms=900.0, refused=2, mdape=35.0))
    text = "; ".join(facts)
    assert facts[0] == "0 flip(s)"
    assert "3 of 20 requests failed (3 cancelled at the drain deadline): still running 15 s" in text
    assert "1 warm-up request(s) failed" in text
    assert "only 2 of 3 workers up at the start" in text and "2 of 3 workers up at the end" in text
    assert "workers up fell to 1 of 3 during the run, with no flip" in text
    assert "of 17 completed: 4 missed TTFT only, 1 TPOT only, 0 both" in text
    assert "prompt-heavy 20.0 % at 2.20 req/s offered for 2.50 targeted, client sent up to 900 ms late" in text
    assert "decode-heavy 60.0 % at 1.00 req/s offered for 1.00 targeted" in text
    assert "TTFT predictor MdAPE 35.0 % over 40 samples" in text
    assert "2 hand-off(s) refused for the role" in text and "policy's last reason: no pressure" in text
    quiet = "; ".join(seed_facts(_run(1, 90.0, (90.0, 90.0))))
    assert "failed" not in quiet and "workers up" not in quiet and "late" not in quiet and "MdAPE" not in quiet


def test_diagnosis_rules() -> None:
    # Seeds within the spread, every dynamic seed flipped: nothing to explain.
    assert diagnose("dynamic", [_run(0, 70.0, (60, 80)), _run(1, 75.0, (65, 85))]) == []
    # A dynamic seed with no flip is always explained; a static one is not.
    lines = diagnose("dynamic", [_run(0, 70.0, (60, 80)), _run(1, 72.0, (60, 84), flips=0)])
    assert len(lines) == 1 and lines[0].startswith("dynamic seed 1 flipped nothing: 0 flip(s); ")
    assert diagnose("static", [_run(0, 70.0, (60, 80), flips=0), _run(1, 72.0, (60, 84), flips=0)]) == []
    # Seeds further apart than the threshold: the gap, then the lowest and the highest seed's facts.
    lines = diagnose("static", [_run(0, 13.6, (5, 20), flips=0), _run(1, 40.0, (30, 50), flips=0),
                                _run(2, 80.6, (70, 90), flips=0)])
    assert lines[0] == "static: seeds differ by 67.0 points (seed 0 13.6 %, seed 2 80.6 %)"
    assert lines[1].startswith("static seed 0: 0 flip(s); ") and lines[2].startswith("static seed 2: ")
    assert len(lines) == 3
    assert diagnose("static", [_run(0, 60.0, (5, 20)), _run(1, 70.0, (5, 20))], divergence_pts=5.0)[0].startswith(
        "static: seeds differ by 10.0 points")
    # A no-flip dynamic seed that is also the outlier is explained once.
    lines = diagnose("dynamic", [_run(0, 10.0, (5, 15), flips=0), _run(1, 80.0, (70, 90))])
    assert [line.split(":")[0] for line in lines] == ["dynamic seed 0 flipped nothing", "dynamic", "dynamic seed 1"]


def test_compare_and_table(capsys) -> None:
    runs = {"mixed": aggregate_policy("mixed", [_run(0, 50.0, (40, 60)), _run(1, 56.0, (46, 66))]),
            "static": aggregate_policy("static", [_run(0, 55.0, (45, 65)), _run(1, 60.0, (50, 70))]),
            "dynamic": aggregate_policy("dynamic", [_run(0, 80.0, (70, 90)), _run(1, 90.0, (80, 100), flips=0),
                                                    error_entry(2, "layout never came up")])}
    comparisons = compare_policies(runs)
    assert [(c["a"], c["b"]) for c in comparisons] == [("dynamic", "static"), ("dynamic", "mixed"),
                                                      ("static", "mixed")]
    assert comparisons[0]["mean_diff_pts"] == pytest.approx(27.5) and comparisons[0]["separated"]
    assert not comparisons[2]["separated"]  # static [55, 60] overlaps mixed [50, 56]
    assert compare_policies({"static": runs["static"]}) == []
    print_table(runs, comparisons)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["policy", "seeds", "SLO", "%"]
    assert lines[3].startswith("dynamic   2/3    85.0 ±7.1 [80-90]")
    assert "dynamic       2  no result: layout never came up" in out
    assert "dynamic - static: +27.5 points of SLO attainment (mean over seeds), outside the spread" in out
    assert "diagnosis: dynamic seed 1 flipped nothing" in out
