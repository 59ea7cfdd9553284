"""`xllm bench pd`: the workload generator, the attainment math, flip counting, and one short
run against an in-test fake server (no model, no processes)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web

from bench import pd
from bench.client import RequestResult
from xllm.cli import build_parser


def test_workload_is_seeded_phased_and_poisson() -> None:
    phases = [pd.Phase("prompt-heavy", 100.0, 2.0, 300, 4), pd.Phase("decode-heavy", 100.0, 1.0, 20, 64)]
    a = pd.make_workload(phases, seed=3)
    assert a == pd.make_workload(phases, seed=3)
    assert a != pd.make_workload(phases, seed=4)
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
    assert pd.make_workload([pd.Phase("idle", 10, 0.0, 1, 1)]) == []


def _res(ok: bool, ttft: float, e2e: float, tokens: int) -> RequestResult:
    return RequestResult(ok=ok, ttft=ttft, e2e=e2e, output_tokens=tokens, error="" if ok else "boom")


def test_attainment_math() -> None:
    ttft_slo, tpot_slo = 1.0, 0.1
    assert pd.attains(_res(True, 0.5, 0.5 + 9 * 0.05, 10), ttft_slo, tpot_slo)
    assert not pd.attains(_res(True, 1.5, 1.5 + 9 * 0.05, 10), ttft_slo, tpot_slo)  # TTFT late
    assert not pd.attains(_res(True, 0.5, 0.5 + 9 * 0.2, 10), ttft_slo, tpot_slo)  # TPOT slow
    assert pd.attains(_res(True, 0.9, 0.9, 1), ttft_slo, tpot_slo)  # one token: no TPOT
    assert not pd.attains(_res(False, 0.1, 0.1, 0), ttft_slo, tpot_slo)  # failed = miss

    arr = pd.Arrival(0.0, 0, [1], 10)
    outcomes = [pd.Outcome(arr, _res(True, 0.5, 0.95, 10), 1.0),  # meets both
                pd.Outcome(arr, _res(True, 2.0, 2.45, 10), 2.5),  # TTFT miss
                pd.Outcome(arr, _res(True, 0.5, 2.3, 10), 2.0),  # TPOT miss (0.2 s)
                pd.Outcome(arr, _res(False, 0, 0, 0), 4.0)]  # failed
    s = pd.summarize_phase("x", outcomes, ttft_slo, tpot_slo)
    assert s["requests"] == 4 and s["completed"] == 3 and s["failed"] == 1
    assert s["slo_attainment_pct"] == pytest.approx(25.0)
    assert s["ttft_attainment_pct"] == pytest.approx(50.0)
    assert s["ttft_ms"]["p50"] == pytest.approx(500.0)
    assert s["output_tokens"] == 30 and s["span_s"] == pytest.approx(4.0)
    assert s["output_tok_per_s"] == pytest.approx(7.5)
    assert s["errors"] == ["boom"]
    empty = pd.summarize_phase("none", [], ttft_slo, tpot_slo)
    assert empty["slo_attainment_pct"] is None and empty["output_tok_per_s"] is None


def test_count_flips() -> None:
    snaps = [(0.0, {"p0": "prefill", "d0": "decode", "d1": "decode"}),
             (0.5, {"p0": "prefill", "d0": "decode", "d1": "decode"}),
             (1.0, {"p0": "prefill", "d0": "decode", "d1": "prefill"}),
             (1.5, {"p0": "prefill", "d0": "decode"}),  # d1 missing from one poll: not a flip
             (2.0, {"p0": "prefill", "d0": "decode", "d1": "decode", "d2": "decode"})]
    events = pd.count_flips(snaps)
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
    with pytest.raises(SystemExit):  # the P/D flags are the only layout this bench starts
        build_parser().parse_args(["bench", "pd", "--legacy-workers", "1"])
    assert pd.run(build_parser().parse_args(["bench", "pd", "--phase-s", "0"])) == 2
    assert pd.run(build_parser().parse_args(["bench", "pd", "--policies", "magic"])) == 2


class _FakeServer:
    """/v1/models, streaming /v1/completions and /status whose roles flip once, in a thread."""

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
        return web.json_response({"instances": [{"id": "p0", "role": "prefill"}, {"id": "d0", "role": role}]})

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
    measured = [b for b in server.bodies if len(b["prompt"]) != 16]  # not the warm-ups
    assert all(b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] and b["stream"] for b in measured)
    saved = json.loads((tmp_path / "pd.json").read_text())
    assert saved["benchmark"] == "pd" and "external" in saved["runs"]
    assert "prompt-heavy" in capsys.readouterr().out
