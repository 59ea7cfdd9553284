"""`xllm bench gpu-decode`: decode speed on a CUDA GPU, with and without CUDA graphs, against the
weight-read floor.

For each batch size (default 1, 16, 64) an engine on ``--device`` prefills that many prompts of
``--context`` tokens, then runs ``--steps`` decode steps (``ignore_eos``); the median decode step
is reported as ms per step and tokens/s, once with the decode CUDA graphs and once eager
(``--no-cuda-graphs``). A decode step must at least read every weight once, so it can be no
faster than ``weight bytes / memory bandwidth``; the bandwidth is measured here with a large
device-to-device copy, and the floor is printed with each row (plus the same floor with the
step's KV reads added). ``floor_ratio`` = step time / weight floor: 1.0 would be perfect.

Without a CUDA device (or without triton) it says so and exits 1: nothing here runs on a CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from bench.output import write_json

__all__ = ["add_arguments", "run", "measure_bandwidth", "weight_bytes"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda", help="CUDA device (cuda)")
    p.add_argument("--dtype", default="bfloat16", help="weights/activations (bfloat16)")
    p.add_argument("--batches", default="1,16,64", help="comma-separated decode batch sizes (1,16,64)")
    p.add_argument("--context", type=int, default=128, help="prompt tokens per sequence (128)")
    p.add_argument("--steps", type=int, default=64, help="decode steps timed per batch size (64)")
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV pool of each engine (4GiB)")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Device memory bandwidth in bytes/s from a large copy (each copy reads and writes ``nbytes``)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / repeats
    del src, dst
    return 2 * nbytes / seconds


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads from the weights: every parameter once (a tied embedding is the lm
    head and is read whole); an untied embedding table only by the few rows looked up, so it is left out."""
    seen: set[int] = set()
    total = 0
    embed = model.model.embed_tokens.weight if hasattr(model, "model") else None
    tied = getattr(model, "lm_head", None) is None
    for p in model.parameters():
        if p.data_ptr() in seen or (p is embed and not tied):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * p.element_size()
    return total


def _decode_steps(llm_engine, batch: int, context: int, steps: int) -> list[float]:
    """Seconds of each decode-only step of ``batch`` sequences (prefill steps not counted)."""
    from common.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps + 1, ignore_eos=True)
    vocab = llm_engine.vocab_size
    for i in range(batch):
        # Distinct prompts (no shared prefix pages), ids away from the special tokens.
        prompt = [(1000 + 7 * i + 13 * j) % (vocab - 200) + 100 for j in range(context)]
        llm_engine.add_request(f"b{batch}-{i}", prompt, params)
    produced = 0
    while produced < batch:  # prefill (one step: the token budget holds every prompt)
        produced += sum(1 for out in llm_engine.step() if out.num_output_tokens == 1 and out.new_token_ids)
    times = []
    while llm_engine.has_unfinished():
        start = time.perf_counter()
        outs = llm_engine.step()  # returns host token ids: the step has finished on the device
        elapsed = time.perf_counter() - start
        if len(outs) == batch:
            times.append(elapsed)
    return times


def _measure(args: argparse.Namespace, graphs: bool, batches: list[int]) -> tuple[list[dict], int, object]:
    from common.engine.config import EngineConfig
    from common.engine.engine import LLMEngine

    config = EngineConfig(model=args.model, device=args.device, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory,
                          max_num_seqs=max(batches), max_num_batched_tokens=max(512, max(batches) * args.context),
                          max_model_len=args.context + args.steps + 16, cuda_graphs=graphs)
    engine = LLMEngine(config)
    if graphs and engine.runner.decode_graphs is None:
        raise SystemExit("CUDA graphs could not be captured for this model (see the log)")
    rows = []
    for batch in batches:
        times = _decode_steps(engine, batch, args.context, args.steps)
        median = statistics.median(times)
        rows.append({"batch": batch, "graphs": graphs, "steps_timed": len(times), "step_ms": median * 1e3,
                     "tokens_per_s": batch / median})
    mc = engine.model_config
    kv_row = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * engine.kv_caches[0].element_size()
    nbytes = weight_bytes(engine.model)
    del engine
    torch.cuda.empty_cache()
    return rows, nbytes, kv_row


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("xllm bench gpu-decode needs a CUDA GPU, and torch sees none here (torch "
              f"{torch.__version__}); nothing to time", file=sys.stderr)
        return 1
    from kernels.backend import triton_available

    if not triton_available():
        print("xllm bench gpu-decode needs triton (pip install 'xllm[gpu]'); nothing to time", file=sys.stderr)
        return 1
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        raise SystemExit(f"--batches: {args.batches!r} is not a comma-separated list of integers") from None
    if not batches or min(batches) < 1 or args.context < 1 or args.steps < 2:
        raise SystemExit("need batch sizes >= 1, --context >= 1 and --steps >= 2")
    device = torch.device(args.device)
    bandwidth = measure_bandwidth(device)
    results = []
    nbytes = kv_row = 0
    for graphs in (True, False):
        rows, nbytes, kv_row = _measure(args, graphs, batches)
        results.extend(rows)
    floor_s = nbytes / bandwidth
    print(f"{torch.cuda.get_device_name(device)}: copy bandwidth {bandwidth / 1e9:.0f} GB/s, weights "
          f"{nbytes / 2**20:.1f} MiB -> weight-read floor {floor_s * 1e3:.3f} ms per step")
    for r in results:
        # Mean context over the timed steps: the prompt plus half the decoded tokens.
        kv_bytes = r["batch"] * (args.context + args.steps // 2) * kv_row
        r["floor_ms"] = floor_s * 1e3
        r["floor_with_kv_ms"] = (nbytes + kv_bytes) / bandwidth * 1e3
        r["floor_ratio"] = r["step_ms"] / r["floor_ms"]
        print(f"batch {r['batch']:3d} {'graphs' if r['graphs'] else 'eager ':6s}  {r['step_ms']:7.3f} ms/step  "
              f"{r['tokens_per_s']:9.0f} tok/s  floor {r['floor_ms']:.3f} ms (+KV {r['floor_with_kv_ms']:.3f})  "
              f"x{r['floor_ratio']:.1f} of the floor")
    write_json(args.json_path, {
        "device": torch.cuda.get_device_name(device), "dtype": args.dtype, "model": args.model,
        "context": args.context, "steps": args.steps, "bandwidth_gbps": bandwidth / 1e9,
        "weight_bytes": nbytes, "results": results,
    })
    return 0
