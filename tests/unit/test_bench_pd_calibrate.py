"""`xllm bench pd`'s calibration: the rates it derives, the decode sweep's choice, the one-worker
server it would start, and a measurement of a fake server whose prefill and decode speeds are
known (prefill serialized at 1000 tok/s; a decode step of 20 ms per running sequence)."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench import pd
from bench.pd_calibrate import (CalibrationPlan, calibrate_url, calibrated_rates, calibration_argv, decode_batches,
                                engine_max_batch, layout_threads, pick_decode_point, requested_threads)
from xllm.cli import build_parser
from xllm.serve import worker_threads

PREFILL_TOK_S = 1000.0
STEP_S_PER_SEQ = 0.02


def test_rates_are_multiples_of_one_workers_capacity() -> None:
    r1, r2 = calibrated_rates(1000.0, 200.0, 512, 64, 1.3, 1.3)
    assert r1 == pytest.approx(1.3 * 1000 / 512, abs=1e-4) and r2 == pytest.approx(1.3 * 200 / 64, abs=1e-4)
    assert calibrated_rates(1000.0, 200.0, 500, 50, 2.0, 0.5) == (4.0, 2.0)
    with pytest.raises(ValueError):
        calibrated_rates(0.0, 200.0, 512, 64, 1.3, 1.3)


def test_rates_from_calibration_and_overrides() -> None:
    calibration = {"prefill": {"tok_per_s": 1024.0}, "decode": {"tok_per_s": 128.0}}
    args = build_parser().parse_args(["bench", "pd", "--prompt-len1", "256", "--output-len2", "32",
                                      "--decode-factor", "2"])
    rates = pd.rates_from_calibration(args, calibration)
    assert rates["prompt-heavy"] == pytest.approx(1.3 * 4) and rates["decode-heavy"] == pytest.approx(8.0)
    assert rates["overridden"] == {"rate1": False, "rate2": False}
    args = build_parser().parse_args(["bench", "pd", "--prompt-len1", "256", "--rate2", "0.5"])
    rates = pd.rates_from_calibration(args, calibration)
    assert rates["decode-heavy"] == 0.5 and rates["calibrated"]["decode-heavy"] == pytest.approx(1.3 * 128 / 64)
    assert rates["overridden"] == {"rate1": False, "rate2": True}
    args = build_parser().parse_args(["bench", "pd", "--rate1", "2", "--rate2", "3"])
    assert pd.rates_from_calibration(args, None)["prompt-heavy"] == 2  # no calibration needed


def test_decode_sweep_and_pick() -> None:
    assert decode_batches(16) == [1, 2, 4, 8, 16] and decode_batches(12) == [1, 2, 4, 8, 12]
    assert decode_batches(1) == [1]
    sweep = [{"batch": 1, "tpot_ms": 40.0, "tok_per_s": 25.0}, {"batch": 2, "tpot_ms": 60.0, "tok_per_s": 33.3},
             {"batch": 4, "tpot_ms": 120.0, "tok_per_s": 33.3}]
    assert pick_decode_point(sweep, 0.1) == {**sweep[1], "meets_tpot_slo": True}  # the largest within the SLO
    assert pick_decode_point(sweep, 0.03) == {**sweep[0], "meets_tpot_slo": False}  # none: the fastest, flagged
    assert pick_decode_point([], 0.1) is None


def test_the_calibration_server_runs_one_worker_at_the_layouts_threads() -> None:
    assert requested_threads(None) is None and requested_threads(["--max-num-seqs 8"]) is None
    assert requested_threads(["--threads 3 --max-num-seqs 8"]) == 3 and requested_threads(["--threads=5"]) == 5
    assert requested_threads(["--threads 3", "--threads 4"]) == 4 and requested_threads(["--threads x"]) is None
    # The decode sweep goes up to what one worker batches.
    assert engine_max_batch(None) == 64 and engine_max_batch(["--threads 2 --max-num-seqs 24"]) == 24
    args = build_parser().parse_args(["bench", "pd", "--decode-workers", "3", "--port", "9100"])
    assert layout_threads(args) == worker_threads(None, 4)  # xllm serve's split over 1P+3D
    argv = calibration_argv(args, 7)
    assert argv[1:4] == ["-m", "xllm.cli", "serve"]
    for flag, value in (("--port", "9100"), ("--workers", "1"), ("--threads", "7"), ("--tpot-slo-ms", "200")):
        assert argv[argv.index(flag) + 1] == value
    assert "--prefill-workers" not in argv and "--pd-policy" not in argv
    args = build_parser().parse_args(["bench", "pd", "--serve-arg", "--threads 2"])
    assert layout_threads(args) == 2


class _TimedEngine:
    """A fake server with known speeds: prompts are prefilled one at a time at PREFILL_TOK_S, and
    each decode step takes STEP_S_PER_SEQ per sequence decoding at that moment."""

    def __init__(self) -> None:
        self.prefill_lock = asyncio.Lock()
        self.decoding = 0
        self.bodies: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/status", self.status)
        app.router.add_post("/v1/completions", self.completions)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "fake"}]})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response({"scheduler": {"workers": {"expected": 1, "up": 1, "by_role": {"mixed": 1}}},
                                  "instances": [{"id": "worker-0", "role": "mixed", "ready": True}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def token(i: int) -> None:
            await resp.write(b"data: " + json.dumps({"choices": [{"index": 0, "text": f" t{i}"}]}).encode() + b"\n\n")

        async with self.prefill_lock:
            await asyncio.sleep(len(body["prompt"]) / PREFILL_TOK_S)
        await token(0)
        self.decoding += 1
        try:
            for i in range(1, body["max_tokens"]):
                await asyncio.sleep(STEP_S_PER_SEQ * self.decoding)
                await token(i)
        finally:
            self.decoding -= 1
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp


def test_calibration_measures_a_server_of_known_speed() -> None:
    engine = _TimedEngine()
    plan = CalibrationPlan(prefill_prompt_len=64, decode_prompt_len=8, decode_output_len=4, tpot_slo_s=0.06,
                           burst=2, rounds=2, max_batch=8, timeout=10, layout_timeout_s=5)

    async def go() -> dict:
        async with TestServer(engine.app(), host="127.0.0.1") as server:
            return await calibrate_url(str(server.make_url("")).rstrip("/"), plan)

    got = asyncio.run(go())
    json.dumps(got)
    prefill, decode = got["prefill"], got["decode"]
    # Two 64-token prompts, one after the other at 1000 tok/s: the second's TTFT is 128 ms.
    assert 0.5 * PREFILL_TOK_S < prefill["tok_per_s"] <= PREFILL_TOK_S * 1.01
    assert prefill["burst"] == 2 and len(prefill["rounds"]) == 2
    # TPOT 20 ms at batch 1, 40 at 2, 80 at 4: 4 misses 60 ms, so the sweep stops there and picks 2.
    assert [p["batch"] for p in decode["sweep"]] == [1, 2, 4]
    assert decode["batch"] == 2 and decode["meets_tpot_slo"]
    # About 1 / STEP_S_PER_SEQ at any batch (a little over when a request's first step ran alone).
    assert 0.5 / STEP_S_PER_SEQ < decode["tok_per_s"] < 1.25 / STEP_S_PER_SEQ
    assert got["layout"]["up"] == 1 and got["plan"]["max_batch"] == 8
    probes = [b for b in engine.bodies if len(b["prompt"]) == 64]
    assert len({tuple(b["prompt"]) for b in probes}) == 4  # fresh prompts: no prefix-cache hit
    assert all(b["ignore_eos"] and b["min_tokens"] == b["max_tokens"] == 1 for b in probes)


class _ThreadedServer:
    """The fake engine on its own event loop in a thread, for `pd.run`, which runs its own loops."""

    def __enter__(self) -> _ThreadedServer:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def start() -> TestServer:
            server = TestServer(_TimedEngine().app(), host="127.0.0.1")
            await server.start_server()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.url = str(self.server.make_url("")).rstrip("/")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_calibrated_run_against_a_url_writes_the_calibration(tmp_path) -> None:
    path = tmp_path / "pd.json"
    with _ThreadedServer() as server:
        args = build_parser().parse_args([
            "bench", "pd", "--url", server.url, "--phase-s", "0.5", "--prompt-len1", "64", "--prompt-len2", "8",
            "--output-len2", "4", "--tpot-slo-ms", "60", "--calib-max-batch", "4", "--prefill-factor", "0.2",
            "--decode-factor", "0.3", "--seeds", "4,5", "--json", str(path)])
        assert pd.run(args) == 0
    doc = json.loads(path.read_text())
    cal = doc["calibration"]
    assert cal["factors"] == {"prefill": 0.2, "decode": 0.3} and cal["decode"]["batch"] == 2
    rates = cal["rates"]
    assert rates["prompt-heavy"] == pytest.approx(0.2 * cal["prefill"]["tok_per_s"] / 64, abs=1e-3)
    assert rates["decode-heavy"] == pytest.approx(0.3 * cal["decode"]["tok_per_s"] / 4, abs=1e-3)
    assert [p["rate"] for p in doc["phases"]] == [rates["prompt-heavy"], rates["decode-heavy"]]
    external = doc["runs"]["external"]
    assert [e["seed"] for e in external["seeds"]] == [4]  # --url: once, on the first seed
    assert external["overall"]["slo_attainment_pct"] == external["seeds"][0]["slo_attainment_pct"]
    assert external["seeds"][0]["layout"]["source"] == "scheduler"
