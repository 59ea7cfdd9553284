"""This machine's capacity, measured before `xllm bench pd` sets its load from it.

The bench starts a one-worker server the way each worker of the P/D layout runs (`xllm serve
--workers 1 --threads T`, T = the threads `xllm serve` gives each of the layout's P+D workers)
and measures, through the HTTP API as the benchmark's own requests go:

* prefill: bursts of `burst` prompt-heavy prompts (one output token each) sent together; tokens/s
  = the burst's prompt tokens / the last TTFT of the burst; the median over `rounds` bursts;
* decode: `b` decode-heavy requests sent together, for b = 1, 2, 4, ... up to `max_batch` (the
  workers' `--max-num-seqs`);
  tokens/s at b = b / median TPOT (every step of the batch yields one token per sequence). The
  decode phase's batch is the largest b whose median TPOT still meets the TPOT SLO: the most a
  decode worker can carry while it serves within the SLO (`batch` fixes it instead).

Each phase's arrival rate is then a multiple of one worker's capacity: prompt-heavy at
`prefill_factor × prefill tok/s / prompt_len`, decode-heavy at `decode_factor × decode tok/s /
output_len` (1.3 × by default: more than one worker of a role can take, less than two).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

import aiohttp

from bench.client import BenchError, base_url, discover_model, stream_request
from bench.pd_status import wait_for_layout
from bench.server_proc import running_server
from common.engine.config import EngineConfig
from common.progress import progress_bar, progress_enabled
from xllm.serve import worker_threads

__all__ = ["CalibrationPlan", "calibrated_rates", "decode_batches", "pick_decode_point", "serve_flag_int",
           "requested_threads", "engine_max_batch",
           "layout_threads", "calibration_argv", "measure_prefill", "measure_decode", "calibrate_url", "calibrate"]


@dataclass
class CalibrationPlan:
    """What to measure: the two request shapes of the workload, and how hard to look."""

    prefill_prompt_len: int
    decode_prompt_len: int
    decode_output_len: int
    tpot_slo_s: float
    burst: int = 4
    rounds: int = 3
    max_batch: int = 64
    batch: int | None = None  # measure the decode phase at this batch only
    timeout: float = 120.0
    layout_timeout_s: float = 120.0


def calibrated_rates(prefill_tok_s: float, decode_tok_s: float, prompt_len: int, output_len: int,
                     prefill_factor: float, decode_factor: float) -> tuple[float, float]:
    """(prompt-heavy req/s, decode-heavy req/s) at the given multiples of one worker's capacity."""
    if min(prefill_tok_s, decode_tok_s) <= 0 or min(prompt_len, output_len) <= 0:
        raise ValueError("capacities and request lengths must be > 0")
    return (round(prefill_factor * prefill_tok_s / prompt_len, 4),
            round(decode_factor * decode_tok_s / output_len, 4))


def decode_batches(max_batch: int) -> list[int]:
    """1, 2, 4, ... below `max_batch`, then `max_batch` itself."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max(1, max_batch)]


def pick_decode_point(sweep: list[dict], tpot_slo_s: float) -> dict | None:
    """The sweep point of the largest batch whose median TPOT meets the SLO; when none does, the
    one with the lowest TPOT (flagged `meets_tpot_slo: False`). None for an empty sweep."""
    measured = [p for p in sweep if p.get("tpot_ms") is not None]
    if not measured:
        return None
    within = [p for p in measured if p["tpot_ms"] <= 1000 * tpot_slo_s]
    point = max(within, key=lambda p: p["batch"]) if within else min(measured, key=lambda p: p["tpot_ms"])
    return {**point, "meets_tpot_slo": bool(within)}


def serve_flag_int(serve_args: list[str] | None, flag: str) -> int | None:
    """The integer `flag N` (or `flag=N`) among the `--serve-arg` flags; the last one wins, as it
    does for `xllm serve`. None when absent or not an integer."""
    words = [word for extra in serve_args or [] for word in extra.split()]
    found = None
    for i, word in enumerate(words):
        if word == flag and i + 1 < len(words):
            found = words[i + 1]
        elif word.startswith(flag + "="):
            found = word.split("=", 1)[1]
    try:
        return int(found) if found is not None else None
    except ValueError:
        return None


def requested_threads(serve_args: list[str] | None) -> int | None:
    """The `--threads N` among the `--serve-arg` flags, if any."""
    return serve_flag_int(serve_args, "--threads")


def engine_max_batch(serve_args: list[str] | None) -> int:
    """The most sequences one worker batches: `--max-num-seqs` among the `--serve-arg` flags, else
    the engine's default. The decode sweep goes no further."""
    default = next(f.default for f in fields(EngineConfig) if f.name == "max_num_seqs")
    return serve_flag_int(serve_args, "--max-num-seqs") or int(default)


def layout_threads(args: argparse.Namespace) -> int:
    """Threads per worker of the bench's layout, as `xllm serve` would split the CPUs."""
    return worker_threads(requested_threads(args.serve_arg), args.prefill_workers + args.decode_workers)


def calibration_argv(args: argparse.Namespace, threads: int) -> list[str]:
    """`xllm serve` with one mixed worker at the layout's threads per worker."""
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(args.port), "--workers", "1",
            "--threads", str(threads), "--ttft-slo-ms", f"{args.ttft_slo_ms:g}",
            "--tpot-slo-ms", f"{args.tpot_slo_ms:g}"]
    if args.model:
        argv += ["--model", args.model]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(100, 10_000) for _ in range(length)]  # fresh: no prefix-cache hit


def _body(model: str, prompt: list[int], max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


async def measure_prefill(session: aiohttp.ClientSession, endpoint: str, model: str, prompt_len: int, *,
                          burst: int = 4, rounds: int = 2, timeout: float = 120.0, seed: int = 7,
                          tick: Callable[[], object] | None = None) -> dict:
    """Prefill tokens/s of the server: bursts of `burst` prompts sent together (see the module);
    `tick()` after each burst (a progress bar)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(rounds):
        results = await asyncio.gather(*(stream_request(session, endpoint, _body(model, _prompt(rng, prompt_len), 1),
                                                        chat=False, timeout=timeout) for _ in range(burst)))
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise BenchError(f"calibration: a prefill request failed: {failed[0]}")
        last = max(r.ttft for r in results)
        samples.append({"tok_per_s": round(burst * prompt_len / last, 1), "last_ttft_ms": round(1000 * last, 1)})
        if tick is not None:
            tick()
    return {"prompt_len": prompt_len, "burst": burst, "rounds": samples,
            "tok_per_s": round(statistics.median(s["tok_per_s"] for s in samples), 1)}


async def measure_decode(session: aiohttp.ClientSession, endpoint: str, model: str, prompt_len: int,
                         output_len: int, batches: list[int], tpot_slo_s: float, *, timeout: float = 120.0,
                         seed: int = 11, tick: Callable[[], object] | None = None) -> dict:
    """Decode tokens/s at each batch of `batches` (stopping after the first whose median TPOT
    misses the SLO: a larger one only misses it by more), and the point picked for the phase."""
    if output_len < 2:
        raise BenchError("calibration: the decode-heavy output length must be >= 2 to time decoding")
    rng = random.Random(seed)
    sweep = []
    for b in batches:
        results = await asyncio.gather(*(stream_request(session, endpoint, _body(model, _prompt(rng, prompt_len),
                                                                                 output_len),
                                                        chat=False, timeout=timeout) for _ in range(b)))
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise BenchError(f"calibration: a decode request at batch {b} failed: {failed[0]}")
        tpot = statistics.median(r.tpot for r in results if r.tpot is not None)
        sweep.append({"batch": b, "tpot_ms": round(1000 * tpot, 2), "tok_per_s": round(b / tpot, 1)})
        if tick is not None:
            tick()
        if tpot > tpot_slo_s:
            break
    point = pick_decode_point(sweep, tpot_slo_s)
    assert point is not None  # `batches` is never empty and every point has a TPOT
    return {"prompt_len": prompt_len, "output_len": output_len, "sweep": sweep, "batch": point["batch"],
            "tok_per_s": point["tok_per_s"], "tpot_ms": point["tpot_ms"], "meets_tpot_slo": point["meets_tpot_slo"]}


async def calibrate_url(url: str, plan: CalibrationPlan, *, model: str | None = None,
                        progress: bool = False) -> dict:
    """Measure the server at `url` (see the module docstring): its prefill and decode capacity;
    `progress`: draw a bar over its steps (warm-up, bursts, decode batches; the sweep may stop
    early, at the first batch over the TPOT SLO)."""
    base = base_url(url)
    root, endpoint = base[: -len("/v1")], base + "/completions"
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        layout = await wait_for_layout(session, root, expected=None, timeout_s=plan.layout_timeout_s)
        model = model or await discover_model(session, base)
        batches = [plan.batch] if plan.batch else decode_batches(plan.max_batch)
        with progress_bar(2 + plan.rounds + len(batches), "calibration", "step", enabled=progress) as bar:
            for i in range(2):  # warm-up: not measured
                await stream_request(session, endpoint, _body(model, [100 + i] * 16, 4), chat=False,
                                     timeout=plan.timeout)
                bar.update(1)
            prefill = await measure_prefill(session, endpoint, model, plan.prefill_prompt_len, burst=plan.burst,
                                            rounds=plan.rounds, timeout=plan.timeout, tick=bar.update)
            decode = await measure_decode(session, endpoint, model, plan.decode_prompt_len, plan.decode_output_len,
                                          batches, plan.tpot_slo_s, timeout=plan.timeout, tick=bar.update)
    return {"prefill": prefill, "decode": decode, "layout": layout, "plan": asdict(plan),
            "wall_s": round(time.perf_counter() - started, 1)}


def calibrate(args: argparse.Namespace, plan: CalibrationPlan) -> dict:
    """Start the one-worker server of the layout's threads, measure it, stop it."""
    threads = layout_threads(args)
    argv = calibration_argv(args, threads)
    url = f"http://127.0.0.1:{args.port}"
    with running_server(argv, url, args, "calibration"):
        measured = asyncio.run(calibrate_url(url, plan, model=None, progress=progress_enabled(args)))
    return {**measured, "threads_per_worker": threads, "server": " ".join(["xllm", *argv[3:]])}
