"""`xllm bench pd`: mixed workers vs static vs dynamic prefill/decode, under a load calibrated to
this machine, over several seeds.

1. Calibration (`bench.pd_calibrate`): a one-worker server at the threads each worker of the
   P/D layout gets measures one worker's prefill and decode capacity; the prompt-heavy arrival
   rate is `--prefill-factor` × one prefill worker's capacity, the decode-heavy one
   `--decode-factor` × one decode worker's (`--rate1/--rate2` override either, and skip the
   calibration when both are given).
2. For every seed, and for every policy in turn on that seed, the bench starts the whole system
   (`xllm serve --workers P+D` for `mixed`: chunked prefill beside decode on every worker, no
   P/D; `--prefill-workers P --decode-workers D --pd-policy static|dynamic` for the others),
   waits until every worker of the layout serves (per `/status`), sends the seed's open-loop
   workload (`bench.pd_workload`: `shifting` = prompt-heavy then decode-heavy; `steady` = both
   mixed all along) while polling `/status` for the scheduler's flips, refused hand-offs and
   TTFT predictor error, and stops it. Seeds go round the policies so that a machine whose speed
   drifts during the bench treats every policy alike.
3. The report (`bench.pd_report`): each policy's mean and spread of SLO attainment over the
   seeds, overall and per phase, every seed's numbers, and a diagnosis of each dynamic seed that
   flipped nothing and of seeds of one policy far apart.

With `--url` nothing is started: the workload runs once (the first seed) against that server,
calibrated against it unless both rates are given (a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import aiohttp

from bench.client import BenchError, base_url
from bench.pd_calibrate import (CalibrationPlan, calibrate, calibrate_url, calibrated_rates, engine_max_batch,
                                layout_threads)
from bench.pd_report import DIVERGENCE_PTS, aggregate_policy, compare_policies, error_entry, print_table, seed_entry
from bench.pd_status import wait_for_layout
from bench.pd_workload import (WORKLOADS, Arrival, Phase, RunRecord, build_phases, make_workload, run_workload,
                               summarize_run)
from bench.server_proc import add_server_arguments, fmt, running_server
from bench.output import write_json
from common.progress import add_progress_argument, progress_bar, progress_enabled, prints_above_bars

__all__ = ["POLICIES", "add_arguments", "run", "smoke", "serve_argv", "phases_from_args", "parse_seeds", "measure",
           "rates_from_calibration"]

POLICIES = ("mixed", "static", "dynamic")


async def measure(url: str, workload: list[Arrival], *, expected_workers: int | None, layout_timeout_s: float,
                  timeout: float = 120.0, warmup: int = 2, drain_s: float = 30.0) -> tuple[RunRecord, dict]:
    """Wait until the whole layout serves, then run `workload`: (the run, the layout seen at its start)."""
    root = base_url(url)[: -len("/v1")]
    async with aiohttp.ClientSession() as session:
        layout = await wait_for_layout(session, root, expected=expected_workers, timeout_s=layout_timeout_s)
    record = await run_workload(url, workload, timeout=timeout, warmup=warmup, drain_s=drain_s)
    return record, layout


async def smoke(url: str, seconds: float = 4.0, rate: float = 1.0, ttft_slo_ms: float = 5000,
                tpot_slo_ms: float = 500) -> dict:
    """A short two-phase run against a running server: checks the whole path end to end in seconds."""
    phases = [Phase("prompt-heavy", seconds / 2, rate, 128, 4), Phase("decode-heavy", seconds / 2, rate, 16, 16)]
    record = await run_workload(url, make_workload(phases, seed=1), warmup=1, drain_s=60)
    return summarize_run(record, phases, ttft_slo_ms / 1000, tpot_slo_ms / 1000)


# ------------------------------------------------------------------------------ the servers


def serve_argv(args: argparse.Namespace, policy: str, port: int) -> list[str]:
    """The `xllm serve` command line of one policy's run: P+D mixed workers for `mixed`, else the
    P/D layout under that policy; every worker at the threads the calibration measured with."""
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(port)]
    if policy == "mixed":
        argv += ["--workers", str(args.prefill_workers + args.decode_workers)]
    else:
        argv += ["--prefill-workers", str(args.prefill_workers), "--decode-workers", str(args.decode_workers),
                 "--pd-policy", policy]
    argv += ["--threads", str(layout_threads(args)),
             "--ttft-slo-ms", f"{args.ttft_slo_ms:g}", "--tpot-slo-ms", f"{args.tpot_slo_ms:g}"]
    if args.model:
        argv += ["--model", args.model]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


def _run_seed(args: argparse.Namespace, policy: str, seed: int, phases: list[Phase]) -> dict:
    """One policy on one seed, on a server of its own; an entry with `error` when it could not run."""
    url = f"http://127.0.0.1:{args.port}"
    workload = make_workload(phases, seed)
    try:
        with running_server(serve_argv(args, policy, args.port), url, args, f"{policy} seed {seed}"):
            print(f"[{policy} seed {seed}] serving; waiting for all {args.prefill_workers + args.decode_workers} "
                  f"workers, then {len(workload)} requests over {_duration(phases):g} s", flush=True)
            record, layout = asyncio.run(measure(
                url, workload, expected_workers=args.prefill_workers + args.decode_workers,
                layout_timeout_s=args.layout_timeout, timeout=args.timeout, drain_s=args.drain_s))
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"[{policy} seed {seed}] no result: {exc}", file=sys.stderr, flush=True)
        return error_entry(seed, str(exc))
    summary = summarize_run(record, phases, args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
    entry = seed_entry(seed, {**summary, "layout": layout})
    print(f"[{policy} seed {seed}] SLO attainment {fmt(entry['slo_attainment_pct'], '.1f')} %, "
          f"{entry['flips']} flip(s), {summary['overall']['failed']} failed", flush=True)
    return entry


def _duration(phases: list[Phase]) -> float:
    end = latest = 0.0
    for ph in phases:
        end = (ph.start_s if ph.start_s is not None else end) + ph.duration_s
        latest = max(latest, end)
    return latest


# ------------------------------------------------------------------------------ the command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model for xllm serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--policies", default=",".join(POLICIES), help="comma-separated, of mixed, static, dynamic")
    p.add_argument("--workload", choices=WORKLOADS, default="shifting",
                   help="shifting: prompt-heavy then decode-heavy; steady: both classes at half rate all along")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated workload seeds (each policy runs each)")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=2,
                   help="default 2: with 1P+1D no flip is allowed (never zero workers of a role)")
    p.add_argument("--ttft-slo-ms", type=float, default=3000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=200.0)
    p.add_argument("--phase-s", type=float, default=25.0, help="seconds of each phase (max 300)")
    p.add_argument("--rate1", type=float, default=None,
                   help="req/s of the prompt-heavy requests (default: calibrated, see --prefill-factor)")
    p.add_argument("--prefill-factor", type=float, default=1.3,
                   help="prompt-heavy load as a multiple of one prefill worker's measured capacity")
    p.add_argument("--prompt-len1", type=int, default=512)
    p.add_argument("--output-len1", type=int, default=4)
    p.add_argument("--rate2", type=float, default=None,
                   help="req/s of the decode-heavy requests (default: calibrated, see --decode-factor)")
    p.add_argument("--decode-factor", type=float, default=1.3,
                   help="decode-heavy load as a multiple of one decode worker's measured capacity")
    p.add_argument("--prompt-len2", type=int, default=32)
    p.add_argument("--output-len2", type=int, default=64)
    p.add_argument("--calib-batch", type=int, default=None,
                   help="measure decode at this batch (default: the largest of 1, 2, 4, ... whose TPOT meets the SLO)")
    p.add_argument("--calib-max-batch", type=int, default=None,
                   help="the largest batch the decode sweep tries (default: the workers' --max-num-seqs)")
    p.add_argument("--drain-s", type=float, default=15.0, help="max wait after the last arrival (max 300)")
    p.add_argument("--layout-timeout", type=float, default=180.0,
                   help="seconds to wait, once the server answers, for every worker of the layout")
    p.add_argument("--divergence-pts", type=float, default=DIVERGENCE_PTS,
                   help="explain two seeds of one policy further apart than this (attainment points)")
    add_server_arguments(p, port=8017)
    p.add_argument("--url", default=None, help="run once against this running server instead of starting any")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--plot", dest="png_path", default=None, metavar="PNG",
                   help="draw SLO attainment and tok/s per policy and phase (± stdev over seeds), flips and "
                        "predictor error into this PNG")
    add_progress_argument(p)


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` → [0, 1, 2]; ValueError for an empty list, a repeat or a non-integer."""
    seeds = [int(s) for s in text.split(",") if s.strip()]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("--seeds takes distinct comma-separated integers")
    return seeds


def phases_from_args(args: argparse.Namespace, rate1: float | None = None, rate2: float | None = None) -> list[Phase]:
    """The workload's phases at the given rates (default: `--rate1/--rate2`)."""
    return build_phases(args.workload, args.phase_s, rate1 if rate1 is not None else args.rate1,
                        rate2 if rate2 is not None else args.rate2, args.prompt_len1, args.output_len1,
                        args.prompt_len2, args.output_len2)


def rates_from_calibration(args: argparse.Namespace, calibration: dict | None) -> dict:
    """Each phase's req/s: `--rate1/--rate2` where given, else from the measured capacities."""
    calibrated = (None, None)
    if calibration is not None:
        calibrated = calibrated_rates(calibration["prefill"]["tok_per_s"], calibration["decode"]["tok_per_s"],
                                      args.prompt_len1, args.output_len2, args.prefill_factor, args.decode_factor)
    return {"prompt-heavy": args.rate1 if args.rate1 is not None else calibrated[0],
            "decode-heavy": args.rate2 if args.rate2 is not None else calibrated[1],
            "calibrated": {"prompt-heavy": calibrated[0], "decode-heavy": calibrated[1]},
            "overridden": {"rate1": args.rate1 is not None, "rate2": args.rate2 is not None}}


def _problems(args: argparse.Namespace) -> list[str]:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    problems = []
    if not 0 < args.phase_s <= 300 or not 0 < args.drain_s <= 300:
        problems.append("--phase-s and --drain-s must be in (0, 300]")
    if not policies or any(p not in POLICIES for p in policies):
        problems.append("--policies takes mixed, static and/or dynamic")
    try:
        parse_seeds(args.seeds)
    except ValueError:
        problems.append("--seeds takes distinct comma-separated integers")
    if args.prefill_workers < 1 or args.decode_workers < 1:
        problems.append("--prefill-workers and --decode-workers must be >= 1")
    if min(args.prefill_factor, args.decode_factor) <= 0 or any(
            r is not None and r <= 0 for r in (args.rate1, args.rate2)):
        problems.append("the factors and rates must be > 0")
    if any(b is not None and b < 1 for b in (args.calib_batch, args.calib_max_batch)):
        problems.append("--calib-batch and --calib-max-batch must be >= 1")
    return problems


def _plan(args: argparse.Namespace) -> CalibrationPlan:
    return CalibrationPlan(prefill_prompt_len=args.prompt_len1, decode_prompt_len=args.prompt_len2,
                           decode_output_len=args.output_len2, tpot_slo_s=args.tpot_slo_ms / 1000,
                           max_batch=args.calib_max_batch or engine_max_batch(args.serve_arg),
                           batch=args.calib_batch, timeout=args.timeout,
                           layout_timeout_s=args.layout_timeout)


def _calibration(args: argparse.Namespace) -> dict | None:
    if args.rate1 is not None and args.rate2 is not None:
        return None
    print("calibration: measuring one worker's prefill and decode capacity", flush=True)
    measured = (asyncio.run(calibrate_url(args.url, _plan(args), progress=progress_enabled(args))) if args.url
                else calibrate(args, _plan(args)))
    print(f"calibration: prefill {measured['prefill']['tok_per_s']:.0f} tok/s, decode "
          f"{measured['decode']['tok_per_s']:.0f} tok/s at batch {measured['decode']['batch']} "
          f"(TPOT {measured['decode']['tpot_ms']:.0f} ms), in {measured['wall_s']:.0f} s", flush=True)
    return measured


def run(args: argparse.Namespace) -> int:
    problems = _problems(args)
    if problems:
        print(f"xllm bench pd: {problems[0]}", file=sys.stderr)
        return 2
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    seeds = parse_seeds(args.seeds)
    workers = args.prefill_workers + args.decode_workers
    try:
        calibration = _calibration(args)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"xllm bench pd: calibration failed: {exc}", file=sys.stderr)
        return 1
    rates = rates_from_calibration(args, calibration)
    phases = phases_from_args(args, rates["prompt-heavy"], rates["decode-heavy"])
    print(f"load: prompt-heavy {rates['prompt-heavy']:.3g} req/s, decode-heavy {rates['decode-heavy']:.3g} req/s "
          f"({args.workload}); seeds {seeds}", flush=True)
    entries: dict[str, list[dict]] = {}
    if args.url:  # a smoke run: once, on the first seed, against what is there
        try:
            record, layout = asyncio.run(measure(args.url, make_workload(phases, seeds[0]), expected_workers=None,
                                                 layout_timeout_s=args.layout_timeout, timeout=args.timeout,
                                                 drain_s=args.drain_s))
        except (BenchError, RuntimeError, OSError) as exc:
            print(f"xllm bench pd: {exc}", file=sys.stderr)
            return 1
        summary = summarize_run(record, phases, args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
        entries["external"] = [seed_entry(seeds[0], {**summary, "layout": layout})]
    else:
        print(f"{len(seeds) * len(policies)} runs of {_duration(phases):g} s of load each, every one on a fresh "
              f"server (start-up, then up to {args.drain_s:g} s of drain)", flush=True)
        show = progress_enabled(args)
        with progress_bar(len(seeds) * len(policies), "bench pd", "run", enabled=show) as bar, \
                prints_above_bars(show):
            for seed in seeds:
                for policy in policies:
                    bar.set_postfix_str(f"{policy} seed {seed}")
                    entries.setdefault(policy, []).append(_run_seed(args, policy, seed, phases))
                    bar.update(1)
    runs = {policy: aggregate_policy(policy, e, divergence_pts=args.divergence_pts) for policy, e in entries.items()}
    for policy, r in runs.items():  # what was measured, as a user would start it
        r["serve"] = args.url if args.url else " ".join(["xllm", *serve_argv(args, policy, args.port)[3:]])
    comparisons = compare_policies(runs)
    print_table(runs, comparisons)
    if calibration is not None:
        calibration = {**calibration, "factors": {"prefill": args.prefill_factor, "decode": args.decode_factor}}
    doc = {
        "benchmark": "pd", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model or "default",
        "layout": f"{args.prefill_workers}P+{args.decode_workers}D", "workers": workers,
        "threads_per_worker": None if args.url else layout_threads(args), "workload": args.workload,
        "slo": {"ttft_ms": args.ttft_slo_ms, "tpot_ms": args.tpot_slo_ms},
        "calibration": {**(calibration or {"skipped": "--rate1 and --rate2 given"}), "rates": rates},
        "phases": [ph.as_dict() for ph in phases], "seeds": seeds[:1] if args.url else seeds, "cpu_count": os.cpu_count(),
        "runs": runs, "comparisons": comparisons,
        "diagnosis": [line for r in runs.values() for line in r["diagnosis"]],
    }
    write_json(args.json_path, doc)
    if getattr(args, "png_path", None):
        from bench.plots import pd_plot  # matplotlib is only imported when a plot is asked for

        if pd_plot(args.png_path, doc):
            print(f"plot written to {args.png_path}")
    return 0 if all(r["overall"].get("completed") for r in runs.values()) else 1
