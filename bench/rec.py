"""`xllm bench rec`: generative recommendation, fixed-step beam search with and without the overlap.

Synthetic requests (random user histories of `--history-len` tokens) each decode exactly
`--num-steps` tokens with beam width `--beam-width` over an item vocabulary of `--num-items` token
ids (`common.engine.rec.FixedStepDecoder`). Three modes run the same batch: `serial` (one batch,
host work then compute each step), `split` (two micro-batches, still one after the other) and
`overlap` (two micro-batches pipelined: one computes on a worker thread while the host work of
the other runs). After a warm-up the modes take turns, `--repeats` runs each; throughput is
requests/s and beams x steps/s of each mode's median run. The xLLM report claims +23% from the overlap.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import time

import torch

from bench.output import write_json
from common.engine.config import EngineConfig
from common.engine.engine import LLMEngine
from common.engine.rec import FixedStepDecoder

__all__ = ["add_arguments", "run"]

MODES = {"serial": (False, 1), "split": (False, 2), "overlap": (True, 2)}  # name -> (overlap, micro_batches)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=32, help="requests in the batch")
    p.add_argument("--history-len", type=int, default=32, help="prompt tokens per request (the user history)")
    p.add_argument("--beam-width", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=3, help="tokens per item ID (decode steps per request)")
    p.add_argument("--num-items", type=int, default=1024, help="size of the item vocabulary (allowed token ids)")
    p.add_argument("--repeats", type=int, default=3, help="measured runs per mode (the median is reported)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


def run(args: argparse.Namespace, config: EngineConfig) -> dict:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise SystemExit(f"unknown mode(s) {unknown}; choose from {', '.join(MODES)}")
    engine = LLMEngine(config)
    rng = random.Random(args.seed)
    first_item = max(0, min(1000, engine.vocab_size - args.num_items))
    items = list(range(first_item, first_item + args.num_items))
    prompts = [[rng.randrange(100, engine.vocab_size) for _ in range(args.history_len)]
               for _ in range(args.num_requests)]
    # Prefix caching would let later runs skip the histories' prefill; every run computes them.
    engine.block_manager.enable_prefix_cache = False

    beam_steps = args.num_requests * args.beam_width * args.num_steps
    decoders = {mode: FixedStepDecoder(engine, args.beam_width, args.num_steps, items, overlap=MODES[mode][0],
                                       micro_batches=MODES[mode][1]) for mode in modes}
    for decoder in decoders.values():
        decoder.run(prompts[: max(2, args.num_requests // 4)])  # warm-up: allocations, oneDNN primitives
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    outputs: dict[str, list] = {}
    # Round-robin over the modes, so a load that drifts during the run weighs on each alike.
    for _ in range(args.repeats):
        for mode, decoder in decoders.items():
            t0 = time.perf_counter()
            outputs[mode] = decoder.run(prompts)
            times[mode].append(time.perf_counter() - t0)
    results: dict[str, dict] = {}
    for mode in modes:
        median = statistics.median(times[mode])
        overlap, micro_batches = MODES[mode]
        results[mode] = {
            "overlap": overlap, "micro_batches": micro_batches, "times_s": times[mode], "median_s": median,
            "min_s": min(times[mode]), "requests_per_s": args.num_requests / median,
            "beam_steps_per_s": beam_steps / median,
        }
        print(f"{mode:8s} median {median:.3f} s  {args.num_requests / median:8.2f} req/s  "
              f"{beam_steps / median:9.1f} beams*steps/s  (runs: {', '.join(f'{t:.3f}' for t in times[mode])})")
    engine.check_integrity()
    first = outputs[modes[0]]
    identical = all([[b.token_ids for b in r] for r in out] == [[b.token_ids for b in r] for r in first]
                    for out in outputs.values())
    doc = {
        "bench": "rec",
        "model": engine.model_path,
        "dtype": str(config.resolved_dtype()),
        "device": config.device,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "settings": {k: getattr(args, k) for k in
                     ("num_requests", "history_len", "beam_width", "num_steps", "num_items", "repeats", "seed")},
        "modes": results,
        "identical_results": identical,
    }
    for base in ("serial", "split"):
        if "overlap" in results and base in results:
            gain = results[base]["median_s"] / results["overlap"]["median_s"] - 1
            doc[f"overlap_gain_vs_{base}"] = gain
            print(f"overlap vs {base}: {gain * 100:+.1f}% throughput")
    print(f"identical beams in every mode: {identical}")
    write_json(args.json_path, doc)
    return doc
