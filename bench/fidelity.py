"""`xllm bench fidelity`: how long greedy decoding on each numeric path stays on the fp32 path.

Teacher-forced scores (`xllm bench quality`) say how far each path's next-token distribution is
from fp32; this says what a user sees: greedy continuations of chat prompts, ``--max-tokens``
long, one request at a time as in single-stream serving (prefill on the GEMM path, decode on the
small-batch path), compared token by token with the fp32 engine's (which equals transformers).
Reported per path: the mean number of leading tokens identical to fp32's, and the fraction of
prompts that match all the way. With ``--llama-bin-dir``, llama.cpp's ``llama-server`` runs the
same GGUF on the same token ids (greedy, no prompt cache) and is scored the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import urllib.request
from pathlib import Path

import torch

from bench.output import write_json
from bench.quality import environment
from common.progress import add_progress_argument, progress_bar

__all__ = ["add_arguments", "run", "common_prefix", "PROMPTS", "MODES"]

PROMPTS = [
    "What is the capital of France, and what is it famous for?",
    "Write a short poem about the sea.",
    "Explain how a hash map works to a new programmer.",
    "Give me three tips for sleeping better.",
    "What are the main differences between Python lists and tuples?",
    "Summarise the plot of Romeo and Juliet in a few sentences.",
    "How do vaccines train the immune system?",
    "Write a polite email asking a colleague to review my code.",
    "Why is the sky blue?",
    "List the planets of the solar system in order from the sun.",
    "What should I pack for a weekend hiking trip?",
    "Describe the water cycle.",
]

# name -> (dtype, environment for load_model, EngineConfig fields); "default" is what `xllm serve` runs.
MODES: dict[str, tuple[str, dict[str, str], dict[str, object]]] = {
    "fp32": ("float32", {}, {}),
    "default (auto)": ("auto", {}, {}),
    "default, --w8a8-prompts": ("auto", {}, {"w8a8_prompts": True}),
    "default, int8 decode (no q4)": ("auto", {"XLLM_Q4_DECODE": "0", "XLLM_Q8_HEAD": "0"}, {}),
    "bf16": ("bfloat16", {"XLLM_INT8_DECODE": "0", "XLLM_INT8_GEMM": "0"}, {}),
    "bf16+q4-weights": ("bfloat16", {"XLLM_INT8_DECODE": "1", "XLLM_INT8_GEMM": "0"}, {}),
    "bf16+int8-weights": ("bfloat16", {"XLLM_INT8_DECODE": "1", "XLLM_INT8_GEMM": "0", "XLLM_Q4_DECODE": "0",
                                       "XLLM_Q8_HEAD": "0"}, {}),
    "bf16+w8a8": ("bfloat16", {"XLLM_INT8_DECODE": "0", "XLLM_INT8_GEMM": "1"}, {"w8a8_prompts": True}),
    "default, int8 KV": ("auto", {}, {"kv_dtype": "int8"}),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per prompt")
    p.add_argument("--num-prompts", type=int, default=len(PROMPTS), help=f"how many of the {len(PROMPTS)} prompts")
    p.add_argument("--mode", action="append", default=None, choices=list(MODES),
                   help="paths to score besides fp32 (repeatable; default: all)")
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EngineConfig field for every non-fp32 path, e.g. kv_dtype=int8 (repeatable)")
    p.add_argument("--llama-bin-dir", default=os.environ.get("XLLM_LLAMA_BIN_DIR"),
                   help="also score llama.cpp's llama-server from this folder")
    p.add_argument("--llama-port", type=int, default=18141)
    p.add_argument("--json", dest="json_path", default=None, help="write results here")
    add_progress_argument(p)


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _engine_kwargs(pairs: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg wants KEY=VALUE, got {pair!r}")
        out[key] = int(value) if value.isdigit() else value
    return out


def _generate(path: str, dtype: str, env: dict[str, str], prompts: list[list[int]], max_tokens: int,
              extra: dict[str, object]) -> list[list[int]]:
    from common.engine.llm import LLM
    from common.engine.sampling_params import SamplingParams

    with environment(env):
        llm = LLM(path, dtype=dtype, kv_cache_memory="256MiB", weight_cache=False, **extra)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    # One at a time, as a single stream is served: its decode runs on the small-batch path.
    return [llm.generate(ids, params)[0].token_ids for ids in prompts]


def _llama_generate(bin_dir: str, path: str, port: int, prompts: list[list[int]], max_tokens: int,
                    args: argparse.Namespace) -> list[list[int]]:
    import sys

    from bench.server_proc import running_server

    argv = [str(Path(bin_dir) / "llama-server"), "-m", path, "--host", "127.0.0.1", "--port", str(port),
            "-t", str(os.cpu_count() or 1), "-np", "1", "-c", "4096"]
    url = f"http://127.0.0.1:{port}"
    server_args = argparse.Namespace(server_log=None, startup_timeout=120.0)
    outs = []
    with running_server(argv, url, server_args, "llama-server"):
        for ids in prompts:
            body = {"prompt": ids, "n_predict": max_tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                    "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
            req = urllib.request.Request(url + "/completion", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as resp:
                doc = json.loads(resp.read())
            if "tokens" not in doc:
                print("llama-server returned no token ids (too old for return_tokens?)", file=sys.stderr)
                return []
            outs.append(list(doc["tokens"]))
    return outs


def _score(ref: list[list[int]], outs: list[list[int]], max_tokens: int) -> dict:
    prefixes = [common_prefix(r, o) for r, o in zip(ref, outs)]
    return {
        "mean_tokens_agreeing": statistics.mean(prefixes),
        "min_tokens_agreeing": min(prefixes),
        "fully_agreeing_prompts": sum(p >= max_tokens for p in prefixes) / len(prefixes),
        "per_prompt": prefixes,
    }


def run(args: argparse.Namespace) -> int:
    from common.default_model import default_model_path
    from common.tokenizer import load_tokenizer

    torch.manual_seed(0)
    path = args.model or str(default_model_path())
    tokenizer = load_tokenizer(path)
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in PROMPTS[: args.num_prompts]]
    modes = ["fp32", *[m for m in (args.mode or MODES) if m != "fp32"]]
    extra = _engine_kwargs(args.engine_arg)
    outputs: dict[str, list[list[int]]] = {}
    with progress_bar(len(modes) + bool(args.llama_bin_dir), "fidelity", "path", args=args) as bar:
        for name in modes:
            dtype, env, fields = MODES[name]
            outputs[name] = _generate(path, dtype, env, prompts, args.max_tokens,
                                      fields if name == "fp32" else {**fields, **extra})
            bar.update(1)
        if args.llama_bin_dir:
            llama = _llama_generate(args.llama_bin_dir, path, args.llama_port, prompts, args.max_tokens, args)
            if llama:
                outputs["llama.cpp"] = llama
            bar.update(1)
    ref = outputs["fp32"]
    results = {name: _score(ref, outs, args.max_tokens) for name, outs in outputs.items()}
    for name, r in results.items():
        print(f"{name:22s} agrees with fp32 for {r['mean_tokens_agreeing']:5.1f} of {args.max_tokens} tokens on "
              f"average (min {r['min_tokens_agreeing']}), all {args.max_tokens}: "
              f"{r['fully_agreeing_prompts'] * 100:.0f}% of prompts")
    write_json(args.json_path, {"benchmark": "fidelity", "model": path, "max_tokens": args.max_tokens,
                                "num_prompts": len(prompts), "engine_args": args.engine_arg, "paths": results,
                                "outputs": outputs})
    return 0
