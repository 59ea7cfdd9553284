"""`xllm bench vs-llamacpp`: xllm and llama.cpp side by side on this machine, as ratios.

Machines here differ between sessions (AMX or only AVX512-BF16/VNNI, core counts), so an absolute
figure from another day proves nothing: this runs both sides one after the other, on the same GGUF,
in the same session, and writes one JSON document with both sides and their ratios.

* single-stream decode: ``llama-bench -n 128`` (tg128) against ``xllm bench offline`` at
  concurrency 1 (prompt 200, output 128), repeated ``--reps`` times alternating the two. tg128
  times decoding alone, so our side is the decode rate too: one over the mean time per output token
  (TPOT, first token excluded); the output rate with the prompt's prefill in it is kept beside it;
* prefill: ``llama-bench -p 512`` (pp512) against our prefill of the same 200-token prompts
  (prompt tokens over mean TTFT);
* optionally single-stream decode with speculation (``--spec-method``) on the repetitive workload;
* served: ``llama-server`` (one slot per stream) then ``xllm serve``, each loaded by
  ``xllm bench serve`` at ``--serve-concurrency`` streams (streaming completions, ignore_eos).

llama.cpp comes from ``../shared/peers/build_llama_server.sh`` (``--llama-bin-dir``, or
``$XLLM_LLAMA_BIN_DIR``, or ``$PEERS/cppbuild/bin``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import cpu_flags, cpu_model
from bench.output import write_json
from bench.server_proc import running_server

__all__ = ["add_arguments", "run", "ratios"]


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()] if text.strip() else []


def _default_bin_dir() -> str | None:
    if os.environ.get("XLLM_LLAMA_BIN_DIR"):
        return os.environ["XLLM_LLAMA_BIN_DIR"]
    if os.environ.get("PEERS"):
        return str(Path(os.environ["PEERS"]) / "cppbuild" / "bin")
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llama-bin-dir", default=_default_bin_dir(),
                   help="folder with llama-bench and llama-server (default: $XLLM_LLAMA_BIN_DIR or $PEERS/cppbuild/bin)")
    p.add_argument("--model", default=None, help="the GGUF both sides run (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp (-t)")
    p.add_argument("--reps", type=int, default=2, help="paired single-stream runs (llama, xllm, llama, xllm, ...)")
    p.add_argument("--spec-method", action="append", default=[],
                   help="also time single-stream decode with this --speculative-method (repeatable)")
    p.add_argument("--serve-concurrency", type=_int_list, default=[16, 64],
                   help="served comparison at these stream counts (comma list; empty: skip)")
    p.add_argument("--serve-requests", type=int, default=64, help="requests per served level")
    p.add_argument("--port", type=int, default=18131, help="port of the server under test")
    p.add_argument("--startup-timeout", type=float, default=240.0)
    p.add_argument("--server-log", default=None, help="append both servers' output here")
    p.add_argument("--xllm-arg", action="append", default=[],
                   help="extra flag for xllm bench offline / xllm serve (repeatable, split on spaces)")
    p.add_argument("--json", dest="json_path", default="results/vs_llamacpp.json")


def _run(argv: list[str], timeout: float = 1800) -> str:
    print("$ " + " ".join(argv), flush=True)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return done.stdout


def _llama_bench(bin_dir: Path, model: str, threads: int) -> dict:
    out = _run([str(bin_dir / "llama-bench"), "-m", model, "-p", "512", "-n", "128", "-t", str(threads),
                "-r", "3", "-o", "json"])
    rows = json.loads(out[out.index("["):])
    by_kind = {}
    for row in rows:
        kind = "pp512" if row.get("n_prompt") else "tg128"
        by_kind[kind] = float(row["avg_ts"])
    return by_kind


def _xllm_offline(model: str, concurrency: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "offline.json")
        _run([sys.executable, "-m", "xllm.cli", "bench", "offline", "--model", model, "--concurrency",
              str(concurrency), "--num-requests", str(max(4, concurrency)), "--prompt-len", "200",
              "--output-len", "128", "--json", path, "--no-progress", *extra])
        doc = json.loads(Path(path).read_text())
    doc.pop("timeline", None)
    return doc


def _serve_sweep(url: str, concurrency: list[int], requests: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "serve.json")
        _run([sys.executable, "-m", "xllm.cli", "bench", "serve", "--url", url, "--concurrency",
              ",".join(map(str, concurrency)), "--num-requests", str(requests), "--prompt-len", "200",
              "--output-len", "128", "--ignore-eos", "--json", path, "--no-progress"])
        return json.loads(Path(path).read_text())["results"]


def ratios(doc: dict) -> dict:
    """xllm over llama.cpp for each row both sides have (above 1: xllm is faster)."""
    llama, ours = doc["llama_cpp"], doc["xllm"]
    out = {}
    if llama.get("tg128") and ours.get("decode_c1_tok_s"):
        out["single_stream_decode"] = ours["decode_c1_tok_s"] / llama["tg128"]
    if llama.get("pp512") and ours.get("prefill_tok_s"):
        out["prefill"] = ours["prefill_tok_s"] / llama["pp512"]
    for method, tok_s in ours.get("spec_decode_c1_tok_s", {}).items():
        if llama.get("tg128"):
            out[f"single_stream_decode_{method}"] = tok_s / llama["tg128"]
    for level, tok_s in ours.get("served_output_tok_s", {}).items():
        theirs = llama.get("served_output_tok_s", {}).get(level)
        if theirs:
            out[f"served_c{level}_output"] = tok_s / theirs
    return out


def run(args: argparse.Namespace) -> int:
    from common.default_model import default_model_path

    if not args.llama_bin_dir or not (Path(args.llama_bin_dir) / "llama-bench").exists():
        raise SystemExit("no llama-bench: build it with ../shared/peers/build_llama_server.sh and pass "
                         "--llama-bin-dir (or set $XLLM_LLAMA_BIN_DIR / $PEERS)")
    bin_dir = Path(args.llama_bin_dir)
    model = args.model or str(default_model_path())
    extra = [part for flag in args.xllm_arg for part in flag.split()]
    llama: dict = {"runs": []}
    ours: dict = {"runs": []}
    for _ in range(args.reps):
        llama["runs"].append(_llama_bench(bin_dir, model, args.threads))
        ours["runs"].append(_xllm_offline(model, 1, extra))
    llama["tg128"] = statistics.mean(r["tg128"] for r in llama["runs"])
    llama["pp512"] = statistics.mean(r["pp512"] for r in llama["runs"])
    ours["decode_c1_tok_s"] = statistics.mean(1.0 / r["mean_tpot_s"] for r in ours["runs"])
    ours["output_c1_tok_s"] = statistics.mean(r["output_tokens_per_s"] for r in ours["runs"])
    ours["prefill_tok_s"] = statistics.mean(r["prompt_len"] / r["mean_ttft_s"] for r in ours["runs"])
    spec: dict[str, float] = {}
    for method in args.spec_method:
        run_doc = _xllm_offline(model, 1, extra + ["--speculative-method", method, "--workload", "repetitive"])
        ours.setdefault("spec_runs", {})[method] = run_doc
        spec[method] = 1.0 / run_doc["mean_tpot_s"]
    if spec:
        ours["spec_decode_c1_tok_s"] = spec
    if args.serve_concurrency:
        url = f"http://127.0.0.1:{args.port}"
        slots = max(args.serve_concurrency)
        llama_argv = [str(bin_dir / "llama-server"), "-m", model, "--host", "127.0.0.1", "--port", str(args.port),
                      "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots), "-c", str(384 * slots)]
        with running_server(llama_argv, url, args, "llama-server"):
            llama["served"] = _serve_sweep(url, args.serve_concurrency, args.serve_requests)
        xllm_argv = [sys.executable, "-m", "xllm.cli", "serve", "--model", model, "--port", str(args.port), *extra]
        with running_server(xllm_argv, url, args, "xllm serve"):
            ours["served"] = _serve_sweep(url, args.serve_concurrency, args.serve_requests)
        for side in (llama, ours):
            side["served_output_tok_s"] = {str(e["concurrency"]): e["output_throughput"] for e in side["served"]}
    doc = {
        "benchmark": "vs_llamacpp", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model,
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "flags": cpu_flags()},
        "llama_cpp": llama, "xllm": ours,
    }
    doc["ratios"] = ratios(doc)
    for name, value in doc["ratios"].items():
        print(f"{name:40s} {value:6.2f}x")
    write_json(args.json_path, doc)
    return 0
