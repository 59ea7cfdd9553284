"""`xllm bench serve`: a streaming load generator for any OpenAI-compatible server.

For each concurrency level C of the sweep, `--num-requests` requests go out with at most C in
flight; every request streams (SSE) and is timed: TTFT (time to the first content chunk), TPOT
(mean time per output token after the first: (end-to-end - TTFT) / (output tokens - 1)), ITL
(gaps between content chunks) and end-to-end latency. Token counts come from the usage block of
the final chunk (`stream_options.include_usage`), so they are exact when the server sends it.
Prompts: on `completions`, random token-id lists of exactly `--prompt-len` ids; on `chat`, random
words (about one token each; the server's count is reported).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import sys
import time

import aiohttp
from tqdm import tqdm

from bench.client import BenchError, RequestResult, base_url, discover_model, stream_request
from bench.stats import distinct_errors, percentile
from bench.output import write_json, write_plot
from bench.spec_workload import WORKLOADS, repetitive_prompts
from common.progress import add_progress_argument, progress_bar

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "plot", "run", "run_async", "summarize"]

_WORDS = (
    "the of and to in is was for on with as by at from that this it be are or an have not but all "
    "time day year world life hand part child eye place work week case point number group problem fact "
    "water light house river city paper music market story garden table window winter summer morning"
).split()


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be integers >= 1, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server (with or without /v1)")
    p.add_argument("--model", default=None, help="model name to request (default: the first one of GET /v1/models)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions",
                   help="completions: token-id prompts of exact length; chat: text prompts")
    p.add_argument("--concurrency", type=_int_list, default=[1, 16, 64],
                   help="comma-separated sweep of max requests in flight (default 1,16,64)")
    p.add_argument("--num-requests", type=_positive_int, default=64, help="requests per concurrency level")
    p.add_argument("--prompt-len", type=_positive_int, default=200, help="prompt tokens per request")
    p.add_argument("--output-len", type=_positive_int, default=128, help="max_tokens per request")
    p.add_argument("--ignore-eos", action="store_true",
                   help="send ignore_eos and min_tokens=output-len so every request generates output-len tokens")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--vocab-size", type=int, default=10000,
                   help="random prompt token ids are drawn from [100, N)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workload", choices=WORKLOADS, default="random",
                   help="random prompts, or repetitive texts (code editing, summarising, about --prompt-len tokens) "
                        "whose answers copy them: where speculative decoding's drafts get accepted")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests before the sweep")
    p.add_argument("--api-key", default=None, help="bearer token (default: $OPENAI_API_KEY if set)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per request")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here (one entry per level)")
    p.add_argument("--plot", "--png", dest="png_path", default=None, metavar="PNG",
                   help="draw output tokens/s against TTFT and TPOT (p50, p99) over the sweep into this PNG")
    add_progress_argument(p)


def _make_bodies(args: argparse.Namespace, model: str, n: int, seed: int, output_len: int | None = None) -> list[dict]:
    rng = random.Random(seed)
    output_len = output_len or args.output_len
    bodies = []
    repetitive = getattr(args, "workload", "random") == "repetitive"
    texts = repetitive_prompts(n, 4 * args.prompt_len, seed) if repetitive else []
    for i in range(n):
        body: dict = {"model": model, "max_tokens": output_len, "temperature": args.temperature,
                      "stream": True, "stream_options": {"include_usage": True}}
        if texts:
            if args.endpoint == "completions":
                body["prompt"] = texts[i]
            else:
                body["messages"] = [{"role": "user", "content": texts[i]}]
        elif args.endpoint == "completions":
            body["prompt"] = [rng.randrange(100, max(101, args.vocab_size)) for _ in range(args.prompt_len)]
        else:
            text = " ".join(rng.choice(_WORDS) for _ in range(args.prompt_len))
            body["messages"] = [{"role": "user", "content": text}]
        if args.ignore_eos:
            body["ignore_eos"] = True
            body["min_tokens"] = output_len
        bodies.append(body)
    return bodies


_STATS_SETTLE_S = 1.5


async def spec_counters(session: aiohttp.ClientSession, url: str) -> dict[str, int] | None:
    """The workers' speculative decoding counters summed, from the gateway's /status (None: off or unknown)."""
    root = base_url(url)[: -len("/v1")]
    try:
        async with session.get(root + "/status", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            doc = await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
        return None
    totals = {"draft": 0, "accepted": 0, "steps": 0}
    found = False
    for inst in doc.get("instances") or []:
        stats = inst.get("stats") if isinstance(inst, dict) else None
        if isinstance(stats, dict) and "spec_draft_tokens_total" in stats:
            found = True
            totals["draft"] += int(stats.get("spec_draft_tokens_total", 0))
            totals["accepted"] += int(stats.get("spec_accepted_tokens_total", 0))
            totals["steps"] += int(stats.get("spec_steps_total", 0))
    return totals if found else None


def spec_delta(before: dict[str, int], after: dict[str, int] | None) -> dict:
    """Acceptance rate and mean tokens per verified step over one level."""
    after = after or before
    draft = after["draft"] - before["draft"]
    accepted = after["accepted"] - before["accepted"]
    steps = after["steps"] - before["steps"]
    return {"spec_draft_tokens": draft, "spec_accepted_tokens": accepted,
            "spec_acceptance_rate": accepted / draft if draft else 0.0,
            "spec_mean_accepted_length": (accepted + steps) / steps if steps else 1.0}


def _ms_stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    s = sorted(values)
    return {"mean": 1000 * sum(s) / len(s), "p50": 1000 * percentile(s, 0.5), "p99": 1000 * percentile(s, 0.99)}


def summarize(concurrency: int, results: list[RequestResult], duration: float) -> dict:
    """One sweep entry: throughput over the level's wall time, latency stats in milliseconds."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    duration = max(duration, 1e-9)
    return {
        "concurrency": concurrency,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": distinct_errors(results),
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": out_tokens / duration,
        "input_throughput": in_tokens / duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "mean_prompt_tokens": in_tokens / len(ok) if ok else None,
        "mean_output_tokens": out_tokens / len(ok) if ok else None,
        "ttft_ms": _ms_stats([r.ttft for r in ok]),
        "tpot_ms": _ms_stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _ms_stats([gap for r in ok for gap in r.itl]),
        "e2e_ms": _ms_stats([r.e2e for r in ok]),
    }


async def run_async(args: argparse.Namespace) -> dict:
    """Run the sweep; returns the results document (also written to --json / --png when given)."""
    base = base_url(args.url)
    chat = args.endpoint == "chat"
    url = base + ("/chat/completions" if chat else "/completions")
    api_key = args.api_key or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    # Idle connections are dropped after 1 s, before a server's own keep-alive timeout closes them
    # (llama-server's is 5 s): reusing one the server closed fails the request ("Can not write
    # request body") and would count against the server.
    connector = aiohttp.TCPConnector(limit=max(args.concurrency), keepalive_timeout=1.0)
    async with aiohttp.ClientSession(headers=headers, connector=connector) as session:
        model = args.model or await discover_model(session, base)
        for body in _make_bodies(args, model, args.warmup, args.seed + 10_000, min(4, args.output_len)):
            r = await stream_request(session, url, body, chat=chat, timeout=args.timeout)
            if not r.ok:
                logger.warning("warm-up request failed: %s", r.error)
        entries = []
        for level, concurrency in enumerate(args.concurrency):
            # Fresh random prompts per level, so one level's prefix-cache entries do not help the next.
            bodies = _make_bodies(args, model, args.num_requests, args.seed + level)
            results: list[RequestResult] = [RequestResult() for _ in bodies]
            pending = iter(enumerate(bodies))

            async def worker(bar: tqdm) -> None:
                for i, body in pending:
                    results[i] = await stream_request(session, url, body, chat=chat, timeout=args.timeout)
                    bar.update(1)

            spec_before = await spec_counters(session, args.url)
            t0 = time.perf_counter()
            with progress_bar(len(bodies), f"concurrency {concurrency}", "req", args=args) as bar:
                await asyncio.gather(*(worker(bar) for _ in range(min(concurrency, len(bodies)))))
            entry = summarize(concurrency, results, time.perf_counter() - t0)
            if spec_before is not None:
                await asyncio.sleep(_STATS_SETTLE_S)  # the workers' counters reach /status with their heartbeats
                entry.update(spec_delta(spec_before, await spec_counters(session, args.url)))
            entries.append(entry)
            _print_entry(entry)
    return {
        "benchmark": "serve", "url": args.url, "endpoint": args.endpoint, "model": model,
        "prompt_len": args.prompt_len, "output_len": args.output_len, "ignore_eos": args.ignore_eos,
        "temperature": args.temperature, "num_requests": args.num_requests, "seed": args.seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client_host": platform.node(), "results": entries,
    }


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _print_entry(e: dict) -> None:
    def stats(key: str) -> str:
        return "/".join(_fmt(e[key][q]) for q in ("mean", "p50", "p99"))

    print(f"concurrency {e['concurrency']:>4}: {e['completed']}/{e['num_requests']} ok, "
          f"{e['output_throughput']:.1f} out tok/s, {e['request_throughput']:.2f} req/s | ms mean/p50/p99: "
          f"TTFT {stats('ttft_ms')} | TPOT {stats('tpot_ms')} | E2E {stats('e2e_ms')}", flush=True)
    if "spec_acceptance_rate" in e:
        print(f"    speculative decoding: acceptance rate {e['spec_acceptance_rate']:.2f}, "
              f"{e['spec_mean_accepted_length']:.2f} tokens per verified step", flush=True)
    for err in e["errors"]:
        print(f"    error: {err}", file=sys.stderr)


def plot(path: str, doc: dict) -> bool:
    """Output tok/s against TTFT and TPOT (p50, p99) over the sweep; False when nothing completed."""
    from bench.plots import serve_plot  # matplotlib is only imported when a plot is asked for

    if serve_plot(path, doc):
        return True
    print(f"no level completed a request; {path} not written", file=sys.stderr)
    return False


def run(args: argparse.Namespace) -> int:
    """Exit status 0 when some request completed, 1 when none did, 2 on a setup error."""
    try:
        doc = asyncio.run(run_async(args))
    except BenchError as exc:
        print(f"xllm bench serve: {exc}", file=sys.stderr)
        return 2
    write_json(args.json_path, doc)
    write_plot(args.png_path, lambda path, d: plot(path, d) or False, doc)
    return 0 if any(e["completed"] for e in doc["results"]) else 1
