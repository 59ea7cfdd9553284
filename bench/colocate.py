"""`xllm bench colocate`: online traffic alone, then the same traffic with a large batch beside it.

1. Saturation: closed-loop streams of the online shape for `--saturation-s` seconds: the output
   tokens/s this machine serves at most (the capacity).
2. Online alone: Poisson arrivals at `--online-fraction` of the capacity for `--duration` seconds;
   SLO attainment, TTFT/TPOT p50/p99, the online output tokens/s.
3. Online + batch: the same seeded arrivals while a Batch API job (`--batch-lines` completions of
   `--batch-output-len` tokens) is submitted at the start; the online figures again, and the offline
   tokens/s absorbed over the same window (from the gateway's `xllm_offline_generation_tokens`).

Idle capacity = capacity - online output tokens/s (run 2); the report gives the share of it the
batch used, and how many points of online SLO attainment it cost.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import sys
import time

import aiohttp

from bench.client import base_url, discover_model, stream_request
from bench.output import write_json, write_plot
from bench.pd_workload import Phase, make_workload, run_workload, summarize_run
from bench.server_proc import add_server_arguments, fmt, running_server
from bench.stats import percentile_ms

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="a running server (default: start `xllm serve` here)")
    p.add_argument("--workers", type=int, default=1)
    add_server_arguments(p, port=8790)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of online arrivals per run")
    p.add_argument("--saturation-s", type=float, default=20.0)
    p.add_argument("--saturation-concurrency", type=int, default=16)
    p.add_argument("--online-fraction", type=float, default=0.4, help="online load as a share of the capacity")
    p.add_argument("--ttft-slo-ms", type=float, default=2000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=200.0)
    p.add_argument("--batch-lines", type=int, default=2000)
    p.add_argument("--batch-output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--plot", default=None, help="PNG: online TTFT/TPOT and offline tokens/s of both runs")


def _prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 10_000) for _ in range(n)]


async def _saturation(url: str, model: str, args: argparse.Namespace) -> float:
    """Output tokens/s of closed-loop streams of the online shape (no new stream after the deadline;
    the ones running then finish and count)."""
    rng = random.Random(args.seed + 1)
    endpoint = base_url(url) + "/completions"
    tokens = 0
    deadline = time.monotonic() + args.saturation_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def loop() -> None:
            nonlocal tokens
            while time.monotonic() < deadline:
                body = {"model": model, "prompt": _prompt(rng, args.prompt_len), "max_tokens": args.output_len,
                        "min_tokens": args.output_len, "ignore_eos": True, "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}}
                r = await stream_request(session, endpoint, body, chat=False, timeout=args.timeout)
                if r.ok:  # the tail past the deadline counts, and its time too
                    tokens += r.output_tokens
        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(args.saturation_concurrency)))
    return tokens / (time.monotonic() - t0)


async def _offline_tokens(session: aiohttp.ClientSession, root: str) -> float:
    async with session.get(root + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("xllm_offline_generation_tokens_total "):
            return float(line.split()[1])
    return 0.0


async def _submit_batch(session: aiohttp.ClientSession, root: str, model: str, args: argparse.Namespace) -> str:
    rng = random.Random(args.seed + 2)
    lines = [json.dumps({"custom_id": f"off-{i}", "method": "POST", "url": "/v1/completions",
                         "body": {"model": model, "prompt": _prompt(rng, args.prompt_len), "temperature": 0.0,
                                  "max_tokens": args.batch_output_len, "min_tokens": args.batch_output_len,
                                  "ignore_eos": True}}) for i in range(args.batch_lines)]
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", io.BytesIO(("\n".join(lines) + "\n").encode()), filename="colocate.jsonl")
    async with session.post(root + "/v1/files", data=form) as resp:
        file_id = (await resp.json())["id"]
    async with session.post(root + "/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                         "completion_window": "24h"}) as resp:
        return (await resp.json())["id"]


def _p99s(record) -> dict:
    ok = [o.result for o in record.outcomes if o.result.ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    return {"ttft_p99_ms": percentile_ms([r.ttft for r in ok], 0.99), "tpot_p99_ms": percentile_ms(tpots, 0.99)}


async def _measure(url: str, args: argparse.Namespace) -> dict:
    root = base_url(url)[: -len("/v1")]
    async with aiohttp.ClientSession() as session:
        model = await discover_model(session, base_url(url))
    capacity = await _saturation(url, model, args)
    rate = args.online_fraction * capacity / args.output_len
    phases = [Phase("online", args.duration, rate, args.prompt_len, args.output_len)]
    workload = make_workload(phases, seed=args.seed)
    slo = (args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
    print(f"capacity {capacity:.0f} output tok/s; online: {rate:.2f} req/s for {args.duration:g} s", flush=True)

    alone = await run_workload(url, workload, model=model, timeout=args.timeout)
    alone_summary = {**summarize_run(alone, phases, *slo)["overall"], **_p99s(alone)}

    async with aiohttp.ClientSession() as session:
        batch_id = await _submit_batch(session, root, model, args)
        before, t0 = await _offline_tokens(session, root), time.monotonic()
        together = await run_workload(url, workload, model=model, timeout=args.timeout)
        offline_tok_s = (await _offline_tokens(session, root) - before) / (time.monotonic() - t0)
        async with session.post(f"{root}/v1/batches/{batch_id}/cancel") as resp:
            await resp.read()
    together_summary = {**summarize_run(together, phases, *slo)["overall"], **_p99s(together)}
    online_tok_s = alone_summary.get("output_tok_per_s") or 0.0
    idle = max(0.0, capacity - online_tok_s)
    return {
        "capacity_output_tok_s": capacity, "online_rate_req_s": rate, "online_alone": alone_summary,
        "online_with_batch": together_summary, "offline_tok_s": offline_tok_s, "idle_capacity_tok_s": idle,
        "idle_used_pct": 100.0 * offline_tok_s / idle if idle > 0 else None,
        "attainment_drop_pts": (alone_summary["slo_attainment_pct"] or 0) - (together_summary["slo_attainment_pct"] or 0),
        "config": {k: v for k, v in vars(args).items() if k != "func"},
    }


def _print(result: dict) -> None:
    a, b = result["online_alone"], result["online_with_batch"]
    print(f"{'':14} {'SLO %':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'TPOT p99':>9} {'out tok/s':>10}")
    for name, s in (("online alone", a), ("with batch", b)):
        print(f"{name:14} {fmt(s['slo_attainment_pct'], '.1f'):>6} {fmt(s['ttft_ms']['p50']):>9} "
              f"{fmt(s['ttft_p99_ms']):>9} {fmt(s['tpot_ms']['p50'], '.1f'):>9} {fmt(s['tpot_p99_ms'], '.1f'):>9} "
              f"{fmt(s['output_tok_per_s'], '.1f'):>10}")
    print(f"capacity {result['capacity_output_tok_s']:.0f} tok/s, idle {result['idle_capacity_tok_s']:.0f} tok/s; "
          f"the batch absorbed {result['offline_tok_s']:.0f} tok/s ({fmt(result['idle_used_pct'], '.0f')}% of idle); "
          f"online attainment -{result['attainment_drop_pts']:.1f} points")


def _plot(path: str, result: dict) -> None:
    from bench.chart import Bars, bar_chart

    a, b = result["online_alone"], result["online_with_batch"]
    labels = ["online alone", "with batch"]
    bar_chart(path, [
        Bars("online SLO attainment", "%", labels, {"online": [a["slo_attainment_pct"], b["slo_attainment_pct"]]}),
        Bars("online TPOT p99", "ms", labels, {"online": [a["tpot_p99_ms"], b["tpot_p99_ms"]]}),
        Bars("output tokens/s", "tok/s", ["online", "offline (batch)", "idle capacity"],
             {"with batch": [b["output_tok_per_s"], result["offline_tok_s"], result["idle_capacity_tok_s"]]}),
    ], title="online/offline co-location")


def run(args: argparse.Namespace) -> int:
    if args.url:
        result = asyncio.run(_measure(args.url, args))
    else:
        url = f"http://127.0.0.1:{args.port}"
        argv = [sys.executable, "-m", "xllm.cli", "serve", "--workers", str(args.workers), "--port", str(args.port)]
        for extra in args.serve_arg or ():
            argv += extra.split()
        with running_server(argv, url, args, "colocate"):
            result = asyncio.run(_measure(url, args))
    _print(result)
    write_json(args.json, result)
    write_plot(args.plot, _plot, result)
    return 0
