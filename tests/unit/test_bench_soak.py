"""The pure parts of `xllm bench soak`: its flags, the request mix, the verdicts, the chart."""

from __future__ import annotations

import argparse
import json

import pytest

from bench import soak
from bench.server_watch import instance_views
from bench.soak_report import Sample, count_outcomes, pages_verdict, rss_verdict, slope_per_1k, write_plot
from bench.soak_workload import DEFAULT_MIX, KINDS, MALFORMED_VARIANTS, Outcome, make_requests, parse_mix

MIB = 1 << 20


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    soak.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_flags_and_defaults():
    args = _parse()
    assert args.requests == 10_000 and args.url is None and args.mix == DEFAULT_MIX
    args = _parse("--requests", "300", "--mix", "plain=1,malformed=1", "--url", "http://h:1")
    assert args.requests == 300 and args.mix["plain"] == 1 and args.mix["stream"] == 0
    for bad in (["--requests", "0"], ["--mix", "nonsense=3"], ["--mix", "plain=x"], ["--mix", "plain=0"]):
        with pytest.raises(SystemExit):
            _parse(*bad)


def test_serve_argv_carries_workers_port_and_extra_flags():
    argv = soak.serve_argv(_parse("--workers", "3", "--port", "9001", "--serve-arg", "--dtype float32"))
    assert argv[2:4] == ["xllm.cli", "serve"]
    assert argv[argv.index("--workers") + 1] == "3" and argv[argv.index("--port") + 1] == "9001"
    assert argv[-2:] == ["--dtype", "float32"]


def test_parse_mix():
    assert parse_mix("plain=2, abort=1") == {k: {"plain": 2, "abort": 1}.get(k, 0) for k in KINDS}
    with pytest.raises(ValueError):
        parse_mix("")


def test_requests_are_seeded_mixed_and_well_formed_where_meant():
    a = make_requests(2000, seed=5, model="m", max_model_len=64)
    b = make_requests(2000, seed=5, model="m", max_model_len=64)
    assert [(r.kind, r.variant, r.body, r.raw) for r in a] == [(r.kind, r.variant, r.body, r.raw) for r in b]
    kinds = {k: sum(r.kind == k for r in a) for k in KINDS}
    for kind, weight in DEFAULT_MIX.items():  # within a few points of the weights
        assert abs(kinds[kind] / len(a) - weight / sum(DEFAULT_MIX.values())) < 0.05, kinds
    assert {r.variant for r in a if r.kind == "malformed"} == set(MALFORMED_VARIANTS)
    for r in a:
        if r.kind != "malformed":
            assert r.body["model"] == "m" and 1 <= r.body["max_tokens"]
            assert r.path == ("/v1/chat/completions" if r.kind == "chat" else "/v1/completions")
        if r.kind == "abort":
            assert r.stream and r.abort_after >= 1 and r.body["ignore_eos"]
        if r.variant == "too_long":
            assert len(r.body["prompt"]) == 65
        if r.variant == "bad_json":
            with pytest.raises(ValueError):
                json.loads(r.raw)


def test_only_the_kinds_of_the_mix_are_drawn():
    reqs = make_requests(200, seed=1, model="m", max_model_len=64, mix=parse_mix("malformed=1"))
    assert {r.kind for r in reqs} == {"malformed"}


def test_count_outcomes():
    outcomes = [
        Outcome(0, "plain", "text", 200, True), Outcome(1, "malformed", "bad_json", 400, True),
        Outcome(2, "malformed", "too_long", 500, False, "malformed request (too_long) answered 500"),
        Outcome(3, "stream", "text", None, False, "ClientConnectionError: x"),
    ]
    c = count_outcomes(outcomes)
    summary = (c["sent"], c["unexpected"], c["server_errors_5xx"], c["no_response"], c["malformed_not_4xx"])
    assert summary == (4, 2, 1, 1, 1)
    assert c["by_kind"]["malformed"]["status"] == {"400": 1, "500": 1}
    assert c["by_kind"]["stream"]["status"] == {"none": 1}
    assert len(c["problems"]) == 2 and c["problems"][0].startswith("[malformed/too_long]")


def test_pages_verdict():
    assert pages_verdict({"w0": 0, "w1": 2}, {"w0": 0, "w1": 1}, 40)["back_to_idle"]
    v = pages_verdict({"w0": 0}, {"w0": 3, "w1": 0}, 40)
    assert not v["back_to_idle"] and v["leaked"] == {"w0": 3}


def test_slope_and_rss_verdict():
    assert slope_per_1k([(0, 1.0)]) is None
    assert slope_per_1k([(0, 100.0), (1000, 102.0), (2000, 104.0)]) == pytest.approx(2.0)
    samples = [Sample(t, done, {}, {"w0": 1000 * MIB + done * 1024, "w1": 1000 * MIB}) for t, done in
               [(0, 0), (1, 1000), (2, 2000), (3, 3000)]]
    v = rss_verdict({"w0": 1000 * MIB, "w1": 1000 * MIB}, {"w0": 1100 * MIB, "w1": 1001 * MIB}, samples, 64)
    assert not v["flat"] and not v["workers"]["w0"]["flat"] and v["workers"]["w1"]["flat"]
    assert v["workers"]["w0"]["growth_mib"] == pytest.approx(100)
    assert v["workers"]["w0"]["trend_mib_per_1k_requests"] == pytest.approx(1000 * 1024 / MIB)
    # Growth while memory is first touched, then flat: no leak.
    warm = [Sample(t, done, {}, {"w0": (1000 + min(done, 1000) // 5) * MIB}) for t, done in
            [(0, 0), (1, 500), (2, 1000), (3, 2000), (4, 3000), (5, 4000)]]
    v = rss_verdict({"w0": 1000 * MIB}, {"w0": 1200 * MIB}, warm, 32)
    assert v["flat"] and v["workers"]["w0"]["growth_mib"] == pytest.approx(200)
    assert v["workers"]["w0"]["second_half_growth_mib"] == 0 and v["workers"]["w0"]["trend_mib_per_1k_requests"] == 0
    unjudged = rss_verdict({"w0": MIB}, {"w1": MIB}, samples, 64)
    assert unjudged["not_judged"] == ["w0", "w1"] and unjudged["flat"] is None


def test_instance_views_read_the_status():
    status = {"instances": [{"id": "worker-0", "state": "ready", "used_pages": 3, "total_pages": 91, "running": 1,
                             "waiting": 0, "inflight": 1, "stats": {"pid": 42, "integrity_failures": 0,
                                                                    "audited_at_step": 5, "steps": 7}}]}
    v = instance_views(status)["worker-0"]
    assert (v.used_pages, v.pid, v.steps, v.idle) == (3, 42, 7, False)
    assert instance_views(None) == {}


def test_plot_is_written(tmp_path):
    doc = {"concurrency": 4, "counts": {"sent": 10},
           "samples": [{"t": 0, "done": 0, "used_pages": {"w0": 0}, "rss": {"w0": 900 * MIB}},
                       {"t": 1, "done": 10, "used_pages": {"w0": 4}, "rss": {"w0": 901 * MIB}}]}
    path = tmp_path / "soak.png"
    write_plot(str(path), doc)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- judging real HTTP answers (a canned aiohttp server on loopback, no engine) -----------------

async def _canned(request):
    from aiohttp import web

    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"error": {"message": "bad json", "code": "invalid_json"}}, status=400)
    case = body.get("prompt") if isinstance(body, dict) else None
    if case == "json-200":
        return web.json_response({"choices": [{"text": "hi"}]})
    if case == "plain-500":
        return web.Response(status=500, text="boom")
    if case == "html-400":
        return web.Response(status=400, text="<html>bad</html>")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(3):
        await resp.write(b'data: {"choices": [{"text": "t%d"}]}\n\n' % i)
    if case == "sse-error":
        await resp.write(b'data: {"error": {"message": "worker died"}}\n\n')
    if case != "sse-cut":
        await resp.write(b"data: [DONE]\n\n")
    return resp


def _judge(requests):
    import asyncio

    import aiohttp
    from aiohttp import web

    from bench.soak_workload import send

    async def main():
        app = web.Application()
        app.router.add_post("/v1/completions", _canned)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as session:
                return [await send(session, url, r, 10) for r in requests]
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def test_send_judges_each_kind_of_answer():
    from bench.soak_workload import SoakRequest

    path = "/v1/completions"
    cases = [
        SoakRequest(0, "plain", "text", path, {"prompt": "json-200"}),
        SoakRequest(1, "stream", "text", path, {"prompt": "sse-ok", "stream": True}),
        SoakRequest(2, "stream", "text", path, {"prompt": "sse-error", "stream": True}),
        SoakRequest(3, "stream", "text", path, {"prompt": "sse-cut", "stream": True}),
        SoakRequest(4, "abort", "close", path, {"prompt": "sse-cut", "stream": True}, abort_after=2),
        SoakRequest(5, "malformed", "bad_json", path, raw=b"{nope"),
        SoakRequest(6, "malformed", "wrong_type", path, {"prompt": "json-200"}),
        SoakRequest(7, "malformed", "too_long", path, {"prompt": "plain-500"}),
        SoakRequest(8, "malformed", "bad_messages", path, {"prompt": "html-400"}),
        SoakRequest(9, "plain", "text", path, {"prompt": "plain-500"}),
    ]
    got = {o.index: o for o in _judge(cases)}
    assert [got[i].ok for i in range(10)] == [True, True, False, False, True, True, False, False, False, False]
    assert got[1].chunks == 3 and got[4].chunks == 2
    assert "stream error event" in got[2].problem and "without [DONE]" in got[3].problem
    assert got[5].error_code == "invalid_json" and got[5].status == 400
    assert "answered 200" in got[6].problem and "answered 500" in got[7].problem
    assert "without an OpenAI-style JSON error" in got[8].problem and got[9].problem.startswith("HTTP 500")
