"""`xllm bench mm`: multimodal requests through each EPD placement (EP-D, ED-P, E-P-D).

The bench starts `xllm serve --model DIR --epd-placement P` itself, once per placement, and sends
the same seeded workload to each: chat requests with `--images` images each (data: URLs of
synthetic PNGs), a `--repeat-share` of which reuse an image an earlier request sent (the
embedding cache and the prefix cache see it again), at most `--concurrency` in flight, streamed.

Reported per placement: TTFT p50 / p90 / mean (ms, to the first content chunk), requests/s and
output tokens/s over the measured wall time, and from `GET /status` the encoder pool's figures
(requests and images encoded by encoders, encoder embedding-cache hits and hit rate, retries,
fallbacks to the prefill worker). `--json` writes everything (`bench.output.write_json`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import sys
import time
import urllib.request

import aiohttp
import numpy as np
from PIL import Image

from bench.client import BenchError, RequestResult, base_url, discover_model, stream_request
from bench.output import write_json
from bench.server_proc import add_server_arguments, fmt, running_server
from bench.stats import distinct_errors, percentile_ms
from services.scheduler.epd_placement import PLACEMENTS

__all__ = ["add_arguments", "run", "make_workload", "summarize"]

_POOL_KEYS = ("encoded_requests", "encoded_images", "encoder_cache_hits", "encode_retries", "encode_fallbacks")


def _png_data_url(width: int, height: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def make_workload(requests: int, images: int, repeat_share: float, width: int, height: int,
                  seed: int) -> list[list[dict]]:
    """The messages of each request: its images (some seen before) then a question."""
    rng = random.Random(seed)
    seen: list[int] = []
    workload = []
    for index in range(requests):
        parts: list[dict] = []
        for _ in range(images):
            if seen and rng.random() < repeat_share:
                image_seed = rng.choice(seen)
            else:
                image_seed = seed * 100_003 + len(seen)
                seen.append(image_seed)
            parts.append({"type": "image_url", "image_url": {"url": _png_data_url(width, height, image_seed)}})
        parts.append({"type": "text", "text": f"Describe picture set {index}."})
        workload.append([{"role": "user", "content": parts}])
    return workload


async def _send_all(url: str, workload: list[list[dict]], concurrency: int, max_tokens: int,
                    timeout: float) -> tuple[list[RequestResult], float]:
    base = base_url(url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        model = await discover_model(session, base)
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(messages: list[dict]) -> RequestResult:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                    "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}
            async with gate:
                return await stream_request(session, base + "/chat/completions", body, chat=True, timeout=timeout)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in workload))
        return list(results), time.perf_counter() - start


def _status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as resp:
        return json.loads(resp.read())


def _scheduler_after(url: str, moment: float, timeout_s: float = 30.0) -> dict:
    """The scheduler's figures from a status the gateway received after `moment` (monotonic):
    the gateway's `/status` is a copy it refreshes periodically."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = _status(url)
        age = status.get("status_age_s")
        if (age is not None and time.monotonic() - age > moment) or time.monotonic() > deadline:
            return status["scheduler"]
        time.sleep(0.1)


def summarize(results: list[RequestResult], wall: float, before: dict, after: dict) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    pool = {key: int(after.get(key, 0)) - int(before.get(key, 0)) for key in _POOL_KEYS}
    images = pool["encoded_images"]
    return {
        "requests": len(results), "completed": len(ok), "errors": distinct_errors(results),
        "ttft_ms": {"p50": percentile_ms(ttfts, 0.5), "p90": percentile_ms(ttfts, 0.9),
                    "mean": 1000 * sum(ttfts) / len(ttfts) if ttfts else None},
        "requests_per_s": len(ok) / wall if wall > 0 else 0.0,
        "output_tok_per_s": sum(r.output_tokens for r in ok) / wall if wall > 0 else 0.0,
        "wall_s": wall, **pool,
        "embedding_cache_hit_rate": pool["encoder_cache_hits"] / images if images else None,
        "encoders": after.get("encoders", 0),
    }


def run_placement(args: argparse.Namespace, placement: str, workload: list[list[dict]]) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--model", args.model, "--port", str(args.port),
            "--epd-placement", placement, "--encoder-workers", str(args.encoder_workers),
            "--workers", str(args.workers), "--kv-cache-memory", args.kv_cache_memory]
    for extra in args.serve_arg or []:
        argv += extra.split()
    with running_server(argv, url, args, placement):
        deadline = time.monotonic() + args.startup_timeout
        want = 0 if placement == "ep-d" else args.encoder_workers
        while _status(url)["scheduler"].get("encoders", 0) < want:
            if time.monotonic() > deadline:
                raise BenchError(f"[{placement}] the encoders did not register in {args.startup_timeout:g} s")
            time.sleep(0.5)
        # One unmeasured request with an image nobody else sends (kernels, allocator caches).
        asyncio.run(_send_all(url, make_workload(1, 1, 0.0, args.width, args.height, seed=10**6),
                              1, args.max_tokens, args.timeout))
        before = _scheduler_after(url, time.monotonic())
        print(f"[{placement}] ready; {len(workload)} requests, concurrency {args.concurrency}", flush=True)
        results, wall = asyncio.run(_send_all(url, workload, args.concurrency, args.max_tokens, args.timeout))
        return summarize(results, wall, before, _scheduler_after(url, time.monotonic()))


def print_table(runs: dict[str, dict]) -> None:
    print(f"{'placement':<10}{'req':>5}{'ok':>5}{'TTFT p50/p90/mean ms':>24}{'req/s':>8}{'out tok/s':>11}"
          f"{'enc img':>9}{'cache hit%':>11}{'fallbacks':>10}")
    for name, s in runs.items():
        t = s["ttft_ms"]
        rate = s["embedding_cache_hit_rate"]
        print(f"{name:<10}{s['requests']:>5}{s['completed']:>5}"
              f"{fmt(t['p50']) + '/' + fmt(t['p90']) + '/' + fmt(t['mean']):>24}{s['requests_per_s']:>8.2f}"
              f"{s['output_tok_per_s']:>11.1f}{s['encoded_images']:>9}"
              f"{'-' if rate is None else f'{100 * rate:.1f}':>11}{s['encode_fallbacks']:>10}")
        for err in s["errors"]:
            print(f"    error: {err}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a multimodal HF directory (e.g. Qwen2.5-VL)")
    p.add_argument("--placements", default=",".join(PLACEMENTS), help="comma-separated, run in this order")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--encoder-workers", type=int, default=1, help="encoders for ed-p / e-p-d")
    p.add_argument("--kv-cache-memory", default="256MiB")
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=16)
    w.add_argument("--images", type=int, default=1, help="images per request")
    w.add_argument("--repeat-share", type=float, default=0.5, help="share of images an earlier request sent")
    w.add_argument("--width", type=int, default=224)
    w.add_argument("--height", type=int, default=224)
    w.add_argument("--max-tokens", type=int, default=16)
    w.add_argument("--concurrency", type=int, default=4)
    w.add_argument("--seed", type=int, default=0)
    add_server_arguments(p, port=8021)
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")


def run(args: argparse.Namespace) -> int:
    placements = [m.strip() for m in args.placements.split(",") if m.strip()]
    if not placements or any(m not in PLACEMENTS for m in placements):
        print(f"xllm bench mm: --placements takes {', '.join(PLACEMENTS)}", file=sys.stderr)
        return 2
    if not 0.0 <= args.repeat_share <= 1.0 or args.requests < 1 or args.images < 1:
        print("xllm bench mm: --requests and --images must be >= 1, --repeat-share in [0, 1]", file=sys.stderr)
        return 2
    workload = make_workload(args.requests, args.images, args.repeat_share, args.width, args.height, args.seed)
    runs: dict[str, dict] = {}
    try:
        for placement in placements:
            runs[placement] = run_placement(args, placement, workload)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"xllm bench mm: {exc}", file=sys.stderr)
        if not runs:
            return 1
    print_table(runs)
    write_json(args.json_path, {
        "benchmark": "mm", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model,
        "workers": args.workers, "encoder_workers": args.encoder_workers, "cpu_count": os.cpu_count(),
        "workload": {"requests": args.requests, "images": args.images, "repeat_share": args.repeat_share,
                     "size": [args.width, args.height], "max_tokens": args.max_tokens,
                     "concurrency": args.concurrency, "seed": args.seed},
        "runs": runs,
    })
    return 0
