"""The workload of `xllm bench pd` and one run of it: phases, seeded arrivals, sending them
open-loop while `/status` is polled, and the summary of what came back.

Each request streams; TTFT = time to the first streamed token, TPOT = (last − first) /
(tokens − 1). A request *attains* the SLO when it completed, its TTFT ≤ the TTFT SLO and its TPOT
≤ the TPOT SLO (a failed request is a miss).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import aiohttp

from bench.client import RequestResult, base_url, discover_model, stream_request
from bench.pd_status import StatusRecorder, fetch_status, poll_status
from bench.stats import distinct_errors, percentile_ms

logger = logging.getLogger(__name__)

__all__ = ["Phase", "Arrival", "Outcome", "RunRecord", "WORKLOADS", "make_workload", "build_phases", "attains",
           "summarize_phase", "summarize_run", "run_workload"]

WORKLOADS = ("shifting", "steady")


@dataclass
class Phase:
    """One class of requests arriving as a Poisson process for `duration_s` seconds."""

    name: str
    duration_s: float
    rate: float  # requests per second (Poisson)
    prompt_len: int
    output_len: int
    start_s: float | None = None  # None: right after the previous phase ends

    def as_dict(self) -> dict:
        return {"name": self.name, "duration_s": self.duration_s, "rate": self.rate, "prompt_len": self.prompt_len,
                "output_len": self.output_len, "start_s": self.start_s}


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
    sent_at: float | None = None  # when the client actually sent it (the event loop may lag)
    cancelled: bool = False  # still running at the drain deadline


def make_workload(phases: list[Phase], seed: int = 0, vocab_size: int = 10_000) -> list[Arrival]:
    """Seeded Poisson arrivals of every phase, in time order; fresh random prompts (no prefix-cache
    hits). A phase starts at its `start_s`, or where the previous one ended."""
    rng = random.Random(seed)
    out: list[Arrival] = []
    end = 0.0
    for index, ph in enumerate(phases):
        start = ph.start_s if ph.start_s is not None else end
        t = start
        while ph.rate > 0:
            t += rng.expovariate(ph.rate)
            if t >= start + ph.duration_s:
                break
            prompt = [rng.randrange(100, max(101, vocab_size)) for _ in range(ph.prompt_len)]
            out.append(Arrival(t, index, prompt, ph.output_len))
        end = start + ph.duration_s
    out.sort(key=lambda a: a.t)
    return out


def build_phases(workload: str, phase_s: float, rate1: float, rate2: float, prompt_len1: int, output_len1: int,
                 prompt_len2: int, output_len2: int) -> list[Phase]:
    """`shifting`: prompt-heavy requests at `rate1` for `phase_s`, then decode-heavy at `rate2`.
    `steady`: the same two classes, each at half its rate, both over the whole `2 × phase_s`: the
    same expected requests of each kind, with no shift for a policy to follow."""
    if workload == "steady":
        return [Phase("prompt-heavy", 2 * phase_s, rate1 / 2, prompt_len1, output_len1, start_s=0.0),
                Phase("decode-heavy", 2 * phase_s, rate2 / 2, prompt_len2, output_len2, start_s=0.0)]
    if workload != "shifting":
        raise ValueError(f"unknown workload {workload!r} (one of {', '.join(WORKLOADS)})")
    return [Phase("prompt-heavy", phase_s, rate1, prompt_len1, output_len1),
            Phase("decode-heavy", phase_s, rate2, prompt_len2, output_len2)]


def attains(r: RequestResult, ttft_slo_s: float, tpot_slo_s: float) -> bool:
    """Completed, TTFT within its SLO and TPOT within its SLO (a 1-token answer has no TPOT)."""
    if not r.ok or r.ttft > ttft_slo_s:
        return False
    tpot = r.tpot
    return tpot is None or tpot <= tpot_slo_s


def summarize_phase(name: str, outcomes: list[Outcome], ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """Attainment, why requests missed, latency percentiles, output tok/s (over first arrival →
    last finish) and how late the client sent them."""
    ok = [o.result for o in outcomes if o.result.ok]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.tpot is not None]
    span = (max(o.finished_at for o in outcomes) - min(o.arrival.t for o in outcomes)) if outcomes else 0.0
    out_tokens = sum(r.output_tokens for r in ok)
    met = sum(attains(o.result, ttft_slo_s, tpot_slo_s) for o in outcomes)
    late_ttft = [r.ttft > ttft_slo_s for r in ok]
    slow_tpot = [r.tpot is not None and r.tpot > tpot_slo_s for r in ok]
    lags = [o.sent_at - o.arrival.t for o in outcomes if o.sent_at is not None]
    return {
        "phase": name, "requests": len(outcomes), "completed": len(ok), "failed": len(outcomes) - len(ok),
        "slo_attainment_pct": 100.0 * met / len(outcomes) if outcomes else None,
        "ttft_attainment_pct": 100.0 * sum(r.ttft <= ttft_slo_s for r in ok) / len(outcomes) if outcomes else None,
        "tpot_attainment_pct": (100.0 * sum(t <= tpot_slo_s for t in tpots) / len(tpots)) if tpots else None,
        # Of the completed requests, which SLO each one missed.
        "misses": {"ttft_only": sum(a and not b for a, b in zip(late_ttft, slow_tpot)),
                   "tpot_only": sum(b and not a for a, b in zip(late_ttft, slow_tpot)),
                   "both": sum(a and b for a, b in zip(late_ttft, slow_tpot)),
                   "cancelled": sum(o.cancelled for o in outcomes)},
        "ttft_ms": {"p50": percentile_ms(ttfts, 0.5), "p90": percentile_ms(ttfts, 0.9)},
        "tpot_ms": {"p50": percentile_ms(tpots, 0.5), "p90": percentile_ms(tpots, 0.9)},
        "send_lag_ms": {"p50": percentile_ms(lags, 0.5), "max": percentile_ms(lags, 1.0)},
        "output_tokens": out_tokens, "span_s": span,
        "output_tok_per_s": out_tokens / span if span > 0 else None,
        "errors": distinct_errors(o.result for o in outcomes),
    }


@dataclass
class RunRecord:
    """One run of a workload: every request's outcome and what `/status` said meanwhile."""

    outcomes: list[Outcome]
    wall_s: float
    warmup_failures: int = 0
    status: dict = field(default_factory=dict)  # StatusRecorder.report()


def summarize_run(record: RunRecord, phases: list[Phase], ttft_slo_s: float, tpot_slo_s: float) -> dict:
    """The run overall and per phase, with each phase's target vs offered arrival rate, and the
    flips, refused hand-offs and predictor error the scheduler reported."""
    per_phase = []
    for i, ph in enumerate(phases):
        mine = [o for o in record.outcomes if o.arrival.phase == i]
        summary = summarize_phase(ph.name, mine, ttft_slo_s, tpot_slo_s)
        # Offered: what the seeded Poisson draw asked for (it varies around the target by seed).
        summary["target_rate"] = ph.rate
        summary["offered_rate"] = len(mine) / ph.duration_s if ph.duration_s > 0 else None
        per_phase.append(summary)
    overall = summarize_phase("all", record.outcomes, ttft_slo_s, tpot_slo_s)
    status = {"flips": 0, "flips_source": "none", "flip_events": [], "role_changes": [], **record.status}
    return {"overall": overall, "phases": per_phase, **status, "warmup_failures": record.warmup_failures,
            "wall_s": record.wall_s}


async def run_workload(url: str, workload: list[Arrival], *, model: str | None = None, timeout: float = 120.0,
                       warmup: int = 2, drain_s: float = 30.0, poll_s: float = 0.5) -> RunRecord:
    """Send `workload` open-loop after `warmup` unmeasured requests, polling `/status` throughout.

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

        warmup_failures = 0
        for i in range(warmup):  # load paths, compile, fill allocator caches: not measured
            r = await stream_request(session, endpoint, body(Arrival(0, 0, [100 + i] * 16, 4)), chat=False,
                                     timeout=timeout)
            if not r.ok:
                warmup_failures += 1
                logger.warning("warm-up request failed: %s", r.error)
        outcomes = [Outcome(a) for a in workload]
        recorder = StatusRecorder()
        t0 = time.perf_counter()
        first = await fetch_status(session, root)
        if first is not None:
            recorder.observe(first, 0.0)
        stop = asyncio.Event()
        poller = asyncio.create_task(poll_status(session, root, recorder, t0, stop, poll_s))

        async def one(o: Outcome) -> None:
            o.sent_at = time.perf_counter() - t0
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
                o.cancelled = True
        wall = time.perf_counter() - t0
        stop.set()
        await poller
        # Workers report their counters by heartbeat and the gateway polls the scheduler: let the
        # last of the run reach /status before the final reading.
        await asyncio.sleep(min(1.5, 3 * poll_s))
        last = await fetch_status(session, root)
        if last is not None:
            recorder.observe(last, time.perf_counter() - t0)
    return RunRecord(outcomes, wall, warmup_failures, recorder.report())
