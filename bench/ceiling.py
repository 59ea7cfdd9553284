"""`xllm bench ceiling`: how fast the offline benchmark could go on this machine, from measurements.

Issue 13 sets the offline benchmark at 64 streams (prompt 200, output 128) a goal of 75% of a
hardware ceiling: the run's GEMM work at the measured int8 GEMM peak, plus the KV bytes that decode
attention must read at the measured DRAM read bandwidth. This command measures both here (and the
bf16 GEMM peak), takes the shapes from the model's own config, and prints two ceilings:

* ``int8``: every GEMM at the int8 peak (the issue's definition);
* ``as built``: prompt GEMMs at the bf16 peak but for the projections the engine keeps on W8A8 there
  (``--prompt-w8a8-layers``, or all with ``--w8a8-prompts``), those and decode GEMMs at the int8 peak.

``--run-offline`` also runs `xllm bench offline` on the same workload and reports the fraction of
each ceiling reached. Model, torch threads and KV dtype are the engine's own flags (``--model``,
``--threads``, ``--kv-cache-dtype``), so the ceiling and the run agree. The ceiling is optimistic on
purpose: every GEMM at the best rate seen on any of the model's shapes (its weight warm in cache, as
the timing loop leaves it; int8 by the faster of oneDNN's GEMM and the engine's packed one);
attention's arithmetic, norms, rotary, sampling, scheduling cost nothing.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.machine import cpu_flags
from bench.output import write_json
from common.default_model import default_model_path
from common.engine.config import EngineConfig
from common.models.config import ModelConfig
from kernels.kv_quant import kv_row_width

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run", "Arch", "Workload", "read_arch", "kv_row_bytes", "workload", "ceilings",
           "int8_gemm_peak", "bf16_gemm_peak", "read_bandwidth"]

# One timed sample loops its call for at least this long: a small GEMM takes tens of microseconds,
# near the Python overhead around the timer. Short samples, many of them: on a shared machine a
# 2-thread call waits out another process's time slice (~4 ms) now and then, and the best sample
# is the one that did not.
_MIN_SAMPLE_S = 0.002


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--concurrency", type=int, default=64, help="streams, all prompts submitted at once (64)")
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--gemm-rows", default="64,256,512", help="comma-separated M of the timed GEMMs (64,256,512)")
    p.add_argument("--bandwidth-mib", type=int, default=512,
                   help="MiB read per bandwidth sample; keep it far above the L3 cache (512)")
    p.add_argument("--repeats", type=int, default=20, help="timed samples per measurement; the best counts (20)")
    p.add_argument("--run-offline", action="store_true",
                   help="also run `bench offline` on this workload and report the fraction of each ceiling")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


@dataclass(frozen=True)
class Arch:
    """The numbers of a dense decoder that its GEMM work and KV reads depend on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_model_config(cls, mc: ModelConfig) -> Arch:
        if mc.is_moe:
            raise SystemExit(f"bench ceiling models dense decoders; {mc.architecture} is a mixture of experts")
        return cls(mc.hidden_size, mc.num_hidden_layers, mc.num_attention_heads, mc.num_key_value_heads,
                   mc.head_dim, mc.intermediate_size, mc.vocab_size)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(K, N) of each GEMM, fused as the engine fuses them (q/k/v one GEMM, gate/up one GEMM)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return {"qkv": (h, q + 2 * kv), "o": (q, h), "gate_up": (h, 2 * i), "down": (i, h), "lm_head": (h, self.vocab)}

    def layer_ops_per_token(self, names: Collection[str] | None = None) -> int:
        """Multiply-adds x 2 of one token through every decoder layer's linears (biases ignored),
        or through those of ``names`` (keys of :meth:`linear_shapes`)."""
        return 2 * self.layers * sum(k * n for name, (k, n) in self.linear_shapes().items()
                                     if name != "lm_head" and (names is None or name in names))

    def lm_head_ops(self) -> int:
        return 2 * self.hidden * self.vocab


def read_arch(model: str) -> Arch:
    """The architecture from a GGUF's metadata or an HF directory's config.json, read the way the
    engine reads it (no weights loaded)."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        import gguf

        from common.weights.gguf_loader import gguf_config_dict

        config = gguf_config_dict(gguf.GGUFReader(str(path)))
    else:
        from common.weights.safetensors_loader import read_hf_config

        config = read_hf_config(path)
    return Arch.from_model_config(ModelConfig.from_hf_dict(config))


# EngineConfig's projection names -> linear_shapes() keys.
_SHAPE_OF_PROJECTION = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}


def prompt_int8_shapes(config: EngineConfig) -> frozenset[str]:
    """The GEMMs (keys of :meth:`Arch.linear_shapes`) the engine runs W8A8 on prompt tokens (on a
    model that has W8A8 GEMMs: a quantized GGUF in bf16)."""
    names = _SHAPE_OF_PROJECTION if config.w8a8_prompts else config.prompt_w8a8_set()
    return frozenset(_SHAPE_OF_PROJECTION[n] for n in names)


def kv_row_bytes(head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one stored K or V row: int8 rows are head_dim bytes plus a 4-byte fp32 scale."""
    return kv_row_width(head_dim, dtype) * dtype.itemsize


@dataclass(frozen=True)
class Workload:
    output_tokens: int
    prompt_gemm_ops: int  # prefill: every prompt token through the layers, the LM head on its last one
    decode_gemm_ops: int  # output_len - 1 decode steps per stream, one token through layers and LM head
    kv_bytes: int  # K and V rows that those decode steps' attention reads
    prompt_int8_ops: int = 0  # the part of prompt_gemm_ops the engine runs on the int8 GEMMs


def workload(arch: Arch, concurrency: int, prompt_len: int, output_len: int, row_bytes: int,
             prompt_int8: Collection[str] = ()) -> Workload:
    """GEMM ops and KV bytes of `concurrency` requests of `prompt_len` -> `output_len` tokens.

    Conventions: output token 1 is sampled from the prefill's LM head on the last prompt token;
    decode step s (s = 0 .. output_len - 2) feeds output token s + 1 and samples token s + 2, so
    the last output token is never fed back: (prompt_len + output_len - 1) tokens per request go
    through the layers and output_len through the LM head. Step s writes its own K/V row, then
    attends over prompt_len + s + 1 rows in every layer and KV head, K and V each. Prefill's
    attention reads are left out: its rows are fresh in cache and its GEMMs dominate.
    ``prompt_int8`` names the projections (keys of :meth:`Arch.linear_shapes`) prompts run in int8.
    """
    steps = output_len - 1
    layer, head = arch.layer_ops_per_token(), arch.lm_head_ops()
    rows = steps * prompt_len + steps * (steps + 1) // 2  # sum over s of (prompt_len + s + 1)
    kv_bytes = concurrency * rows * arch.layers * arch.kv_heads * 2 * row_bytes  # 2: K and V
    return Workload(concurrency * output_len, concurrency * (prompt_len * layer + head),
                    concurrency * steps * (layer + head), kv_bytes,
                    concurrency * prompt_len * arch.layer_ops_per_token(prompt_int8))


def ceilings(work: Workload, int8_ops_s: float, bf16_ops_s: float, read_bytes_s: float) -> dict[str, dict]:
    """Seconds and output tok/s of the two ceilings: ``int8`` (every GEMM at the int8 peak) and
    ``as_built`` (prompt GEMMs at the bf16 peak but their int8 part, that and decode GEMMs at the int8 peak)."""
    kv_s = work.kv_bytes / read_bytes_s

    def line(gemm_s: float) -> dict:
        total = gemm_s + kv_s
        return {"gemm_s": gemm_s, "kv_s": kv_s, "total_s": total, "tok_s": work.output_tokens / total}

    return {"int8": line((work.prompt_gemm_ops + work.decode_gemm_ops) / int8_ops_s),
            "as_built": line((work.prompt_gemm_ops - work.prompt_int8_ops) / bf16_ops_s
                             + (work.prompt_int8_ops + work.decode_gemm_ops) / int8_ops_s)}


def _best_seconds(call: Callable[[], object], repeats: int) -> float:
    """Best seconds per call over `repeats` samples. The best, not the median: a ceiling wants what
    the hardware can do, and a shared machine's noise only ever slows a sample down."""
    call()  # warm-up: oneDNN primitive creation, first touch of the pages
    start = time.perf_counter()
    call()
    loops = max(1, int(_MIN_SAMPLE_S / max(time.perf_counter() - start, 1e-9)))
    best = float("inf")
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        for _ in range(loops):
            call()
        best = min(best, (time.perf_counter() - start) / loops)
    return best


def _gemm_rates(shapes: dict[str, tuple[int, int]], rows: list[int], repeats: int,
                make_call: Callable[[int, int, int], Callable[[], object]]) -> dict:
    results = []
    for name, (k, n) in shapes.items():
        for m in rows:
            seconds = _best_seconds(make_call(m, k, n), repeats)
            results.append({"shape": name, "m": m, "k": k, "n": n, "gops": 2 * m * k * n / seconds / 1e9})
            logger.debug("%s M=%d K=%d N=%d: %.1f GOPS", name, m, k, n, results[-1]["gops"])
    best = max(results, key=lambda r: r["gops"])
    return {"results": results, "peak_gops": best["gops"], "peak_at": f"{best['shape']} M={best['m']}"}


def int8_gemm_peak(shapes: dict[str, tuple[int, int]], rows: list[int], repeats: int) -> dict:
    """The engine's W8A8 GEMMs (int8 [M, K] x int8 weight [N, K] -> int32) on each (K, N) at each M:
    ``torch._int_mm`` (oneDNN, the weight an [N, K] tensor seen as [K, N]) and, where it is built,
    the packed kernel ``int8_gemm`` (``kernels/csrc/int8_gemm.cpp``). Each case keeps the faster
    (``kernel``, with both rates); the peak is the best case of either."""
    from kernels.cpu_ext import cpu_ops_module
    from kernels.int8_pack import GROUP, pack_int8_gemm

    ext = cpu_ops_module()
    packed = ext is not None and ext.int8_gemm_supported()

    def operands(m: int, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
        return (torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=gen),
                torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen))

    def make_int_mm(m: int, k: int, n: int) -> Callable[[], object]:
        a, w = operands(m, k, n)
        b = w.t()
        return lambda: torch._int_mm(a, b)

    def make_packed(m: int, k: int, n: int) -> Callable[[], object]:
        a, w = operands(m, k, n)
        b = pack_int8_gemm(w)
        return lambda: ext.int8_gemm(a, b, n)

    rates = _gemm_rates(shapes, rows, repeats, make_int_mm)
    for r in rates["results"]:
        r["kernel"], r["int_mm_gops"] = "_int_mm", r["gops"]
    packable = {name: (k, n) for name, (k, n) in shapes.items() if k % GROUP == 0}
    if packed and packable:
        by_case = {(r["shape"], r["m"]): r for r in rates["results"]}
        for p in _gemm_rates(packable, rows, repeats, make_packed)["results"]:
            r = by_case[p["shape"], p["m"]]
            r["packed_gops"] = p["gops"]
            if p["gops"] > r["gops"]:
                r["kernel"], r["gops"] = "int8_gemm", p["gops"]
        best = max(rates["results"], key=lambda r: r["gops"])
        rates.update(peak_gops=best["gops"], peak_at=f"{best['shape']} M={best['m']} ({best['kernel']})")
    return rates


def bf16_gemm_peak(shapes: dict[str, tuple[int, int]], rows: list[int], repeats: int) -> dict:
    """``F.linear`` in bf16 (the prompt path) on each (K, N) at each M: GOPS per case and the peak."""
    def make(m: int, k: int, n: int) -> Callable[[], object]:
        gen = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        return lambda: F.linear(x, w)

    return _gemm_rates(shapes, rows, repeats, make)


def read_bandwidth(mib: int, repeats: int) -> dict:
    """DRAM bandwidth from one buffer of `mib` MiB, allocated and written before any timing: sums of
    it as int64 and as float32 (one pass over the bytes with next to no arithmetic; the better is
    the read bandwidth), and a copy of its first half into its second (bytes read + written)."""
    nbytes = max(1, mib) * 2**20
    buf = torch.empty(nbytes, dtype=torch.uint8)
    buf.view(torch.float32).fill_(1.0)  # touches every page; 1.0 rather than bytes that read as denormals
    as_i64, as_f32 = buf.view(torch.int64), buf.view(torch.float32)
    src, dst = buf[: nbytes // 2], buf[nbytes // 2:]
    i64 = nbytes / _best_seconds(lambda: as_i64.sum(), repeats) / 1e9
    f32 = nbytes / _best_seconds(lambda: as_f32.sum(), repeats) / 1e9
    copy = nbytes / _best_seconds(lambda: dst.copy_(src), repeats) / 1e9
    return {"buffer_mib": mib, "int64_sum_gbps": i64, "float32_sum_gbps": f32, "copy_gbps": copy,
            "read_gbps": max(i64, f32)}


def _parse_rows(text: str) -> list[int]:
    try:
        rows = [int(x) for x in text.split(",")]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise SystemExit(f"--gemm-rows: {text!r} is not a comma-separated list of positive row counts")
    return rows


def _run_offline(args: argparse.Namespace, config: EngineConfig) -> dict:
    """`bench offline` with every stream submitted at once: concurrency = number of requests."""
    from bench import offline

    p = argparse.ArgumentParser()
    offline.add_arguments(p)
    off_args = p.parse_args(["--concurrency", str(args.concurrency), "--num-requests", str(args.concurrency),
                             "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
                             "--no-progress"])
    return offline.run(off_args, config)


def _print_table(r: dict) -> None:
    a, w = r["arch"], r["workload"]
    print(f"bench ceiling: {Path(r['model']).name} ({a['layers']} layers, hidden {a['hidden']}, {a['heads']}/"
          f"{a['kv_heads']} heads of {a['head_dim']}, intermediate {a['intermediate']}, vocab {a['vocab']}); "
          f"C={w['concurrency']} P={w['prompt_len']} O={w['output_len']}, KV {w['kv_cache_dtype']} "
          f"({w['kv_row_bytes']} B/row); {r['torch_threads']} torch threads, load average {r['loadavg_1min']:.1f}")
    rows = r["gemm_rows"]
    print(f"{'GEMM GOPS':18s}" + "".join(f"{'M=' + str(m):>9s}" for m in rows))
    for kind in ("int8", "bf16"):
        gops = {(x["shape"], x["m"]): x["gops"] for x in r[f"{kind}_gemm"]["results"]}
        for shape in dict.fromkeys(x["shape"] for x in r[f"{kind}_gemm"]["results"]):
            print(f"  {kind} {shape:12s}" + "".join(f"{gops[shape, m]:9.1f}" for m in rows))
    i8, b16, bw = r["int8_gemm"], r["bf16_gemm"], r["bandwidth"]
    print(f"peaks: int8 {i8['peak_gops']:.1f} GOPS ({i8['peak_at']}), "
          f"bf16 {b16['peak_gops']:.1f} GOPS ({b16['peak_at']})")
    print(f"DRAM ({bw['buffer_mib']} MiB): int64 sum {bw['int64_sum_gbps']:.1f} GB/s, float32 sum "
          f"{bw['float32_sum_gbps']:.1f} GB/s, copy {bw['copy_gbps']:.1f} GB/s (read + write); read = "
          f"{bw['read_gbps']:.1f} GB/s")
    print(f"work: prompt GEMMs {w['prompt_gemm_ops'] / 1e9:.1f} GOP ({w['prompt_int8_ops'] / 1e9:.1f} of them int8: "
          f"{', '.join(w['prompt_int8_gemms']) or 'none'}), decode GEMMs {w['decode_gemm_ops'] / 1e9:.1f} GOP, "
          f"decode KV reads {w['kv_bytes'] / 1e9:.2f} GB")
    for key, label in (("int8", "ceiling, every GEMM int8"),
                       ("as_built", "ceiling as built (prompt mostly bf16)")):
        c = r["ceilings"][key]
        print(f"{label:44s} {c['tok_s']:8.1f} output tok/s  (GEMMs {c['gemm_s']:.2f} s + KV {c['kv_s']:.2f} s)")
    if "offline" in r:
        o = r["offline"]
        print(f"offline achieved {o['output_tokens_per_s']:.1f} output tok/s: {o['fraction_of_int8']:.0%} of "
              f"the int8 ceiling, {o['fraction_of_as_built']:.0%} of the as-built one")


def run(args: argparse.Namespace, config: EngineConfig | None = None) -> dict:
    """Measure, compute both ceilings, print the table and write the JSON (see the module docstring)."""
    config = config or EngineConfig()
    if min(args.concurrency, args.prompt_len, args.output_len, args.repeats) < 1:
        raise SystemExit("--concurrency, --prompt-len, --output-len and --repeats must be positive")
    rows = _parse_rows(args.gemm_rows)
    load_before = os.getloadavg()[0]  # kept with the results: a busy machine lowers every peak
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    model = config.model or default_model_path()
    arch = read_arch(model)
    kv_dtype = config.resolved_kv_dtype()
    row_bytes = kv_row_bytes(arch.head_dim, kv_dtype)
    work = workload(arch, args.concurrency, args.prompt_len, args.output_len, row_bytes, prompt_int8_shapes(config))
    shapes = arch.linear_shapes()
    logger.info("timing int8 and bf16 GEMMs on %s x M in %s, then %d MiB reads", list(shapes), rows, args.bandwidth_mib)
    int8 = int8_gemm_peak(shapes, rows, args.repeats)
    bf16 = bf16_gemm_peak(shapes, rows, args.repeats)
    bandwidth = read_bandwidth(args.bandwidth_mib, args.repeats)
    result = {
        "model": model, "arch": asdict(arch), "gemm_rows": rows, "repeats": args.repeats,
        "workload": {"concurrency": args.concurrency, "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "kv_cache_dtype": str(kv_dtype).removeprefix("torch."), "kv_row_bytes": row_bytes, **asdict(work),
                     "prompt_int8_gemms": sorted(prompt_int8_shapes(config))},
        "int8_gemm": int8, "bf16_gemm": bf16, "bandwidth": bandwidth,
        "ceilings": ceilings(work, int8["peak_gops"] * 1e9, bf16["peak_gops"] * 1e9, bandwidth["read_gbps"] * 1e9),
        "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "cpu_flags": cpu_flags(), "loadavg_1min": load_before,
    }
    if args.run_offline:
        achieved = _run_offline(args, config)["output_tokens_per_s"]
        result["offline"] = {"output_tokens_per_s": achieved,
                             "fraction_of_int8": achieved / result["ceilings"]["int8"]["tok_s"],
                             "fraction_of_as_built": achieved / result["ceilings"]["as_built"]["tok_s"]}
        if result["offline"]["fraction_of_int8"] > 1:
            logger.warning("the engine beat the ceiling: the peaks were measured while something else ran "
                           "(load average %.1f before); rerun on a quiet machine", result["loadavg_1min"])
    _print_table(result)
    write_json(args.json_path, result)
    return result
