"""What resuming a preempted sequence costs here: recompute its KV, or offload it and load it back.

`python -m bench.preempt_cost [--tokens 256] [--json PATH]`

- recompute: prefill of `--tokens` fresh tokens (no prefix hit), as a preempted sequence whose
  pages were evicted is rebuilt;
- offload: the sequence's KV pages copied out of the pool into host bytes, sent to another process
  and back over ipc:// (what a kvstore DRAM tier put + get costs at least: the real one adds
  msgpack headers and an LRU), and copied back into pool pages.

Both are timed on the engine's default dtype and thread count; the report gives ms per resume and
which is cheaper. (A sequence preempted while its pages are still in the prefix cache resumes
from them at no cost either way: preemption frees its pages but keeps full ones hashed.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import statistics
import time

import torch
import zmq

from common.engine import LLM, SamplingParams


def _echo(addr: str) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.bind(addr)
    while True:
        frames = sock.recv_multipart(copy=False)
        if len(frames) == 1 and frames[0].bytes == b"stop":
            break
        sock.send_multipart(frames, copy=False)


def _recompute_ms(llm: LLM, tokens: int, rng: random.Random) -> float:
    engine = llm.engine
    ids = [rng.randrange(100, 10_000) for _ in range(tokens)]
    t0 = time.perf_counter()
    engine.add_request(f"r{rng.random()}", ids, SamplingParams(temperature=0.0, max_tokens=1))
    while engine.has_unfinished():
        engine.step()
    return (time.perf_counter() - t0) * 1000


def _offload_ms(llm: LLM, tokens: int, sock: zmq.Socket) -> tuple[float, int]:
    engine = llm.engine
    pages = list(range(-(-tokens // engine.page_size)))
    index = torch.tensor(pages)
    t0 = time.perf_counter()
    out = [cache.index_select(2, index).contiguous() for cache in engine.kv_caches]  # pool -> host copy
    sock.send_multipart([t.numpy().view("uint8") if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy()
                         for t in out], copy=False)
    back = sock.recv_multipart(copy=False)
    for cache, frame, ref in zip(engine.kv_caches, back, out):
        restored = torch.frombuffer(frame.buffer, dtype=ref.dtype).view(ref.shape)
        cache.index_copy_(2, index, restored)
    return (time.perf_counter() - t0) * 1000, sum(t.numel() * t.element_size() for t in out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    llm = LLM(kv_cache_memory="256MiB")
    rng = random.Random(0)
    _recompute_ms(llm, 32, rng)  # warm-up
    recompute = [_recompute_ms(llm, args.tokens, rng) for _ in range(args.repeats)]
    addr = f"ipc:///tmp/xllm-preempt-{time.time_ns()}.sock"
    proc = multiprocessing.get_context("spawn").Process(target=_echo, args=(addr,), daemon=True)
    proc.start()
    sock = zmq.Context.instance().socket(zmq.PAIR)
    sock.connect(addr)
    _offload_ms(llm, args.tokens, sock)  # warm-up
    offload = [_offload_ms(llm, args.tokens, sock) for _ in range(args.repeats)]
    sock.send(b"stop")
    proc.join(5)
    result = {"tokens": args.tokens, "dtype": str(llm.engine.kv_caches[0].dtype),
              "recompute_ms": statistics.median(recompute),
              "offload_roundtrip_ms": statistics.median(ms for ms, _ in offload),
              "kv_bytes": offload[0][1], "recompute_all_ms": recompute, "offload_all_ms": [ms for ms, _ in offload]}
    result["cheaper"] = "offload" if result["offload_roundtrip_ms"] < result["recompute_ms"] else "recompute"
    print(f"{args.tokens} tokens ({result['kv_bytes'] / 1e6:.1f} MB of KV): recompute {result['recompute_ms']:.1f} ms, "
          f"offload + load back {result['offload_roundtrip_ms']:.1f} ms -> {result['cheaper']} is cheaper")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
