"""`xllm bench offline`: N synthetic requests through the engine, at most C in flight."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import time

import torch

from common.engine.config import EngineConfig
from common.engine.engine import EngineStats, LLMEngine
from common.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=16, help="max requests in flight")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


def _random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the low ids where special tokens usually live.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def run(args: argparse.Namespace, config: EngineConfig) -> dict:
    config.max_num_seqs = max(config.max_num_seqs, args.concurrency)
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    prompts = _random_prompts(args.num_requests + 1, args.prompt_len, engine.vocab_size, args.seed)

    # Warm-up (first-call allocations, oneDNN primitive creation), not measured.
    engine.add_request("warmup", prompts.pop(), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    engine.stats = EngineStats()  # the warm-up is not part of the measurement

    submitted = finished = 0
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    out_tokens = 0
    t_start = time.perf_counter()
    while finished < args.num_requests:
        while submitted < args.num_requests and submitted - finished < args.concurrency:
            rid = f"r{submitted}"
            engine.add_request(rid, prompts[submitted], params)
            arrival[rid] = time.perf_counter()
            submitted += 1
        for out in engine.step():
            now = time.perf_counter()
            out_tokens += len(out.new_token_ids)
            first.setdefault(out.request_id, now)
            if out.finish_reason is not None:
                done[out.request_id] = now
                finished += 1
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
        "mean_ttft_s": sum(ttft) / len(ttft),
        "mean_tpot_s": sum(tpot) / len(tpot),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    print(
        f"offline bench: C={args.concurrency} N={args.num_requests} P={args.prompt_len} O={args.output_len}: "
        f"{result['output_tokens_per_s']:.1f} output tok/s, mean step {result['mean_step_time_s'] * 1e3:.1f} ms, "
        f"mean TTFT {result['mean_ttft_s'] * 1e3:.0f} ms, mean TPOT {result['mean_tpot_s'] * 1e3:.1f} ms, "
        f"peak KV pages {result['peak_kv_pages_used']}/{result['kv_pages_total']}"
    )
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
