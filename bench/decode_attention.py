"""`xllm bench decode-attention`: the C++ paged decode attention kernel alone, per KV dtype.

For each case (batch size, context length) and each KV cache dtype (bf16, int8 with inline
scales, fp32), times one kernel call over a page pool laid out as the engine lays it out
(shuffled pages, page size 16, the default model's 9 query / 3 KV heads of 64 dims), once with
the flash-decoding split chosen by the kernel (``max_splits=-1``) and once without it
(``max_splits=1``, the kernel as it was before the split). Reports the median time per call,
the KV bytes read per call and the resulting read bandwidth, and the split's speedup.

Each call reads the next of ``--layers`` page pools (30, one per layer of the default model), as an
engine step does: at batch 64 one layer's KV fits in L3, and timing the same pool over and over
measured the kernel on cached data (where int8 rows, which must be widened, looked no faster than
bf16), not on the DRAM reads that bound a real step.

The defaults are the cases of issue 13: batch 1 at contexts 512, 2048 and 8000, and batch 64 at
512. Timings on a shared machine are noisy: rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time

import torch

from bench.output import write_json
from kernels.cpu_ext import cpu_ops_module
from kernels.kv_quant import kv_row_width, quantize_kv_rows

__all__ = ["add_arguments", "run", "measure_case"]

_DTYPES = {"bf16": torch.bfloat16, "int8": torch.int8, "fp32": torch.float32}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default="1x512,1x2048,1x8000,64x512",
                   help="comma-separated BATCHxCONTEXT cases (1x512,1x2048,1x8000,64x512)")
    p.add_argument("--kv-dtypes", default="bf16,int8", help=f"comma-separated, of {sorted(_DTYPES)} (bf16,int8)")
    p.add_argument("--heads", type=int, default=9, help="query heads (9, SmolLM2-135M)")
    p.add_argument("--kv-heads", type=int, default=3, help="KV heads (3)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=30,
                   help="page pools read in turn, one per layer, so calls read DRAM as in an engine step (30)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per measurement (20)")
    p.add_argument("--json", dest="json_path", default=None, help="write results here")


def _parse_cases(text: str) -> list[tuple[int, int]]:
    cases = []
    for item in text.split(","):
        try:
            batch, context = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--cases: {item!r} is not BATCHxCONTEXT") from None
        if batch <= 0 or context <= 0:
            raise SystemExit(f"--cases: {item!r} needs a positive batch and context")
        cases.append((batch, context))
    return cases


def _time_call(fn, repeats: int) -> float:
    fn()  # warm-up: first touch of the pages, thread pool start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_case(ext, batch: int, context: int, dtype: torch.dtype, args: argparse.Namespace) -> dict:
    """Median seconds per call with and without the split, and the bytes each call reads."""
    gen = torch.Generator().manual_seed(batch * 100_003 + context)
    H, KVH, D, PS = args.heads, args.kv_heads, args.head_dim, args.page_size
    per_seq = -(-context // PS)
    num_pages = batch * per_seq
    values = torch.randn(2, KVH, num_pages, PS, D, generator=gen)
    first = quantize_kv_rows(values) if dtype == torch.int8 else values.to(dtype)
    del values
    # Copies of one random pool: the values do not matter to the timing, only where they sit.
    caches = [first] + [first.clone() for _ in range(max(1, args.layers) - 1)]
    pages = torch.randperm(num_pages, generator=gen).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.long)
    q_dtype = torch.float32 if dtype == torch.float32 else torch.bfloat16
    q = torch.randn(batch, H, D, generator=gen).to(q_dtype)

    def call(max_splits: int):
        turn = itertools.count()

        def one() -> torch.Tensor:
            cache = caches[next(turn) % len(caches)]
            return ext.paged_decode_attention(q, cache[0], cache[1], pages, lens, D ** -0.5, -1, 0.0,
                                              max_splits=max_splits)
        return one

    split_s = _time_call(call(-1), args.repeats)
    unsplit_s = _time_call(call(1), args.repeats)
    kv_bytes = 2 * batch * KVH * context * kv_row_width(D, dtype) * first.element_size()
    return {
        "batch": batch, "context": context, "kv_dtype": str(dtype).removeprefix("torch."),
        "kv_bytes_per_call": kv_bytes,
        "split_ms": split_s * 1e3, "unsplit_ms": unsplit_s * 1e3,
        "split_speedup": unsplit_s / split_s,
        "split_read_gbps": kv_bytes / split_s / 1e9, "unsplit_read_gbps": kv_bytes / unsplit_s / 1e9,
    }


def run(args: argparse.Namespace) -> int:
    ext = cpu_ops_module()
    if ext is None:
        print("the C++ CPU kernels could not be built here; nothing to time", file=sys.stderr)
        return 1
    unknown = [d for d in args.kv_dtypes.split(",") if d not in _DTYPES]
    if unknown:
        raise SystemExit(f"--kv-dtypes: unknown {unknown}; choose from {sorted(_DTYPES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for batch, context in _parse_cases(args.cases):
        for name in args.kv_dtypes.split(","):
            r = measure_case(ext, batch, context, _DTYPES[name], args)
            results.append(r)
            print(f"batch {batch:3d} context {context:5d} {name:5s}  split {r['split_ms']:8.3f} ms  "
                  f"unsplit {r['unsplit_ms']:8.3f} ms  x{r['split_speedup']:.2f}  "
                  f"({r['split_read_gbps']:.1f} GB/s of KV)")
    write_json(args.json_path, {"threads": torch.get_num_threads(), "heads": args.heads, "kv_heads": args.kv_heads,
                                "head_dim": args.head_dim, "page_size": args.page_size, "repeats": args.repeats,
                                "layers": args.layers,
                                "results": results})
    return 0
