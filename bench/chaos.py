"""`xllm bench chaos`: SIGKILL workers (and optionally the scheduler) under a steady greedy load,
and measure what the clients saw.

The bench starts `xllm serve --workers W` itself (the launcher restarts whatever dies), computes
a no-fault reference for each of `--prompts` seeded prompts (greedy, `ignore_eos`, so each stream
is exactly `--max-tokens` tokens), then for `--duration` seconds keeps `--concurrency` greedy
streams going over those prompts while a seeded schedule SIGKILLs a random ready worker every
`--kill-every` seconds (jittered by up to a quarter; the last ready worker is never killed), and,
with `--kill-scheduler`, the scheduler once, between two worker kills.

Reported: requests finished / failed; for each kill, the streams it hit (the requests the victim
held in `/status` just before it died, matched to the client's response ids; when it listed none,
as after a scheduler restart, the streams whose next token came over `--gap-threshold` late) and
their recovery time (kill -> the stream's next token: p50, max); the server's own `xllm_migration_seconds`
(loss noticed -> next token) and `xllm_requests_migrated_total` by reason; the extra end-to-end
latency of migrated streams against streams no kill touched; whether every finished stream's
tokens equal its prompt's no-fault reference (and its SSE offsets and usage add up); used KV
pages back to idle afterwards. `--json` writes it all, `--plot` draws tokens/s with the kills.
Exit status: 0 when every request finished with its reference text and no page leaked, 1
otherwise, 2 on a setup error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import signal
import sys
import time
from collections.abc import Callable

import aiohttp

from bench.chaos_report import (Kill, affected_by, check_references, latency_stats, metrics_delta, print_summary,
                                recovery_s)
from bench.chaos_report import write_plot as draw_plot
from bench.chaos_stream import StreamRecord, greedy_body, stream_greedy
from bench.client import BenchError, discover_model
from bench.output import write_json, write_plot
from bench.server_proc import add_server_arguments, running_server
from bench.server_watch import (fetch_metrics, fetch_status, histogram_quantile, instance_views, metric_total,
                                service_process, worker_processes)
from bench.stats import distinct_errors

__all__ = ["add_arguments", "run", "run_async", "kill_schedule", "make_prompts", "serve_argv"]

DEFAULT_PORT = 8019
_WORDS = (
    "the of and to in is was for on with as by at from that this it be are or an have not but all "
    "time day year world life hand part child eye place work week case point number group problem fact "
    "water light house river city paper music market story garden table window winter summer morning"
).split()


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: `kind(text)`, which must be > 0."""
    def parse(text: str) -> float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--duration", type=_positive(float), default=60.0, help="seconds of load (new requests start)")
    p.add_argument("--kill-every", type=_positive(float), default=15.0, help="seconds between worker kills")
    p.add_argument("--seed", type=int, default=0, help="seeds the prompts, the kill times and the victims")
    p.add_argument("--kill-scheduler", action="store_true", help="also SIGKILL the scheduler once")
    p.add_argument("--workers", type=_positive(int), default=3)
    p.add_argument("--concurrency", type=_positive(int), default=8, help="greedy streams in flight")
    p.add_argument("--prompts", type=_positive(int), default=16, help="distinct prompts (each has a reference)")
    p.add_argument("--max-tokens", type=_positive(int), default=48, help="tokens per stream (ignore_eos)")
    p.add_argument("--kv-cache-memory", default="256MiB", help="each worker's KV pool (several share one box)")
    p.add_argument("--dtype", default="float32", help="worker dtype (float32 keeps greedy numerics stable)")
    p.add_argument("--gap-threshold", type=_positive(float), default=1.0,
                   help="when /status does not say what a victim held: a stream whose next token came this "
                        "many seconds after a kill counts as hit")
    p.add_argument("--settle-timeout", type=_positive(float), default=180.0,
                   help="seconds to wait after the load for restarted workers and idle page pools")
    add_server_arguments(p, DEFAULT_PORT)
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--plot", dest="plot_path", default=None, help="draw tokens/s and the kills here (PNG)")


def serve_argv(args: argparse.Namespace) -> list[str]:
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(args.port), "--workers", str(args.workers),
            "--kv-cache-memory", args.kv_cache_memory, "--dtype", args.dtype]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


def kill_schedule(duration: float, kill_every: float, seed: int, kill_scheduler: bool) -> list[tuple[float, str]]:
    """(seconds after the load began, "worker" | "scheduler"), in order: a worker kill near every
    multiple of `kill_every` inside the run (jittered by up to a quarter of it), and the scheduler
    once, halfway between two worker kills near the middle."""
    rng = random.Random(seed)
    events = [(k * kill_every + rng.uniform(-0.25, 0.25) * kill_every, "worker")
              for k in range(1, int(duration // kill_every) + 1) if k * kill_every < duration]
    if kill_scheduler:
        t = (max(1, len(events)) // 2 + 0.5) * kill_every
        events.append((min(t, duration * 0.75), "scheduler"))
    return sorted(events)


def make_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 64))) for _ in range(n)]


class _Killer:
    """Carries out the schedule against the server's process tree."""

    def __init__(self, session: aiohttp.ClientSession, url: str, launcher_pid: int, seed: int) -> None:
        self.session, self.url, self.launcher_pid = session, url, launcher_pid
        self.rng = random.Random(seed + 1)

    async def kill(self, t: float, target: str) -> Kill:
        if target == "scheduler":
            proc = service_process(self.launcher_pid, "services.scheduler")
            if proc is None:
                return Kill(t, time.perf_counter(), target, "scheduler", 0, skipped="no scheduler process")
            at = time.perf_counter()
            os.kill(proc.pid, signal.SIGKILL)
            return Kill(t, at, target, "scheduler", proc.pid)
        status = await fetch_status(self.session, self.url)
        views = instance_views(status)
        procs = worker_processes(self.launcher_pid)
        ready = sorted(i for i, v in views.items() if v.state == "ready" and i in procs
                       and (v.pid is None or v.pid == procs[i].pid))
        if len(ready) < 2:
            return Kill(t, time.perf_counter(), target, "-", 0, skipped=f"{len(ready)} worker(s) ready: spared")
        victim = self.rng.choice(ready)
        held = next((inst.get("requests") for inst in (status or {}).get("instances") or []
                     if inst.get("id") == victim), None)
        at = time.perf_counter()
        os.kill(procs[victim].pid, signal.SIGKILL)
        return Kill(t, at, target, victim, procs[victim].pid, held=list(held) if isinstance(held, list) else None)


async def _settle(session: aiohttp.ClientSession, url: str, workers: int, idle: dict[str, int],
                  timeout_s: float) -> tuple[bool, dict]:
    """Until every worker is back (restarted ones included), idle, with no more pages than `idle`,
    and has audited its page pool (`check_integrity`) since its last engine step."""
    deadline = time.monotonic() + timeout_s
    while True:
        views = instance_views(await fetch_status(session, url))
        ready = [v for v in views.values() if v.state == "ready"]
        if len(ready) >= workers and all(v.idle and v.used_pages <= idle.get(v.id, 0) and v.audited_at_step == v.steps
                                         for v in views.values()):
            return True, views
        if time.monotonic() > deadline:
            return False, views
        await asyncio.sleep(1.0)


async def run_async(args: argparse.Namespace, url: str, launcher_pid: int) -> dict:
    connector = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=connector) as session:
        model = await discover_model(session, url + "/v1")
        prompts = make_prompts(args.prompts, args.seed)
        bodies = [greedy_body(model, p, args.max_tokens) for p in prompts]

        # No-fault references, at the same concurrency as the load.
        refs: list[StreamRecord | None] = [None] * len(bodies)
        queue = iter(range(len(bodies)))

        async def reference() -> None:
            for i in queue:
                refs[i] = await stream_greedy(session, url, bodies[i], i, args.timeout)

        await asyncio.gather(*(reference() for _ in range(min(args.concurrency, len(bodies)))))
        failed = [r for r in refs if r is None or not r.ok]
        if failed:
            raise BenchError(f"{len(failed)} reference request(s) failed before any fault: {failed[0].error}")
        references = {i: r.tokens for i, r in enumerate(refs)}
        idle = {i: v.used_pages for i, v in instance_views(await fetch_status(session, url)).items()}
        metrics_before = await fetch_metrics(session, url)

        records: list[StreamRecord] = []
        counter = itertools.count()
        t0 = time.perf_counter()

        async def client() -> None:
            while time.perf_counter() - t0 < args.duration:
                i = next(counter) % len(bodies)
                records.append(await stream_greedy(session, url, bodies[i], i, args.timeout))

        killer = _Killer(session, url, launcher_pid, args.seed)
        kills: list[Kill] = []

        async def chaos() -> None:
            for t, target in kill_schedule(args.duration, args.kill_every, args.seed, args.kill_scheduler):
                await asyncio.sleep(max(0.0, t0 + t - time.perf_counter()))
                kills.append(await killer.kill(t, target))

        chaos_task = asyncio.create_task(chaos())
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        chaos_task.cancel()
        load_s = time.perf_counter() - t0
        settled, views = await _settle(session, url, args.workers, idle, args.settle_timeout)
        delta = metrics_delta(metrics_before, await fetch_metrics(session, url))

    hit: set[int] = set()
    for kill in kills:
        if kill.skipped:
            continue
        kill.affected = affected_by(records, kill, args.gap_threshold)
        kill.recovery_s = [r for r in (recovery_s(records[i], kill.at) for i in kill.affected) if r is not None]
        hit.update(kill.affected)
    ok = [r for r in records if r.ok]
    kill_times = [k.at for k in kills if not k.skipped]
    untouched = [r.e2e for r in ok if not any(r.in_flight_at(t) for t in kill_times)]
    migrated = [records[i].e2e for i in sorted(hit) if records[i].ok]
    base = latency_stats(untouched)["p50"]
    bins = [0] * (int(max(load_s, max((t - t0 for r in records for t in r.token_times), default=0))) + 1)
    for r in records:
        for t in r.token_times:
            bins[int(t - t0)] += 1
    migrated_total = metric_total(delta, "xllm_requests_migrated_total")
    seconds_count = metric_total(delta, "xllm_migration_seconds_count")
    return {
        "benchmark": "chaos", "url": url, "model": model, "seed": args.seed, "workers": args.workers,
        "duration_s": args.duration, "kill_every_s": args.kill_every, "kill_scheduler": args.kill_scheduler,
        "concurrency": args.concurrency, "prompts": args.prompts, "max_tokens": args.max_tokens,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_s": load_s,
        "requests": {"started": len(records), "finished": len(ok), "failed": len(records) - len(ok),
                     "errors": distinct_errors(records)},
        "kills": [k.to_json() for k in kills],
        "recovery_s": latency_stats([x for k in kills for x in k.recovery_s]),
        "extra_latency_s": {"migrated_e2e": latency_stats(migrated), "unaffected_e2e": latency_stats(untouched),
                            "extra": latency_stats([e - base for e in migrated] if base is not None else [])},
        "migration": {
            "total": migrated_total,
            "by_reason": {s.labels.get("reason", ""): s.value for s in delta
                          if s.name == "xllm_requests_migrated_total" and s.value},
            "seconds_count": seconds_count,
            "seconds_mean": (metric_total(delta, "xllm_migration_seconds_sum") / seconds_count
                             if seconds_count else None),
            "seconds_p50": histogram_quantile(delta, "xllm_migration_seconds", 0.5),
            "failed": metric_total(delta, "xllm_requests_failed_migration_total"),
        },
        "references_check": check_references(records, references),
        "pages": {"idle_before": idle, "after": {i: v.used_pages for i, v in views.items()}, "settled": settled,
                  "back_to_idle": bool(views) and all(v.used_pages <= idle.get(i, 0) for i, v in views.items())},
        "integrity_failures": sum(v.integrity_failures for v in views.values()),
        "tokens_per_s": bins,
    }


def run(args: argparse.Namespace) -> int:
    url = f"http://127.0.0.1:{args.port}"
    try:
        with running_server(serve_argv(args), url, args, "chaos") as proc:
            doc = asyncio.run(run_async(args, url, proc.pid))
    except (BenchError, RuntimeError) as exc:
        print(f"xllm bench chaos: {exc}", file=sys.stderr)
        return 2
    print_summary(doc)
    write_json(args.json_path, doc)
    write_plot(args.plot_path, draw_plot, doc)
    passed = (doc["requests"]["failed"] == 0 and doc["references_check"]["all_equal"] and doc["pages"]["back_to_idle"]
              and not doc["integrity_failures"])
    return 0 if passed else 1
