"""`xllm bench pd`: the workload generator, the attainment math, flip counting, the command's
wiring, and one short run against an in-test fake server (no model, no processes)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from bench import pd, pd_status
from bench.client import RequestResult
from bench.pd_report import seed_entry
from bench.pd_workload import (Arrival, Outcome, Phase, RunRecord, attains, build_phases, make_workload,
                               summarize_phase, summarize_run)
from xllm.cli import build_parser
from xllm.serve import worker_threads


def test_workload_is_seeded_phased_and_poisson() -> None:
    phases = [Phase("prompt-heavy", 100.0, 2.0, 300, 4), Phase("decode-heavy", 100.0, 1.0, 20, 64)]
    a = make_workload(phases, seed=3)
    assert a == make_workload(phases, seed=3)
    assert a != make_workload(phases, seed=4)
    times = [x.t for x in a]
    assert times == sorted(times)
    first = [x for x in a if x.phase == 0]
    second = [x for x in a if x.phase == 1]
    assert all(0 <= x.t < 100 for x in first) and all(100 <= x.t < 200 for x in second)
    # Poisson counts: mean rate*duration, sd sqrt(mean); 5 sd is a generous, seed-fixed bound.
    assert abs(len(first) - 200) < 5 * 200 ** 0.5 and abs(len(second) - 100) < 5 * 100 ** 0.5
    assert {len(x.prompt_ids) for x in first} == {300} and {x.max_tokens for x in first} == {4}
    assert {len(x.prompt_ids) for x in second} == {20} and {x.max_tokens for x in second} == {64}
    # Fresh prompts: no two requests share a prefix the prefix cache could reuse.
    assert len({tuple(x.prompt_ids[:16]) for x in first}) == len(first)
    assert make_workload([Phase("idle", 10, 0.0, 1, 1)]) == []


def test_steady_workload_mixes_both_classes_all_along() -> None:
    shifting = build_phases("shifting", 100.0, 2.0, 1.0, 300, 4, 20, 64)
    assert [(p.name, p.rate, p.start_s) for p in shifting] == [("prompt-heavy", 2.0, None), ("decode-heavy", 1.0, None)]
    steady = build_phases("steady", 100.0, 2.0, 1.0, 300, 4, 20, 64)
    assert [(p.name, p.duration_s, p.rate, p.start_s) for p in steady] == [
        ("prompt-heavy", 200.0, 1.0, 0.0), ("decode-heavy", 200.0, 0.5, 0.0)]
    a = make_workload(steady, seed=5)
    assert [x.t for x in a] == sorted(x.t for x in a)
    for phase in (0, 1):  # each class spans both halves of the run
        times = [x.t for x in a if x.phase == phase]
        assert min(times) < 50 and max(times) > 150
    # The same expected number of each class as the shifting run (Poisson, 5 sd).
    assert abs(sum(x.phase == 0 for x in a) - 200) < 5 * 200 ** 0.5
    with pytest.raises(ValueError):
        build_phases("bursty", 1.0, 1.0, 1.0, 1, 1, 1, 1)


def _res(ok: bool, ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult(ok=ok, ttft=ttft, e2e=e2e, output_tokens=tokens, error="" if ok else "boom")


def test_attainment_math() -> None:
    ttft_slo, tpot_slo = 1.0, 0.1
    assert attains(_res(True, 0.5, 0.5 + 9 * 0.05, 10), ttft_slo, tpot_slo)
    assert not attains(_res(True, 1.5, 1.5 + 9 * 0.05, 10), ttft_slo, tpot_slo)  # TTFT late
    assert not attains(_res(True, 0.5, 0.5 + 9 * 0.2, 10), ttft_slo, tpot_slo)  # TPOT slow
    assert attains(_res(True, 0.9, 0.9, 1), ttft_slo, tpot_slo)  # one token: no TPOT
    assert not attains(_res(False, 0.1, 0.1, 0), ttft_slo, tpot_slo)  # failed = miss

    arr = Arrival(0.0, 0, [1], 10)
    outcomes = [Outcome(arr, _res(True, 0.5, 0.95, 10), 1.0, sent_at=0.01),  # meets both
                Outcome(arr, _res(True, 2.0, 2.45, 10), 2.5, sent_at=0.3),  # TTFT miss
                Outcome(arr, _res(True, 0.5, 2.3, 10), 2.0),  # TPOT miss (0.2 s)
                Outcome(arr, _res(False, 0, 0, 0), 4.0, cancelled=True)]  # failed
    s = summarize_phase("x", outcomes, ttft_slo, tpot_slo)
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1
    assert s["slo_attainment_pct"] == pytest.approx(25.0)
    assert s["ttft_attainment_pct"] == pytest.approx(50.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["output_tokens"] == 30 and s["span_s"] == pytest.approx(4.0)
    assert s["output_tok_per_s"] == pytest.approx(7.5)
    assert s["errors"] == ["boom"]
    assert s["misses"] == {"ttft_only": 1, "tpot_only": 1, "both": 0, "cancelled": 1}
    assert s["send_lag_ms"]["max"] == pytest.approx(300.0)
    empty = summarize_phase("none", [], ttft_slo, tpot_slo)
    assert empty["slo_attainment_pct"] is None and empty["output_tok_per_s"] is None


def test_count_flips() -> None:
    snaps = [(0.0, {"p0": "prefill", "d0": "decode", "d1": "decode"}),
             (0.5, {"p0": "prefill", "d0": "decode", "d1": "decode"}),
             (1.0, {"p0": "prefill", "d0": "decode", "d1": "prefill"}),
             (1.5, {"p0": "prefill", "d0": "decode"}),  # d1 missing from one poll: not a flip
             (2.0, {"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"})]
    events = pd_status.count_flips(snaps)
    assert events == [{"t": 1.0, "instance": "d1", "from": "decode", "to": "prefill"},
                      {"t": 2.0, "instance": "d1", "from": "prefill", "to": "decode"}]


def test_cli_wiring_and_serve_argv() -> None:
    args = build_parser().parse_args(["bench", "pd", "--phase-s", "10", "--ttft-slo-ms", "500",
                                      "--serve-arg", "--max-num-seqs 8"])
    assert args.func is pd.run
    argv = pd.serve_argv(args, "dynamic", 9000)
    assert argv[1:5] == ["-m", "xllm.cli", "serve", "--port"]
    for flag, value in (("--prefill-workers", "1"), ("--decode-workers", "2"), ("--pd-policy", "dynamic"),
                        ("--ttft-slo-ms", "500"), ("--max-num-seqs", "8")):
        assert argv[argv.index(flag) + 1] == value
    assert "--workers" not in argv
    threads = argv[argv.index("--threads") + 1]  # what the calibration measured one worker with
    assert threads == str(worker_threads(None, 3))
    # The honest baseline: the same number of workers, all mixed, no P/D policy.
    mixed = pd.serve_argv(args, "mixed", 9000)
    assert mixed[mixed.index("--workers") + 1] == "3" and mixed[mixed.index("--threads") + 1] == threads
    assert "--pd-policy" not in mixed and "--prefill-workers" not in mixed and "--decode-workers" not in mixed
    assert args.policies == "mixed,static,dynamic" and pd.parse_seeds(args.seeds) == [0, 1, 2]
    assert args.rate1 is None and args.rate2 is None and args.workload == "shifting"  # calibrated by default
    with pytest.raises(SystemExit):  # the layout comes from --prefill-workers/--decode-workers only
        build_parser().parse_args(["bench", "pd", "--legacy-workers", "1"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "pd", "--workload", "bursty"])
    for bad in (["--phase-s", "0"], ["--policies", "magic"], ["--seeds", ""], ["--seeds", "1,1"], ["--seeds", "x"],
                ["--decode-workers", "0"], ["--prefill-factor", "0"], ["--rate1", "-1"], ["--calib-batch", "0"]):
        assert pd.run(build_parser().parse_args(["bench", "pd", *bad])) == 2, bad


class _FakeServer:
    """/v1/models, streaming /v1/completions and /status whose roles flip once, in a thread. Its
    /status is an older server's: no scheduler block, so the bench falls back to the instances."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.status_calls = 0
        self.bodies: list[dict] = []

    def __enter__(self) -> _FakeServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/status", self._status)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake"}]})

    async def _status(self, request: web.Request) -> web.Response:
        self.status_calls += 1
        role = "decode" if self.status_calls < 3 else "prefill"
        return web.json_response({"instances": [{"id": "p0", "role": "prefill", "ready": True},
                                                {"id": "d0", "role": role, "ready": True}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.002)
            await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}).encode() + b"\n\n")
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        await resp.write(b"data: " + json.dumps({"choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def test_short_run_against_a_fake_server(tmp_path, capsys) -> None:
    with _FakeServer() as server:
        doc = asyncio.run(pd.smoke(server.url, seconds=2.0, rate=5.0))
        args = build_parser().parse_args(["bench", "pd", "--url", server.url, "--phase-s", "0.6", "--rate1", "5",
                                          "--rate2", "5", "--prompt-len1", "40", "--output-len2", "8",
                                          "--json", str(tmp_path / "pd.json")])
        assert pd.run(args) == 0
    overall = doc["overall"]
    assert overall["requests"] > 0 and overall["completed"] == overall["requests"]
    assert [p["phase"] for p in doc["phases"]] == ["prompt-heavy", "decode-heavy"]
    assert doc["flips"] == 1 and doc["flip_events"][0]["instance"] == "d0"
    assert doc["flips_source"] == "roles" and doc["refused_handoffs_role"] is None and doc["ttft_predictor"] is None
    measured = [b for b in server.bodies if len(b["prompt"]) != 16]  # not the warm-ups
    assert all(b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] and b["stream"] for b in measured)
    saved = json.loads((tmp_path / "pd.json").read_text())
    assert saved["benchmark"] == "pd" and "external" in saved["runs"]
    external = saved["runs"]["external"]
    assert external["seeds_ok"] == 1 and [e["seed"] for e in external["seeds"]] == [0]  # runs once
    assert external["overall"]["slo_attainment_pct"] == external["seeds"][0]["slo_attainment_pct"]
    assert external["seeds"][0]["layout"]["up"] == 2  # the ready instances, with no workers block
    assert saved["calibration"]["skipped"] and saved["calibration"]["rates"]["prompt-heavy"] == 5
    assert "prompt-heavy" in capsys.readouterr().out


def test_full_bench_json_shape(tmp_path, monkeypatch, capsys) -> None:
    """The self-starting path with the servers replaced: calibration → rates → every policy on every
    seed (seed by seed) → means, spreads, per-seed summaries and the diagnosis in the JSON."""
    calls: list[tuple[str, int]] = []
    pcts = {"mixed": [70.0, 72.0, 74.0], "static": [50.0, 20.0, 52.0], "dynamic": [80.0, 84.0, 82.0]}

    def fake_calibrate(args, plan) -> dict:
        assert plan.prefill_prompt_len == 512 and plan.decode_output_len == 64 and plan.max_batch == 64
        return {"prefill": {"tok_per_s": 1024.0}, "decode": {"tok_per_s": 640.0, "batch": 32, "tpot_ms": 50.0},
                "wall_s": 10.0, "threads_per_worker": 1, "server": "xllm serve --workers 1 --threads 1"}

    def fake_run_seed(args, policy, seed, phases) -> dict:
        calls.append((policy, seed))
        assert [p.rate for p in phases] == [pytest.approx(1.3 * 1024 / 512), pytest.approx(1.3 * 640 / 64)]
        arr = Arrival(0.0, 0, [1], 4)
        ok = [Outcome(arr, _res(True, 0.5, 0.5 + 3 * 0.05, 4), 1.0, sent_at=0.0)] * int(pcts[policy][seed])
        miss = [Outcome(arr, _res(True, 9.0, 9.15, 4), 10.0, sent_at=0.0)] * (100 - int(pcts[policy][seed]))
        record = RunRecord(ok + miss, 60.0, 0, {"flips": 1 if policy == "dynamic" and seed else 0,
                                                  "flips_source": "scheduler"})
        summary = summarize_run(record, phases, 3.0, 0.2)
        return seed_entry(seed, {**summary, "layout": {"up": 3, "expected": 3}})

    monkeypatch.setattr(pd, "calibrate", fake_calibrate)
    monkeypatch.setattr(pd, "_run_seed", fake_run_seed)
    path = tmp_path / "results" / "pd.json"
    assert pd.run(build_parser().parse_args(["bench", "pd", "--json", str(path)])) == 0
    assert calls == [(p, s) for s in (0, 1, 2) for p in ("mixed", "static", "dynamic")]  # seed by seed
    doc = json.loads(path.read_text())
    assert doc["calibration"]["prefill"]["tok_per_s"] == 1024.0 and doc["calibration"]["threads_per_worker"] == 1
    assert doc["calibration"]["rates"]["prompt-heavy"] == pytest.approx(2.6)
    assert doc["calibration"]["factors"] == {"prefill": 1.3, "decode": 1.3} and doc["seeds"] == [0, 1, 2]
    assert list(doc["runs"]) == ["mixed", "static", "dynamic"]
    for policy, values in pcts.items():
        run = doc["runs"][policy]
        assert run["overall"]["slo_attainment_pct"] == pytest.approx(sum(values) / 3)
        assert [e["slo_attainment_pct"] for e in run["seeds"]] == pytest.approx(values)
        assert run["overall"]["spread"]["min"] == min(values) and run["overall"]["spread"]["n"] == 3
        assert run["serve"].startswith("xllm serve --port 8017")
    assert "--workers 3" in doc["runs"]["mixed"]["serve"] and "--pd-policy dynamic" in doc["runs"]["dynamic"]["serve"]
    # static's seeds are 32 points apart; dynamic's seed 0 flipped nothing: both explained.
    assert any(line.startswith("static: seeds differ by 32.0 points") for line in doc["diagnosis"])
    assert any(line.startswith("dynamic seed 0 flipped nothing") for line in doc["diagnosis"])
    assert doc["comparisons"][0] == {"a": "dynamic", "b": "static", "mean_diff_pts": pytest.approx(82.0 - 122.0 / 3),
                                     "separated": True}
    assert "diagnosis: static seed 1: " in capsys.readouterr().out
