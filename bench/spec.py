"""`xllm bench spec`: single-stream decode with no speculation, n-gram lookup and suffix decoding on
a repetitive workload (code editing, summarising a given text): output tok/s, acceptance rate,
mean accepted length per step and the speedup over plain decoding, in one JSON document."""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import torch

from bench.output import write_json
from bench.spec_workload import repetitive_prompts
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.tokenizer import load_tokenizer

__all__ = ["add_arguments", "run", "run_method"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="none,ngram,suffix", help="comma-separated speculative methods to compare")
    p.add_argument("--num-requests", type=int, default=4, help="requests, one after the other (single stream)")
    p.add_argument("--prompt-chars", type=int, default=1200, help="approximate length of each prompt's text")
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


def _prompt_ids(engine: LLMEngine, texts: list[str]) -> list[list[int]]:
    tokenizer = load_tokenizer(engine.model_path)
    return [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in texts]


def run_method(config: EngineConfig, texts: list[str], output_len: int) -> dict:
    engine = LLMEngine(config)
    prompts = _prompt_ids(engine, texts)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    engine.add_request("warmup", prompts[0][:32], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    before = engine.load_stats()
    decode_s = 0.0
    out_tokens = 0
    outputs = []
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
        tokens: list[int] = []
        first_at = None
        while engine.has_unfinished():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
            if first_at is None and tokens:
                first_at = time.perf_counter()  # decode time starts after the prefill's token
        decode_s += time.perf_counter() - first_at
        out_tokens += len(tokens) - 1
        outputs.append(tokens)
    stats = engine.load_stats()
    drafted = stats.get("spec_draft_tokens_total", 0) - before.get("spec_draft_tokens_total", 0)
    accepted = stats.get("spec_accepted_tokens_total", 0) - before.get("spec_accepted_tokens_total", 0)
    spec_steps = stats.get("spec_steps_total", 0) - before.get("spec_steps_total", 0)
    return {
        "method": config.speculative_method,
        "num_speculative_tokens": config.num_speculative_tokens,
        "decode_tokens": out_tokens,
        "decode_s": decode_s,
        "decode_tokens_per_s": out_tokens / decode_s if decode_s else 0.0,
        "draft_tokens": drafted,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / drafted if drafted else 0.0,
        "mean_accepted_length": (accepted + spec_steps) / spec_steps if spec_steps else 1.0,
        "backoffs": stats.get("spec_backoffs_total", 0),
        "outputs": outputs,
    }


def run(args: argparse.Namespace, config: EngineConfig | None = None) -> dict:
    config = config or EngineConfig()
    texts = repetitive_prompts(args.num_requests, args.prompt_chars, args.seed)
    results = []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        entry = run_method(dataclasses.replace(config, speculative_method=method), texts, args.output_len)
        results.append(entry)
        print(f"{method:>7}: {entry['decode_tokens_per_s']:.1f} decode tok/s, acceptance "
              f"{entry['acceptance_rate']:.2f}, {entry['mean_accepted_length']:.2f} tokens per verified step")
    base = next((r for r in results if r["method"] == "none"), None)
    for entry in results:
        entry["speedup_vs_none"] = entry["decode_tokens_per_s"] / base["decode_tokens_per_s"] if base else None
        # Greedy speculation must not change a token (bf16 batch-shape rounding aside).
        entry["same_tokens_as_none"] = entry["outputs"] == base["outputs"] if base else None
    for entry in results:
        del entry["outputs"]
    doc = {
        "benchmark": "spec", "model": config.model, "dtype": str(config.resolved_dtype()),
        "workload": "repetitive (code editing, summarising)", "num_requests": args.num_requests,
        "prompt_chars": args.prompt_chars, "output_len": args.output_len, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "results": results,
    }
    write_json(args.json_path, doc)
    return doc
