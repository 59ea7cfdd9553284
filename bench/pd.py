"""`xllm bench pd`: static vs dynamic prefill/decode under a workload whose mix shifts mid-run.

For each policy the bench starts the whole system itself (`xllm serve --prefill-workers P
--decode-workers D --pd-policy NAME --ttft-slo-ms X --tpot-slo-ms Y --port N`), waits for
`/health`, sends the same seeded open-loop workload and stops it again:

* phase 1, prompt-heavy: long prompts, short outputs, Poisson arrivals at `--rate1` req/s;
* phase 2, decode-heavy: short prompts, long outputs, at `--rate2` req/s.

Each request streams; TTFT = time to the first streamed token, TPOT = (last − first) /
(tokens − 1). A request *attains* the SLO when it completed, its TTFT ≤ the TTFT SLO and its TPOT
≤ the TPOT SLO (a failed request is a miss). Reported per policy and per phase: attainment %,
p50/p90 TTFT and TPOT, output tokens/s, and the role flips seen by polling `GET /status`.

With `--url` nothing is started: the workload runs once against that server (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from bench.client import BenchError, RequestResult, base_url, discover_model, stream_request
from bench.server_proc import add_server_arguments, fmt, running_server
from bench.stats import distinct_errors, percentile_ms

logger = logging.getLogger(__name__)

__all__ = ["Phase", "Arrival", "Outcome", "add_arguments", "run", "make_workload", "attains", "summarize_phase",
           "summarize_run", "count_flips", "run_workload", "smoke", "serve_argv", "print_table", "phases_from_args"]


@dataclass
class Phase:
    name: str
    duration_s: float
    rate: float  # requests per second (Poisson)
    prompt_len: int
    output_len: int


@dataclass
class Arrival:
    t: float  # seconds after the start of the run
    phase: int
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Outcome:
    arrival: Arrival
    result: RequestResult = field(default_factory=RequestResult)
    finished_at: float = 0.0  # seconds after the start of the run


def make_workload(phases: list[Phase], seed: int = 0, vocab_size: int = 10_000) -> list[Arrival]:
    """Seeded Poisson arrivals, phase after phase; fresh random prompts (no prefix-cache hits)."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    start = 0.0
    for index, ph in enumerate(phases):
        t = start
        while ph.rate > 0:
            t += rng.expovariate(ph.rate)
            if t >= start + ph.duration_s:
                break
            prompt = [rng.randrange(100, max(101, vocab_size)) for _ in range(ph.prompt_len)]
            out.append(Arrival(t, index, prompt, ph.output_len))
        start += ph.duration_s
    return out


def attains(r: RequestResult, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    """Completed, TTFT within its SLO and TPOT within its SLO (a 1-token answer has no TPOT)."""
    if not r.ok or r.ttft > ttft_slo_s:
        return False
    tpot = r.tpot
    return tpot is None or tpot <= tpot_slo_s


def summarize_phase(name: str, outcomes: list[Outcome], ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """Attainment, latency percentiles and output tok/s (over first arrival → last finish)."""
    ok = [o.result for o in outcomes if o.result.ok]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    span = (max(o.finished_at for o in outcomes) - min(o.arrival.t for o in outcomes)) if outcomes else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    met = sum(attains(o.result, ttft_slo_s, tpot_slo_s) for o in outcomes)
    return {
        "phase": name, "requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
        "slo_attainment_pct": 100.0 * met / len(outcomes) if outcomes else None,
        "ttft_attainment_pct": 100.0 * sum(r.ttft <= ttft_slo_s for r in ok) / len(outcomes) if outcomes else None,
        "tpot_attainment_pct": (100.0 * sum(t <= tpot_slo_s for t in tpots) / len(tpots)) if tpots else None,
        "ttft_ms": {"p50": percentile_ms(ttfts, 0.5), "p90": percentile_ms(ttfts, 0.9)},
        "tpot_ms": {"p50": percentile_ms(tpots, 0.5), "p90": percentile_ms(tpots, 0.9)},
        "output_tokens": out_tokens, "span_s": span,
        "output_tok_per_s": out_tokens / span if span > 0 else None,
        "errors": distinct_errors(o.result for o in outcomes),
    }


def count_flips(snapshots: list[tuple[float, dict[str, str]]]) -> list[dict]:
    """Role changes between consecutive `/status` snapshots (time, {instance id: role})."""
    events: list[dict] = []
    last: dict[str, str] = {}
    for t, roles in snapshots:
        for iid, role in roles.items():
            if iid in last and last[iid] != role:
                events.append({"t": round(t, 2), "instance": iid, "from": last[iid], "to": role})
            last[iid] = role
    return events


async def _poll_status(session: aiohttp.ClientSession, url: str, t0: float, out: list, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + "/status", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                doc = await resp.json()
            roles = {str(i.get("id")): str(i.get("role")) for i in doc.get("instances") or [] if isinstance(i, dict)}
            out.append((time.perf_counter() - t0, roles))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError):
            pass  # a missed poll only delays when a flip is seen
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except asyncio.TimeoutError:
            pass


async def run_workload(url: str, workload: list[Arrival], *, model: str | None = None, timeout: float = 120.0,
                       warmup: int = 2, drain_s: float = 30.0) -> tuple[list[Outcome], list[dict], float]:
    """Send `workload` open-loop; returns (outcomes, flip events from /status, wall seconds).

    Requests still running `drain_s` after the last arrival are cancelled and count as failed,
    so a hopelessly overloaded run still ends in bounded time.
    """
    base = base_url(url)
    root = base[: -len("/v1")]
    endpoint = base + "/completions"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        model = model or await discover_model(session, base)

        def body(a: Arrival) -> dict:
            return {"model": model, "prompt": a.prompt_ids, "max_tokens": a.max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "min_tokens": a.max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}

        for i in range(warmup):  # load paths, compile, fill allocator caches: not measured
            r = await stream_request(session, endpoint, body(Arrival(0, 0, [100 + i] * 16, 4)), chat=False,
                                     timeout=timeout)
            if not r.ok:
                logger.warning("warm-up request failed: %s", r.error)
        outcomes = [Outcome(a) for a in workload]
        snapshots: list[tuple[float, dict[str, str]]] = []
        stop = asyncio.Event()
        t0 = time.perf_counter()
        poller = asyncio.create_task(_poll_status(session, root, t0, snapshots, stop))

        async def one(o: Outcome) -> None:
            o.result = await stream_request(session, endpoint, body(o.arrival), chat=False, timeout=timeout)
            o.finished_at = time.perf_counter() - t0

        tasks = []
        for o in outcomes:
            delay = o.arrival.t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(o)))
        done, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for o in outcomes:
            if not o.result.ok and not o.result.error and o.finished_at == 0.0:
                o.result.error = f"still running {drain_s:g} s after the last arrival"
                o.finished_at = time.perf_counter() - t0
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    return outcomes, count_flips(snapshots), wall


def summarize_run(outcomes: list[Outcome], phases: list[Phase], flips: list[dict], wall: float,
                  ttft_slo_s: float, tpot_slo_s: float) -> dict:
    per_phase = [summarize_phase(ph.name, [o for o in outcomes if o.arrival.phase == i], ttft_slo_s, tpot_slo_s)
                 for i, ph in enumerate(phases)]
    return {"overall": summarize_phase("all", outcomes, ttft_slo_s, tpot_slo_s), "phases": per_phase,
            "flips": len(flips), "flip_events": flips, "wall_s": wall}


async def smoke(url: str, seconds: float = 4.0, rate: float = 1.0, ttft_slo_ms: float = 5000,
                tpot_slo_ms: float = 500) -> dict:
    """A short two-phase run against a running server: checks the whole path end to end in seconds."""
    phases = [Phase("prompt-heavy", seconds / 2, rate, 128, 4), Phase("decode-heavy", seconds / 2, rate, 16, 16)]
    outcomes, flips, wall = await run_workload(url, make_workload(phases, seed=1), warmup=1, drain_s=60)
    return summarize_run(outcomes, phases, flips, wall, ttft_slo_ms / 1000, tpot_slo_ms / 1000)


# ------------------------------------------------------------------------------ the servers


def serve_argv(args: argparse.Namespace, policy: str, port: int) -> list[str]:
    """The `xllm serve` command line of one policy's run."""
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(port),
            "--prefill-workers", str(args.prefill_workers), "--decode-workers", str(args.decode_workers),
            "--pd-policy", policy, "--ttft-slo-ms", f"{args.ttft_slo_ms:g}", "--tpot-slo-ms", f"{args.tpot_slo_ms:g}"]
    if args.model:
        argv += ["--model", args.model]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


def _run_one_policy(args: argparse.Namespace, policy: str, workload: list[Arrival], phases: list[Phase]) -> dict:
    port = args.port
    url = f"http://127.0.0.1:{port}"
    argv = serve_argv(args, policy, port)
    with running_server(argv, url, args, policy):
        print(f"[{policy}] ready; sending {len(workload)} requests over "
              f"{sum(p.duration_s for p in phases):g} s", flush=True)
        outcomes, flips, wall = asyncio.run(run_workload(url, workload, timeout=args.timeout, drain_s=args.drain_s))
    return summarize_run(outcomes, phases, flips, wall, args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)


# ------------------------------------------------------------------------------ the command


def print_table(runs: dict[str, dict]) -> None:
    print(f"{'policy':<9}{'phase':<14}{'req':>5}{'ok':>5}{'SLO%':>7}{'TTFT p50/p90 ms':>18}"
          f"{'TPOT p50/p90 ms':>17}{'out tok/s':>11}{'flips':>7}")
    for policy, run_ in runs.items():
        for i, s in enumerate([*run_["phases"], run_["overall"]]):
            flips = str(run_["flips"]) if i == len(run_["phases"]) else ""
            print(f"{policy:<9}{s['phase']:<14}{s['requests']:>5}{s['completed']:>5}"
                  f"{fmt(s['slo_attainment_pct'], '.1f'):>7}"
                  f"{fmt(s['ttft_ms']['p50']) + '/' + fmt(s['ttft_ms']['p90']):>18}"
                  f"{fmt(s['tpot_ms']['p50']) + '/' + fmt(s['tpot_ms']['p90']):>17}"
                  f"{fmt(s['output_tok_per_s'], '.1f'):>11}{flips:>7}")
            for err in s["errors"] if i == len(run_["phases"]) else []:
                print(f"    error: {err}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model for xllm serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policies", default="static,dynamic", help="comma-separated, run in this order")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=2,
                   help="default 2: with 1P+1D no flip is allowed (never zero workers of a role)")
    p.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=200.0)
    p.add_argument("--phase-s", type=float, default=25.0, help="seconds of each phase (max 300)")
    p.add_argument("--rate1", type=float, default=1.0, help="req/s in the prompt-heavy phase")
    p.add_argument("--prompt-len1", type=int, default=512)
    p.add_argument("--output-len1", type=int, default=4)
    p.add_argument("--rate2", type=float, default=1.0, help="req/s in the decode-heavy phase")
    p.add_argument("--prompt-len2", type=int, default=32)
    p.add_argument("--output-len2", type=int, default=64)
    p.add_argument("--drain-s", type=float, default=15.0, help="max wait after the last arrival (max 300)")
    p.add_argument("--seed", type=int, default=0)
    add_server_arguments(p, port=8017)
    p.add_argument("--url", default=None, help="run once against this running server instead of starting any")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")


def phases_from_args(args: argparse.Namespace) -> list[Phase]:
    return [Phase("prompt-heavy", args.phase_s, args.rate1, args.prompt_len1, args.output_len1),
            Phase("decode-heavy", args.phase_s, args.rate2, args.prompt_len2, args.output_len2)]


def run(args: argparse.Namespace) -> int:
    if not 0 < args.phase_s <= 300 or not 0 < args.drain_s <= 300:
        print("xllm bench pd: --phase-s and --drain-s must be in (0, 300]", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in ("static", "dynamic") for p in policies):
        print("xllm bench pd: --policies takes static and/or dynamic", file=sys.stderr)
        return 2
    phases = phases_from_args(args)
    workload = make_workload(phases, args.seed)
    runs: dict[str, dict] = {}
    try:
        if args.url:
            outcomes, flips, wall = asyncio.run(run_workload(args.url, workload, timeout=args.timeout,
                                                             drain_s=args.drain_s))
            runs["external"] = summarize_run(outcomes, phases, flips, wall, args.ttft_slo_ms / 1000,
                                             args.tpot_slo_ms / 1000)
        else:
            for policy in policies:
                runs[policy] = _run_one_policy(args, policy, workload, phases)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"xllm bench pd: {exc}", file=sys.stderr)
        return 1
    print_table(runs)
    doc = {
        "benchmark": "pd", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model or "default",
        "layout": f"{args.prefill_workers}P+{args.decode_workers}D",
        "slo": {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms},
        "phases": [vars(p) for p in phases], "seed": args.seed, "cpu_count": os.cpu_count(), "runs": runs,
    }
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(doc, f, indent=2)
        print(f"results written to {args.json_path}")
    return 0 if any(r["overall"]["completed"] for r in runs.values()) else 1
