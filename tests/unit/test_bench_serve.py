"""`xllm bench serve` against a tiny in-test server that speaks the OpenAI streaming protocol.

The server is fake on purpose: this tests the load generator (request bodies, SSE parsing,
timing, concurrency, the JSON and PNG outputs), not a model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import threading
import zlib

import matplotlib.image
import numpy as np
import pytest
from aiohttp import web

from bench import serve as bench_serve
from bench.chart import LINE_COLOR, line_chart

TOKEN_DELAY = 0.004  # seconds between streamed tokens


class FakeOpenAIServer:
    """/v1/models, /v1/completions and /v1/chat/completions (streaming only), in a thread."""

    def __init__(self, fail_status: int | None = None):
        self.fail_status = fail_status
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeOpenAIServer:
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
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._stream(request, body, len(body["prompt"]), chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._stream(request, body, len(body["messages"][0]["content"].split()), chat=True)

    async def _stream(self, request: web.Request, body: dict, prompt_tokens: int, chat: bool) -> web.StreamResponse:
        self.bodies.append(body)
        if self.fail_status:
            return web.json_response({"error": {"message": "nope", "type": "invalid_request_error"}},
                                     status=self.fail_status)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            n = body["max_tokens"]
            for i in range(n):
                await asyncio.sleep(TOKEN_DELAY)
                finish = "length" if i == n - 1 else None
                choice = ({"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": finish} if chat
                          else {"index": 0, "text": f" t{i}", "finish_reason": finish})
                await resp.write(b"data: " + json.dumps({"id": "x", "choices": [choice]}).encode() + b"\n\n")
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            await resp.write(b"data: " + json.dumps({"id": "x", "choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        finally:
            self.in_flight -= 1


def _args(url: str, tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_serve.add_arguments(parser)
    return parser.parse_args(["--url", url, "--json", str(tmp_path / "out" / "serve.json"),
                              "--png", str(tmp_path / "out" / "serve.png"), *extra])


def _read_png(path) -> np.ndarray:
    """The pixels of a PNG file as 0-255 RGB(A) integers, shape (height, width, channels), after
    checking its signature, the IHDR/IEND framing and every chunk's CRC, and decoding it with
    matplotlib."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, payload = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + payload) & 0xFFFFFFFF, tag
        chunks.append((tag, payload))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and len(chunks[0][1]) == 13 and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[0][1])
    assert depth == 8 and color in (2, 6)  # 8-bit RGB or RGBA
    pixels = matplotlib.image.imread(path)
    assert pixels.shape == (height, width, 3 if color == 2 else 4)
    return np.rint(pixels * 255).astype(np.int64)


def _has_line_color(pixels: np.ndarray) -> bool:
    """Whether some pixel is exactly the plotted series' colour (the inside of a marker)."""
    rgb = tuple(int(LINE_COLOR[i:i + 2], 16) for i in (1, 3, 5))
    return bool((pixels[..., :3] == rgb).all(axis=-1).any())


def test_completions_sweep_writes_json_and_png(tmp_path, capsys):
    with FakeOpenAIServer() as server:
        args = _args(server.url, tmp_path, "--concurrency", "1,4", "--num-requests", "8", "--prompt-len", "12",
                     "--output-len", "6", "--ignore-eos", "--vocab-size", "500", "--warmup", "1")
        assert bench_serve.run(args) == 0
    # Bodies: 1 warm-up + 8 per level; token-id prompts of exactly --prompt-len ids.
    assert len(server.bodies) == 17
    for body in server.bodies:
        assert body["model"] == "fake-model"  # discovered from /v1/models
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
        assert len(body["prompt"]) == 12 and all(isinstance(t, int) and 100 <= t < 500 for t in body["prompt"])
        assert body["ignore_eos"] is True and body["min_tokens"] == body["max_tokens"]
    assert [b["max_tokens"] for b in server.bodies[1:]] == [6] * 16
    assert 2 <= server.max_in_flight <= 4

    doc = json.loads((tmp_path / "out" / "serve.json").read_text())
    assert doc["benchmark"] == "serve" and doc["model"] == "fake-model" and doc["endpoint"] == "completions"
    assert [e["concurrency"] for e in doc["results"]] == [1, 4]
    for entry in doc["results"]:
        assert entry["completed"] == 8 and entry["failed"] == 0 and entry["errors"] == []
        assert entry["total_output_tokens"] == 8 * 6 and entry["mean_output_tokens"] == 6
        assert entry["total_input_tokens"] == 8 * 12 and entry["mean_prompt_tokens"] == 12
        assert entry["output_throughput"] > 0 and entry["request_throughput"] > 0 and entry["duration_s"] > 0
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            stats = entry[key]
            assert set(stats) == {"mean", "p50", "p99"}
            assert 0 < stats["p50"] <= stats["p99"], key
        # The server waits TOKEN_DELAY before every token: the gaps show up in TPOT and TTFT < E2E.
        assert entry["tpot_ms"]["mean"] >= 0.5 * TOKEN_DELAY * 1000
        assert entry["ttft_ms"]["mean"] < entry["e2e_ms"]["mean"]
    out = capsys.readouterr().out
    assert "concurrency    1" in out and "concurrency    4" in out

    pixels = _read_png(tmp_path / "out" / "serve.png")
    assert pixels.shape[:2] == (420, 1120)  # two panels: output tok/s vs TTFT, vs TPOT
    assert _has_line_color(pixels)  # the plotted points
    assert "plot written to" in out


def test_chat_endpoint_and_explicit_model(tmp_path):
    with FakeOpenAIServer() as server:
        args = _args(server.url + "/v1/", tmp_path, "--endpoint", "chat", "--model", "m", "--concurrency", "2",
                     "--num-requests", "3", "--prompt-len", "20", "--output-len", "3", "--warmup", "0")
        assert bench_serve.run(args) == 0
    assert len(server.bodies) == 3
    for body in server.bodies:
        assert body["model"] == "m" and "ignore_eos" not in body
        assert len(body["messages"][0]["content"].split()) == 20
    (entry,) = json.loads((tmp_path / "out" / "serve.json").read_text())["results"]
    assert entry["completed"] == 3 and entry["mean_prompt_tokens"] == 20 and entry["total_output_tokens"] == 9


def test_failed_requests_are_counted_not_fatal(tmp_path, capsys):
    with FakeOpenAIServer(fail_status=400) as server:
        args = _args(server.url, tmp_path, "--model", "m", "--concurrency", "1,2", "--num-requests", "3",
                     "--output-len", "2", "--prompt-len", "4")
        assert bench_serve.run(args) == 1  # nothing completed
    doc = json.loads((tmp_path / "out" / "serve.json").read_text())
    for entry in doc["results"]:
        assert entry["completed"] == 0 and entry["failed"] == 3
        assert len(entry["errors"]) == 1 and entry["errors"][0].startswith("HTTP 400")
        assert entry["tpot_ms"] == {"mean": None, "p50": None, "p99": None}
    assert not (tmp_path / "out" / "serve.png").exists()  # no point to plot
    assert "HTTP 400" in capsys.readouterr().err


def test_unreachable_server_without_model_is_a_clear_error(tmp_path, capsys):
    with FakeOpenAIServer() as server:
        url = server.url
    args = _args(url, tmp_path, "--concurrency", "1", "--num-requests", "1")
    assert bench_serve.run(args) == 2
    assert "pass --model" in capsys.readouterr().err


def test_cli_wires_bench_serve():
    from xllm.cli import build_parser

    args = build_parser().parse_args(["bench", "serve", "--url", "http://h:1", "--concurrency", "1,16,64",
                                      "--endpoint", "chat", "--ignore-eos"])
    assert args.func is bench_serve.run
    assert args.concurrency == [1, 16, 64] and args.endpoint == "chat" and args.ignore_eos
    for bad in (["--concurrency", "0"], ["--concurrency", "a,b"], ["--endpoint", "embeddings"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["bench", "serve", *bad])


def test_plot_handles_one_point_and_flat_values(tmp_path):
    for xs, ys in (([5.0], [100.0]), ([0.0, 0.0], [0.0, 0.0]), ([0.5, 1.5, 30.0], [1e4, 2e4, 3e4])):
        path = tmp_path / "p.png"
        path.unlink(missing_ok=True)
        line_chart(str(path), xs, ys, [f"c={i}" for i in range(len(xs))], title="t", x_label="x", y_label="y",
                   width=200, height=150)
        pixels = _read_png(path)
        assert pixels.shape[:2] == (150, 200)
        assert _has_line_color(pixels), (xs, ys)
    line_chart(str(tmp_path / "default.png"), [1.0, 2.0], [3.0, 4.0])  # no labels, no titles
    assert _read_png(tmp_path / "default.png").shape[:2] == (440, 640)
    for bad in (([1.0], []), ([], []), ([1.0, 2.0], [1.0, 2.0], ["only one label"])):
        with pytest.raises(ValueError):
            line_chart(str(tmp_path / "q.png"), *bad)
    assert not (tmp_path / "q.png").exists()
