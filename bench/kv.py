"""`xllm bench kv`: tiered KV storage on vs off under a prefix-reuse workload.

The bench starts `xllm serve` itself, once per mode, with a small `--kv-cache-memory` so the
workers' page pools cannot hold every prefix the workload reuses:

* tiers-on:  `xllm serve --kvstore-dir <tmp> --kvstore-dram D --kvstore-ssd S` (evicted pages go
  to the kvstore's DRAM tier, then its LMDB SSD tier; prefix hits are reloaded from there);
* tiers-off: the same without a kvstore (an evicted prefix is recomputed).

Workload (seeded, token-id prompts, the same for both modes), sent in rounds:

* multi-turn chats: each chat opens with its own context, and each turn resends the whole
  conversation so far plus a new user message (the assistant's earlier replies are stand-in
  tokens, so the prompts do not depend on what the model generated);
* shared system prompts: many requests that start with one of a few long system prompts and end
  with their own question.

Round r holds turn r of every chat and a slice of the shared-prompt requests, shuffled; rounds run
one after the other (a chat's next turn only after its previous one), with at most
`--concurrency` requests in flight. Between two turns of a chat every other chat and several
system prompts go by, more distinct prefix pages than the workers' pools hold.

Reported per mode: TTFT p50 / p90 / mean (streamed; time to the first token), prefix hit rate
per tier (prompt tokens the workers served from cache, by tier, from `prefix_hit_tokens` deltas in
`GET /status`, divided by the prompt tokens sent), requests/s and prompt + output tokens/s over
the measured wall time. `--json` writes everything; a table is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

import aiohttp

from bench.client import BenchError, RequestResult, base_url, discover_model, stream_request
from bench.server_proc import add_server_arguments, fmt, running_server
from bench.stats import distinct_errors, percentile_ms
from bench.output import write_json
from common.progress import add_progress_argument, progress_bar, progress_enabled

logger = logging.getLogger(__name__)

__all__ = ["KvRequest", "Workload", "make_workload", "distinct_prefix_pages", "hit_deltas", "summarize_mode",
           "add_arguments", "run", "run_workload", "print_table", "MODES"]

MODES = ("tiers-on", "tiers-off")
TIERS = ("hbm", "dram", "ssd")


@dataclass
class KvRequest:
    kind: str  # "chat" or "shared"
    group: int  # chat index, or system prompt index
    turn: int  # chat turn, or the index of the request among those of its system prompt
    prompt_ids: list[int]


@dataclass
class Workload:
    rounds: list[list[KvRequest]]
    params: dict = field(default_factory=dict)

    @property
    def requests(self) -> list[KvRequest]:
        return [r for rnd in self.rounds for r in rnd]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)


def _tokens(rng: random.Random, n: int, vocab_size: int) -> list[int]:
    return [rng.randrange(100, max(101, vocab_size)) for _ in range(n)]


def make_workload(
    *,
    seed: int = 0,
    chats: int = 4,
    turns: int = 3,
    chat_context_len: int = 64,
    user_len: int = 32,
    reply_len: int = 16,
    system_prompts: int = 3,
    system_prompt_len: int = 160,
    shared_requests: int = 12,
    question_len: int = 16,
    vocab_size: int = 10_000,
) -> Workload:
    """Seeded rounds of chat turns and shared-system-prompt requests (see the module doc)."""
    if min(chats, turns, system_prompts) < 0 or (chats and turns < 1):
        raise ValueError("counts must be >= 0 (and turns >= 1 when there are chats)")
    rng = random.Random(seed)
    conversations = [_tokens(rng, chat_context_len, vocab_size) for _ in range(chats)]
    systems = [_tokens(rng, system_prompt_len, vocab_size) for _ in range(system_prompts)]
    n_rounds = max(turns if chats else 0, 1 if shared_requests and system_prompts else 0)
    rounds: list[list[KvRequest]] = [[] for _ in range(n_rounds)]
    for turn in range(turns if chats else 0):
        for c in range(chats):
            if turn:
                conversations[c] = conversations[c] + _tokens(rng, reply_len, vocab_size)  # the last reply
            conversations[c] = conversations[c] + _tokens(rng, user_len, vocab_size)
            rounds[turn].append(KvRequest("chat", c, turn, list(conversations[c])))
    if system_prompts and shared_requests:
        per_prompt = [0] * system_prompts
        for i in range(shared_requests):
            s = i % system_prompts
            request = KvRequest("shared", s, per_prompt[s], systems[s] + _tokens(rng, question_len, vocab_size))
            per_prompt[s] += 1
            rounds[i * n_rounds // shared_requests].append(request)  # spread evenly over the rounds
    for rnd in rounds:
        rng.shuffle(rnd)
    params = dict(seed=seed, chats=chats, turns=turns, chat_context_len=chat_context_len, user_len=user_len,
                  reply_len=reply_len, system_prompts=system_prompts, system_prompt_len=system_prompt_len,
                  shared_requests=shared_requests, question_len=question_len, vocab_size=vocab_size)
    return Workload(rounds, params)


def distinct_prefix_pages(workload: Workload, page_size: int) -> int:
    """Full pages of distinct prefixes in the workload: what a cache must hold for every reuse to hit."""
    seen: set[tuple[int, ...]] = set()
    for r in workload.requests:
        for end in range(page_size, len(r.prompt_ids) + 1, page_size):
            seen.add(tuple(r.prompt_ids[:end]))
    return len(seen)


def hit_deltas(before: dict[str, dict], after: dict[str, dict]) -> dict[str, int]:
    """Prefix-hit tokens per tier gained between two `/status` worker-stat snapshots (summed over
    workers; a worker that restarted in between counts from zero)."""
    out = {tier: 0 for tier in TIERS}
    for iid, stats in after.items():
        now = stats.get("prefix_hit_tokens") or {}
        then = (before.get(iid) or {}).get("prefix_hit_tokens") or {}
        for tier in TIERS:
            gained = int(now.get(tier, 0)) - int(then.get(tier, 0))
            out[tier] += gained if gained >= 0 else int(now.get(tier, 0))
    return out


def _counter_delta(before: dict[str, dict], after: dict[str, dict], key: str) -> int:
    total = 0
    for iid, stats in after.items():
        now, then = int(stats.get(key, 0) or 0), int((before.get(iid) or {}).get(key, 0) or 0)
        total += now - then if now >= then else now
    return total


def summarize_mode(results: list[tuple[KvRequest, RequestResult]], hits: dict[str, int], wall_s: float,
                   extra: dict | None = None) -> dict:
    """TTFT stats (ms), hit rate per tier (hit tokens / prompt tokens sent), throughput."""
    ok = [(q, r) for q, r in results if r.ok]
    ttfts = sorted(r.ttft for _, r in ok)
    prompt_tokens = sum(len(q.prompt_ids) for q, _ in results)
    output_tokens = sum(r.output_tokens for _, r in ok)
    by_kind = {}
    for kind in sorted({q.kind for q, _ in results}):
        k = sorted(r.ttft for q, r in ok if q.kind == kind)
        by_kind[kind] = {"requests": sum(q.kind == kind for q, _ in results), "ttft_ms_p50": percentile_ms(k, 0.5),
                         "ttft_ms_mean": 1000 * sum(k) / len(k) if k else None}
    hit_total = sum(hits.get(t, 0) for t in TIERS)
    wall = max(wall_s, 1e-9)
    return {
        "requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "ttft_ms": {"p50": percentile_ms(ttfts, 0.5), "p90": percentile_ms(ttfts, 0.9),
                    "mean": 1000 * sum(ttfts) / len(ttfts) if ttfts else None},
        "by_kind": by_kind,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "hit_tokens": {t: hits.get(t, 0) for t in TIERS},
        "hit_rate": {**{t: hits.get(t, 0) / prompt_tokens if prompt_tokens else 0.0 for t in TIERS},
                     "total": hit_total / prompt_tokens if prompt_tokens else 0.0},
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall, "prompt_tok_per_s": prompt_tokens / wall,
        "output_tok_per_s": output_tokens / wall,
        "errors": distinct_errors(r for _, r in results),
        **(extra or {}),
    }


# ------------------------------------------------------------------------------ running it


def _get_json(url: str, timeout: float = 10.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def worker_stats(root: str) -> dict[str, dict]:
    doc = _get_json(root + "/status")
    return {str(i.get("id")): (i.get("stats") or {}) for i in doc.get("instances") or [] if isinstance(i, dict)}


def _settle(root: str, requests_total: int, timeout_s: float = 15.0) -> dict[str, dict]:
    """Worker stats once the heartbeats show `requests_total` requests and none in flight."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = worker_stats(root)
        done = sum(int(s.get("requests_total", 0)) for s in stats.values()) >= requests_total
        if done and all(int(s.get("requests", 0)) == 0 for s in stats.values()):
            return stats
        if time.monotonic() > deadline:
            logger.warning("worker stats did not settle in %.0f s; using the last ones", timeout_s)
            return stats
        time.sleep(0.25)


async def run_workload(url: str, workload: Workload, *, concurrency: int = 2, max_tokens: int = 8,
                       timeout: float = 120.0, model: str | None = None, progress: bool = False,
                       ) -> tuple[list[tuple[KvRequest, RequestResult]], float]:
    """Send the rounds in order, at most `concurrency` requests in flight; (results, wall seconds)."""
    base = base_url(url)
    endpoint = base + "/completions"
    results: list[tuple[KvRequest, RequestResult]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        model = model or await discover_model(session, base)
        gate = asyncio.Semaphore(max(1, concurrency))

        async def one(q: KvRequest) -> None:
            body = {"model": model, "prompt": q.prompt_ids, "max_tokens": max_tokens, "temperature": 0.0,
                    "ignore_eos": True, "min_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with gate:
                results.append((q, await stream_request(session, endpoint, body, chat=False, timeout=timeout)))
                bar.update(1)

        t0 = time.perf_counter()
        with progress_bar(len(workload.requests), "kv workload", "req", enabled=progress) as bar:
            for rnd in workload.rounds:
                await asyncio.gather(*(one(q) for q in rnd))
        wall = time.perf_counter() - t0
    return results, wall


def _warm_up(url: str, max_tokens: int) -> None:
    """One unmeasured request (loads kernels, fills allocator caches) with a prompt no one reuses."""
    body = json.dumps({"model": _get_json(url + "/v1/models")["data"][0]["id"], "prompt": [7] * 40,
                       "max_tokens": max_tokens, "temperature": 0.0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()


def serve_argv(args: argparse.Namespace, mode: str, port: int, kvstore_dir: str | None) -> list[str]:
    argv = [sys.executable, "-m", "xllm.cli", "serve", "--port", str(port), "--workers", str(args.workers),
            "--kv-cache-memory", args.kv_cache_memory, "--page-size", str(args.page_size)]
    if mode == "tiers-on":
        assert kvstore_dir is not None
        argv += ["--kvstore-dir", kvstore_dir, "--kvstore-dram", args.kvstore_dram, "--kvstore-ssd", args.kvstore_ssd]
    if args.model:
        argv += ["--model", args.model]
    for extra in args.serve_arg or []:
        argv += extra.split()
    return argv


def run_mode(args: argparse.Namespace, mode: str, workload: Workload) -> dict:
    url = f"http://127.0.0.1:{args.port}"
    tmp = tempfile.mkdtemp(prefix="xllm-bench-kv-") if mode == "tiers-on" else None
    argv = serve_argv(args, mode, args.port, tmp)
    try:
        with running_server(argv, url, args, mode):  # every worker is up once it yields
            _warm_up(url, args.max_tokens)
            before = _settle(url, 1)
            done_before = sum(int(s.get("requests_total", 0)) for s in before.values())
            print(f"[{mode}] ready; {len(workload.requests)} requests in {len(workload.rounds)} rounds, "
                  f"concurrency {args.concurrency}", flush=True)
            results, wall = asyncio.run(run_workload(url, workload, concurrency=args.concurrency,
                                                     max_tokens=args.max_tokens, timeout=args.timeout,
                                                     progress=progress_enabled(args)))
            after = _settle(url, done_before + len(results))
            pages = sorted({int(s.get("num_pages", 0)) for s in after.values()})
            extra = {
                "worker_pages": pages,
                "kv_offloaded_blocks": _counter_delta(before, after, "kv_offloaded_blocks"),
                "kv_reloaded_blocks": _counter_delta(before, after, "kv_reloaded_blocks"),
            }
            if mode == "tiers-on":
                store = _get_json(url + "/status").get("scheduler", {}).get("kvstore") or {}
                extra["kvstore"] = {k: store.get(k) for k in ("dram_blocks", "dram_bytes", "ssd_blocks", "ssd_bytes",
                                                              "corrupt_entries", "writebehind_dropped") if k in store}
            return summarize_mode(results, hit_deltas(before, after), wall, extra)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def print_table(runs: dict[str, dict]) -> None:
    print(f"{'mode':<10}{'req':>5}{'ok':>5}{'TTFT p50/p90/mean ms':>23}{'hit% hbm/dram/ssd (total)':>30}"
          f"{'req/s':>7}{'prompt tok/s':>14}{'out tok/s':>11}")
    for mode, s in runs.items():
        t, h = s["ttft_ms"], s["hit_rate"]
        hits = (f"{100 * h['hbm']:.1f}/{100 * h['dram']:.1f}/{100 * h['ssd']:.1f} "
                f"({100 * h['total']:.1f})")
        print(f"{mode:<10}{s['requests']:>5}{s['completed']:>5}"
              f"{fmt(t['p50']) + '/' + fmt(t['p90']) + '/' + fmt(t['mean']):>23}{hits:>30}"
              f"{s['requests_per_s']:>7.2f}{s['prompt_tok_per_s']:>14.1f}{s['output_tok_per_s']:>11.1f}")
        for err in s["errors"]:
            print(f"    error: {err}", file=sys.stderr)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model for xllm serve (default: SmolLM2-135M-Instruct)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, run in this order (tiers-on,tiers-off)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--kv-cache-memory", default="12MiB",
                   help="each worker's page pool: small, so it cannot hold every prefix (12MiB)")
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--kvstore-dram", default="12MiB",
                   help="kvstore DRAM tier in tiers-on mode: small, so some blocks reach the SSD tier (12MiB)")
    p.add_argument("--kvstore-ssd", default="1GiB", help="kvstore SSD tier in tiers-on mode (1GiB)")
    w = p.add_argument_group("workload")
    w.add_argument("--chats", type=int, default=4, help="multi-turn conversations (4)")
    w.add_argument("--turns", type=int, default=3, help="turns per conversation (3)")
    w.add_argument("--chat-context-len", type=int, default=64, help="tokens a conversation opens with (64)")
    w.add_argument("--user-len", type=int, default=32, help="tokens of each user message (32)")
    w.add_argument("--reply-len", type=int, default=16, help="stand-in tokens of each earlier reply (16)")
    w.add_argument("--system-prompts", type=int, default=3, help="distinct shared system prompts (3)")
    w.add_argument("--system-prompt-len", type=int, default=160, help="tokens of each system prompt (160)")
    w.add_argument("--shared-requests", type=int, default=12, help="requests over the system prompts (12)")
    w.add_argument("--question-len", type=int, default=16, help="tokens after the system prompt (16)")
    w.add_argument("--max-tokens", type=int, default=8, help="output tokens per request (8)")
    w.add_argument("--concurrency", type=int, default=2, help="requests in flight at most (2)")
    w.add_argument("--seed", type=int, default=0)
    add_server_arguments(p, port=8019)
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--plot", dest="png_path", default=None, metavar="PNG",
                   help="draw TTFT, prefix hit rate per tier and throughput per mode into this PNG")
    add_progress_argument(p)


def workload_from_args(args: argparse.Namespace) -> Workload:
    return make_workload(seed=args.seed, chats=args.chats, turns=args.turns, chat_context_len=args.chat_context_len,
                         user_len=args.user_len, reply_len=args.reply_len, system_prompts=args.system_prompts,
                         system_prompt_len=args.system_prompt_len, shared_requests=args.shared_requests,
                         question_len=args.question_len)


def run(args: argparse.Namespace) -> int:
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        print(f"xllm bench kv: --modes takes {' and/or '.join(MODES)}", file=sys.stderr)
        return 2
    try:
        workload = workload_from_args(args)
    except ValueError as exc:
        print(f"xllm bench kv: {exc}", file=sys.stderr)
        return 2
    if not workload.requests:
        print("xllm bench kv: the workload is empty", file=sys.stderr)
        return 2
    print(f"workload: {len(workload.requests)} requests, {workload.prompt_tokens} prompt tokens, "
          f"{distinct_prefix_pages(workload, args.page_size)} distinct prefix pages of {args.page_size} tokens",
          flush=True)
    runs: dict[str, dict] = {}
    try:
        for mode in modes:
            runs[mode] = run_mode(args, mode, workload)
    except (BenchError, RuntimeError, OSError) as exc:
        print(f"xllm bench kv: {exc}", file=sys.stderr)
        if not runs:
            return 1
    print_table(runs)
    doc = {
        "benchmark": "kv", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": args.model or "default",
        "workers": args.workers, "kv_cache_memory": args.kv_cache_memory, "page_size": args.page_size,
        "kvstore_dram": args.kvstore_dram, "kvstore_ssd": args.kvstore_ssd, "concurrency": args.concurrency,
        "max_tokens": args.max_tokens, "workload": {**workload.params, "requests": len(workload.requests),
                                                    "prompt_tokens": workload.prompt_tokens,
                                                    "distinct_prefix_pages":
                                                        distinct_prefix_pages(workload, args.page_size)},
        "cpu_count": os.cpu_count(), "runs": runs,
    }
    write_json(args.json_path, doc)
    if getattr(args, "png_path", None):
        from bench.plots import kv_plot  # matplotlib is only imported when a plot is asked for

        if kv_plot(args.png_path, doc):
            print(f"plot written to {args.png_path}")
    return 0 if runs and all(r["completed"] for r in runs.values()) else 1
