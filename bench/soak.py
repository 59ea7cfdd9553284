"""`xllm bench soak`: many short requests of every kind, and proof that nothing leaks.

Against a server it starts itself (`xllm serve --workers W`) or one at `--url`, the bench sends
`--requests` seeded requests (`bench/soak_workload.py`: short completions and chats, streamed or
not, streams the client abandons after a chunk or three, malformed requests of ten kinds) with at
most `--concurrency` in flight. Each one is judged: malformed -> a 4xx with an OpenAI-style JSON
error; anything else -> 200 and a whole answer.

Before the load (after `--warmup` requests, so most lazily allocated memory is already there), every
`--sample-every` seconds during it, and once the server is idle again afterwards, it records each
worker's RSS (psutil, on the worker processes of the server's process tree, or on the pids the
workers report in `/status` when the server is not its own) and the KV pages each instance holds
(`/status`). Verdicts: pages back to the idle level (per instance), RSS growth over the second
half of the requests within `--rss-tolerance-mib` (the first half may grow as KV pages and
allocator arenas are touched for the first time; the growth from the baseline and the trend, MiB
per 1000 requests, are reported too), error counts by kind. `--json` writes it all; `--plot`
draws RSS and pages over the run.
Exit status: 0 when every request got what it should and nothing leaked, 1 otherwise, 2 on a
setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from contextlib import nullcontext

import aiohttp

from bench.client import BenchError, discover_model
from bench.server_proc import add_server_arguments, running_server
from bench.server_watch import fetch_status, instance_views, rss_of, worker_processes
from bench.output import write_json, write_plot
from bench.soak_report import Sample, count_outcomes, pages_verdict, print_summary, rss_verdict
from bench.soak_report import write_plot as draw_plot
from bench.soak_workload import DEFAULT_MIX, Outcome, make_requests, parse_mix, send

__all__ = ["add_arguments", "run", "run_async", "serve_argv"]

DEFAULT_PORT = 8017


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _mix(text: str) -> dict[str, int]:
    try:
        return parse_mix(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None, help="soak this running server (default: start xllm serve on --port)")
    p.add_argument("--workers", type=_positive_int, default=2, help="workers of the server the bench starts")
    add_server_arguments(p, DEFAULT_PORT)
    p.add_argument("--requests", type=_positive_int, default=10_000, help="requests to send (after the warm-up)")
    p.add_argument("--concurrency", type=_positive_int, default=16, help="most requests in flight")
    p.add_argument("--mix", type=_mix, default=dict(DEFAULT_MIX),
                   help="kind weights, e.g. plain=35,stream=25,chat=10,abort=10,malformed=20 (the default)")
    p.add_argument("--max-output", type=_positive_int, default=16, help="largest max_tokens of a normal request")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured requests before the baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-every", type=float, default=2.0, help="seconds between looks at RSS and pages")
    p.add_argument("--idle-timeout", type=float, default=60.0,
                   help="seconds to wait, after the load, for every instance to be idle with its pages back")
    p.add_argument("--rss-tolerance-mib", type=float, default=32.0,
                   help="RSS growth per worker over the second half of the requests still called flat (the "
                        "first half may grow as memory is touched for the first time)")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--plot", dest="plot_path", default=None, help="draw RSS and used pages over the run here (PNG)")


def serve_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(args.port), "--workers", str(args.workers)]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


class _Watch:
    """Where the worker processes are: the launcher's tree when the bench knows it, else the pids
    the workers report in `/status`."""

    def __init__(self, session: aiohttp.ClientSession, url: str, launcher_pid: int | None) -> None:
        self.session, self.url, self.launcher_pid = session, url, launcher_pid

    async def look(self, t: float, done: int) -> tuple[Sample, dict]:
        status = await fetch_status(self.session, self.url)
        views = instance_views(status)
        if self.launcher_pid is not None:
            pids = {name: proc.pid for name, proc in worker_processes(self.launcher_pid).items()}
        else:
            pids = {name: v.pid for name, v in views.items() if v.pid is not None}
        sample = Sample(t, done, {name: v.used_pages for name, v in views.items()}, rss_of(pids))
        return sample, {"views": views, "pids": pids}

    async def wait_idle(self, timeout_s: float, idle_pages: dict[str, int] | None) -> tuple[Sample, dict, bool]:
        """Until every instance is idle (and, given `idle_pages`, holds no more pages than that)."""
        deadline = time.monotonic() + timeout_s
        while True:
            sample, info = await self.look(0.0, 0)
            views = info["views"]
            settled = bool(views) and all(v.idle for v in views.values()) and (
                idle_pages is None or all(sample.used_pages[i] <= idle_pages.get(i, 0) for i in sample.used_pages))
            if settled or time.monotonic() > deadline:
                return sample, info, settled
            await asyncio.sleep(0.5)


async def run_async(args: argparse.Namespace, url: str, launcher_pid: int | None = None) -> dict:
    """Warm up, take the baseline, run the load while sampling, wait for idle, judge."""
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        model = await discover_model(session, url.rstrip("/") + "/v1")
        status = await fetch_status(session, url)
        max_model_len = int(((status or {}).get("gateway") or {}).get("max_model_len") or 8192)
        watch = _Watch(session, url, launcher_pid)

        async def drive(requests: list, outcomes: list[Outcome | None]) -> None:
            pending = iter(requests)

            async def client() -> None:
                for req in pending:
                    outcomes[req.index] = await send(session, url, req, args.timeout)

            await asyncio.gather(*(client() for _ in range(min(args.concurrency, len(requests)))))

        if args.warmup > 0:
            warm = make_requests(args.warmup, seed=args.seed + 7919, model=model, max_model_len=max_model_len,
                                 mix=args.mix, max_output=args.max_output)
            await drive(warm, [None] * len(warm))
        base_sample, base_info, base_idle = await watch.wait_idle(args.idle_timeout, None)
        if not base_idle:
            raise BenchError("the server did not go idle before the load (is something else using it?)")

        requests = make_requests(args.requests, seed=args.seed, model=model, max_model_len=max_model_len,
                                 mix=args.mix, max_output=args.max_output)
        outcomes: list[Outcome | None] = [None] * len(requests)
        samples: list[Sample] = [base_sample]
        t0 = time.perf_counter()
        load = asyncio.create_task(drive(requests, outcomes))
        while not load.done():
            await asyncio.wait({load}, timeout=args.sample_every)
            sample, _ = await watch.look(time.perf_counter() - t0, sum(o is not None for o in outcomes))
            samples.append(sample)
        await load
        duration = time.perf_counter() - t0
        end_sample, end_info, settled = await watch.wait_idle(args.idle_timeout, base_sample.used_pages)
        end_sample.t, end_sample.done = time.perf_counter() - t0, len(requests)
        samples.append(end_sample)

    finished = [o for o in outcomes if o is not None]
    # A worker that restarted mid-run (new pid) cannot be judged on its RSS.
    same = {n for n, pid in base_info["pids"].items() if end_info["pids"].get(n) == pid}
    rss = rss_verdict({n: v for n, v in base_sample.rss.items() if n in same},
                      {n: v for n, v in end_sample.rss.items() if n in same}, samples, args.rss_tolerance_mib)
    rss["not_judged"] = sorted(set(rss["not_judged"]) | (set(base_info["pids"]) ^ same))
    pages = pages_verdict(base_sample.used_pages, end_sample.used_pages,
                          max(sum(s.used_pages.values()) for s in samples))
    pages["settled"] = settled
    integrity = {n: {"failures": v.integrity_failures, "audited_at_step": v.audited_at_step, "steps": v.steps}
                 for n, v in end_info["views"].items()}
    counts = count_outcomes(finished)
    return {
        "benchmark": "soak", "url": url, "model": model, "seed": args.seed, "requests": args.requests,
        "concurrency": args.concurrency, "mix": args.mix, "max_output": args.max_output, "warmup": args.warmup,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "duration_s": duration,
        "requests_per_s": len(finished) / max(duration, 1e-9),
        "counts": counts, "pages": pages, "rss": rss, "integrity": integrity,
        "integrity_failures": sum(v["failures"] for v in integrity.values()),
        "passed": counts["unexpected"] == 0 and pages["back_to_idle"] and rss["flat"] is not False
        and not any(v["failures"] for v in integrity.values()),
        "samples": [s.to_json() for s in samples],
    }


def run(args: argparse.Namespace) -> int:
    url = (args.url or f"http://127.0.0.1:{args.port}").rstrip("/")
    if url.endswith("/v1"):
        url = url[:-3]
    try:
        ctx = nullcontext(None) if args.url else running_server(serve_argv(args), url, args, "soak")
        with ctx as proc:
            doc = asyncio.run(run_async(args, url, proc.pid if proc is not None else None))
    except (BenchError, RuntimeError) as exc:
        print(f"xllm bench soak: {exc}", file=sys.stderr)
        return 2
    print_summary(doc)
    write_json(args.json_path, doc)
    write_plot(args.plot_path, draw_plot, doc)
    return 0 if doc["passed"] else 1
