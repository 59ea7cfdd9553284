"""`xllm bench dp-balance`: a skewed burst on 2 workers with DP balance off, then on.

Each run starts its own `xllm serve --workers 2` (plus `--dp-balance` for "on"), pauses worker-1
(SIGSTOP) until the scheduler holds it suspect so the whole burst is routed to worker-0, resumes
it, and streams the burst to the end. Reported per run: the requests each worker holds over time
(the scheduler's view, sampled from /status), the largest gap once worker-1 is back, p50/p99
TPOT and end-to-end latency, and the migrations the balancer made. Results go to `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from typing import Any

import aiohttp

from bench.client import discover_model, stream_request
from bench.output import write_json
from bench.server_proc import add_server_arguments, running_server
from bench.stats import percentile_ms

__all__ = ["add_arguments", "run"]

WORDS = "the quick brown fox jumps over a lazy dog while the river runs to the sea".split()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_arguments(p, port=18620)
    p.add_argument("--requests", type=int, default=8, help="streams in the skewed burst")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threshold", type=int, default=2, help="--dp-balance-threshold of the 'on' run")
    p.add_argument("--modes", default="off,on", help="comma-separated: off, on")
    p.add_argument("--json", default=None, help="write the results here")


def _prompt(i: int) -> str:
    return f"Tale {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(8 + 4 * i))


def _status(url: str) -> dict:
    with urllib.request.urlopen(url + "/status", timeout=10) as resp:
        return json.loads(resp.read())


def _held(url: str) -> dict[str, int]:
    return {inst["id"]: int(inst.get("inflight", 0)) for inst in _status(url)["instances"]}


def _wait(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.25)


async def _burst(url: str, args: argparse.Namespace, pid: int) -> dict:
    async with aiohttp.ClientSession() as session:
        model = await discover_model(session, url + "/v1")
        bodies = [{"model": model, "prompt": _prompt(i),
                   "max_tokens": args.max_tokens, "temperature": 0.0, "ignore_eos": True, "stream": True,
                   "stream_options": {"include_usage": True}} for i in range(args.requests)]
        tasks = [asyncio.create_task(stream_request(session, url + "/v1/completions", b, chat=False,
                                                    timeout=args.timeout)) for b in bodies]
        await asyncio.to_thread(_wait, lambda: _held(url).get("worker-0", 0) >= args.requests, 60,
                                "the burst on worker-0")
        os.kill(pid, signal.SIGCONT)
        resumed = time.monotonic()
        timeline: list[dict] = []
        while not all(t.done() for t in tasks):
            held = await asyncio.to_thread(_held, url)
            timeline.append({"t": round(time.monotonic() - resumed, 2), **held})
            await asyncio.sleep(0.25)
        results = [t.result() for t in tasks]
    tpots = sorted(r.tpot for r in results if r.ok and r.tpot is not None)
    e2e = sorted(r.e2e for r in results if r.ok)
    gaps = [abs(s.get("worker-0", 0) - s.get("worker-1", 0)) for s in timeline]
    return {
        "ok": sum(r.ok for r in results), "errors": [r.error for r in results if not r.ok][:5],
        "tpot_p50_ms": _ms(percentile_ms(tpots, 0.5)), "tpot_p99_ms": _ms(percentile_ms(tpots, 0.99)),
        "e2e_p50_ms": _ms(percentile_ms(e2e, 0.5)), "e2e_p99_ms": _ms(percentile_ms(e2e, 0.99)),
        "max_gap": max(gaps, default=0), "mean_gap": round(sum(gaps) / len(gaps), 2) if gaps else 0.0,
        "timeline": timeline,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _one(mode: str, args: argparse.Namespace) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--workers", "2", "--port", str(args.port),
            "--suspect-after", "1", "--heartbeat-timeout", "300"]
    if mode == "on":
        argv += ["--dp-balance", "--dp-balance-threshold", str(args.threshold), "--dp-balance-interval-s", "0.25"]
    for extra in args.serve_arg or ():
        argv += extra.split()
    with running_server(argv, url, args, mode):
        pid = next(i["stats"]["pid"] for i in _status(url)["instances"] if i["id"] == "worker-1")
        os.kill(pid, signal.SIGSTOP)
        try:
            _wait(lambda: any(i["id"] == "worker-1" and i["liveness"] != "alive" for i in _status(url)["instances"]),
                  30, "worker-1 suspect")
            result = asyncio.run(_burst(url, args, pid))
        finally:
            os.kill(pid, signal.SIGCONT)
        result["dp_balance"] = _status(url)["scheduler"].get("dp_balance", {})
    print(f"[{mode}] ok {result['ok']}/{args.requests}  max gap {result['max_gap']}  mean gap {result['mean_gap']}  "
          f"TPOT p50/p99 {result['tpot_p50_ms']}/{result['tpot_p99_ms']} ms  "
          f"migrations {result['dp_balance'].get('migrations_total', 0)}", flush=True)
    return result


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in ("off", "on") for m in modes):
        print("--modes takes off and/or on", file=sys.stderr)
        return 2
    doc = {"requests": args.requests, "max_tokens": args.max_tokens, "threshold": args.threshold,
           "runs": {mode: _one(mode, args) for mode in modes}}
    write_json(args.json, doc)
    return 0
