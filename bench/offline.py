"""`xllm bench offline`: N synthetic requests through the engine, at most C in flight."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import time

import torch

from common.engine.config import EngineConfig
from common.engine.engine import EngineStats, LLMEngine
from common.engine.sampling_params import SamplingParams
from common.engine.speculative.speculator import SpecStats
from bench.output import write_json
from bench.spec_workload import WORKLOADS, repetitive_prompts
from common.tokenizer import load_tokenizer
from common.progress import add_progress_argument, progress_bar

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "plot", "spec_summary", "timeline"]

_TIMELINE_BINS = 100  # points of the time series kept in the results (and drawn by --plot)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=16, help="max requests in flight")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="random token prompts, or repetitive ones (code editing, summarising: see bench.spec_workload) "
                        "where speculative decoding's drafts get accepted")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    p.add_argument("--plot", dest="png_path", default=None, metavar="PNG",
                   help="draw output tok/s and requests in flight over the run into this PNG")
    add_progress_argument(p)


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids where special tokens usually live.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def _repetitive_prompts(engine: LLMEngine, n: int, length: int, seed: int) -> list[list[int]]:
    """Chat prompts of about ``length`` tokens whose answers copy much of them."""
    tokenizer = load_tokenizer(engine.model_path)
    texts = repetitive_prompts(n, approx_chars=4 * length, seed=seed)
    return [tokenizer.encode_chat([{"role": "user", "content": text}])[-length:] for text in texts]


def run(args: argparse.Namespace, config: EngineConfig) -> dict:
    config.max_num_seqs = max(config.max_num_seqs, args.concurrency)
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    if getattr(args, "workload", "random") == "repetitive":
        prompts = _repetitive_prompts(engine, args.num_requests + 1, args.prompt_len, args.seed)
    else:
        prompts = _random_prompts(args.num_requests + 1, args.prompt_len, engine.vocab_size, args.seed)

    # Warm-up (first-call allocations, oneDNN primitive creation), not measured.
    engine.add_request("warmup", prompts.pop(), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.stats = EngineStats()  # the warm-up is not part of the measurement
    if engine.speculator is not None:
        engine.speculator.stats = SpecStats()

    submitted = finished = 0
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    out_tokens = 0
    steps: list[tuple[float, int, int]] = []  # (seconds since start, output tokens so far, in flight)
    t_start = time.perf_counter()
    with progress_bar(args.num_requests, "offline bench", "req", args=args) as bar:
        while finished < args.num_requests:
            while submitted < args.num_requests and submitted - finished < args.concurrency:
                rid = f"r{submitted}"
                engine.add_request(rid, prompts[submitted], params)
                arrival[rid] = time.perf_counter()
                submitted += 1
            in_flight = submitted - finished
            for out in engine.step():
                now = time.perf_counter()
                out_tokens += len(out.new_token_ids)
                first.setdefault(out.request_id, now)
                if out.finish_reason is not None:
                    done[out.request_id] = now
                    finished += 1
                    bar.update(1)
            steps.append((time.perf_counter() - t_start, out_tokens, in_flight))
    elapsed = time.perf_counter() - t_start

    ttft = [first[r] - arrival[r] for r in done]
    tpot = [(done[r] - first[r]) / max(1, args.output_len - 1) for r in done]
    stats = engine.load_stats()
    result = {
        "model": engine.model_path,
        "dtype": str(config.resolved_dtype()),
        "concurrency": args.concurrency,
        "num_requests": args.num_requests,
        "prompt_len": args.prompt_len,
        "output_len": args.output_len,
        "elapsed_s": elapsed,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / elapsed,
        "total_tokens_per_s": (out_tokens + args.num_requests * args.prompt_len) / elapsed,
        "mean_step_time_s": stats["mean_step_time_s"],
        "steps": stats["steps"],
        "peak_kv_pages_used": stats["peak_used_pages"],
        "kv_pages_total": stats["num_pages"],
        "preemptions": stats["preemptions"],
        **spec_summary(stats),
        "mean_ttft_s": sum(ttft) / len(ttft),
        "mean_tpot_s": sum(tpot) / len(tpot),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "timeline": timeline(steps, elapsed),
    }
    print(
        f"offline bench: C={args.concurrency} N={args.num_requests} P={args.prompt_len} O={args.output_len}: "
        f"{result['output_tokens_per_s']:.1f} output tok/s, mean step {result['mean_step_time_s'] * 1e3:.1f} ms, "
        f"mean TTFT {result['mean_ttft_s'] * 1e3:.0f} ms, mean TPOT {result['mean_tpot_s'] * 1e3:.1f} ms, "
        f"peak KV pages {result['peak_kv_pages_used']}/{result['kv_pages_total']}"
    )
    if result["speculative_method"] != "none":
        print(f"speculative decoding ({result['speculative_method']}): acceptance rate "
              f"{result['spec_acceptance_rate']:.2f}, "
              f"{result['spec_mean_accepted_length']:.2f} tokens per verified step")
    write_json(args.json_path, result)
    if getattr(args, "png_path", None):
        plot(args.png_path, result)
        print(f"plot written to {args.png_path}")
    return result


def spec_summary(stats: dict) -> dict:
    """Speculative decoding's figures from an engine's (or worker's) load stats."""
    return {
        "speculative_method": stats.get("spec_method", "none"),
        "spec_draft_tokens": stats.get("spec_draft_tokens_total", 0),
        "spec_accepted_tokens": stats.get("spec_accepted_tokens_total", 0),
        "spec_acceptance_rate": stats.get("spec_acceptance_rate", 0.0),
        "spec_mean_accepted_length": stats.get("spec_mean_accepted_length", 0.0),
    }


def timeline(steps: list[tuple[float, int, int]], elapsed: float, bins: int = _TIMELINE_BINS) -> list[dict]:
    """The run in at most `bins` equal slices of time: each slice's end, its output tok/s and the
    requests in flight at its last step (slices without a step are left out)."""
    if not steps or elapsed <= 0:
        return []
    width = elapsed / bins
    out: list[dict] = []
    prev_t, prev_tokens, i = 0.0, 0, 0
    for b in range(1, bins + 1):
        end = b * width
        last = None
        while i < len(steps) and (steps[i][0] <= end or b == bins):
            last = steps[i]
            i += 1
        if last is None:
            continue
        t, tokens, in_flight = last
        out.append({"t_s": t, "output_tok_per_s": (tokens - prev_tokens) / max(t - prev_t, 1e-9),
                    "in_flight": in_flight})
        prev_t, prev_tokens = t, tokens
    return out


def plot(path: str, result: dict) -> None:
    """Output tok/s and requests in flight over the run (see `bench.plots.offline_plot`)."""
    from bench.plots import offline_plot  # matplotlib is only imported when a plot is asked for

    offline_plot(path, result)
