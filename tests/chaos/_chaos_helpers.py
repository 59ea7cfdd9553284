"""What the chaos tests share: greedy streams run concurrently while a controller watches their
progress and kills processes at chosen points, the victims' choice, and the checks afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from bench.chaos_stream import StreamRecord, compare_tokens, greedy_body, stream_greedy
from bench.server_watch import service_process, worker_processes

STREAMS = 16
PROMPT_WORDS = ("the river runs past the old mill", "a short story about winter light",
                "paper boats on the garden pond", "what the market sold that morning")


def prompts(n: int = STREAMS, seed: int = 0) -> list[str]:
    """`n` distinct short prompts (different lengths, so the streams do not move in lock step)."""
    rng = random.Random(seed)
    words = " ".join(PROMPT_WORDS).split()
    return [f"Story {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(3, 24))) for i in range(n)]


Controller = Callable[[list[StreamRecord]], Awaitable[Any]]


async def run_streams(url: str, model: str, texts: list[str], max_tokens: int,
                      controller: Controller | None = None, timeout_s: float = 300.0) -> tuple[list[StreamRecord], Any]:
    """Stream every prompt at once (greedy, exactly `max_tokens` tokens each) while `controller`
    (given the records as they fill) runs; returns the records and what the controller returned."""
    records = [StreamRecord(i) for i in range(len(texts))]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(texts) + 4)) as session:
        streams = [stream_greedy(session, url, greedy_body(model, text, max_tokens), i, timeout_s, record=records[i])
                   for i, text in enumerate(texts)]
        results = await asyncio.gather(*streams, controller(records) if controller else asyncio.sleep(0))
    return records, results[-1]


def tokens_received(records: list[StreamRecord]) -> int:
    return sum(len(r.tokens) for r in records)


async def wait_tokens(records: list[StreamRecord], at_least: int, timeout_s: float = 240.0) -> None:
    """Until the streams together have received `at_least` tokens (or every stream ended)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while tokens_received(records) < at_least and not all(r.end for r in records):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"only {tokens_received(records)} of {at_least} tokens after {timeout_s:.0f} s")
        await asyncio.sleep(0.05)


def get_json(url: str, path: str) -> Any:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read())


def held_requests(status: dict) -> dict[str, list[str]]:
    """Instance id -> the request ids the scheduler says it holds (ready instances only)."""
    return {inst["id"]: list(inst.get("requests") or []) for inst in status.get("instances") or []
            if inst.get("state") == "ready"}


async def kill_busiest_worker(server: Any, exclude: set[str], role: str | None = None) -> tuple[str, int, int]:
    """SIGKILL the live worker (not in `exclude`, of `role` if given) that holds the most requests
    right now; returns (instance id, pid, how many requests it held)."""
    # The gateway refreshes /status from the scheduler every half second, so right after the
    # streams start its snapshot may predate their dispatch: wait (briefly) for one that lists them.
    deadline = asyncio.get_running_loop().time() + 10.0
    while True:
        status = await asyncio.to_thread(get_json, server.base_url, "/status")
        roles = {inst["id"]: inst.get("role") for inst in status.get("instances") or []}
        held = held_requests(status)
        procs = worker_processes(server.proc.pid)
        candidates = [i for i in procs if i not in exclude and i in held and (role is None or roles.get(i) == role)]
        if any(held[i] for i in candidates) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.1)
    assert candidates, f"no live worker to kill (live: {sorted(procs)}, listed ready: {sorted(held)})"
    victim = max(candidates, key=lambda i: (len(held[i]), i))
    os.kill(procs[victim].pid, signal.SIGKILL)
    return victim, procs[victim].pid, len(held[victim])


def kill_scheduler(server: Any) -> int:
    proc = service_process(server.proc.pid, "services.scheduler")
    assert proc is not None, "no scheduler process"
    os.kill(proc.pid, signal.SIGKILL)
    return proc.pid


def wait_all_workers_up(server: Any, timeout_s: float = 180.0) -> None:
    """Until `/health` counts every worker up again (the launcher restarts the killed ones)."""
    def up() -> bool:
        code, body = server.request("GET", "/health", timeout_s=5)
        return code == 200 and isinstance(body, dict) and body.get("workers_up", 0) >= body.get("workers_expected", 0)
    server.wait_until(up, timeout_s, "every worker up again", interval_s=1.0)


def metric(server: Any, name: str) -> float:
    """Sum of every sample of `name` in the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(server.base_url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def assert_streams_match(records: list[StreamRecord], references: list[list[str]]) -> None:
    """Every stream finished, its tokens equal the no-fault reference's, its wire checks hold."""
    failed = [(r.prompt_index, r.error) for r in records if not r.ok]
    assert not failed, f"{len(failed)} stream(s) failed: {failed[:4]}"
    wrong = [(r.prompt_index, compare_tokens(r.tokens, references[r.prompt_index])) for r in records]
    wrong = [w for w in wrong if w[1] != "equal"]
    assert not wrong, f"{len(wrong)} stream(s) differ from the no-fault run: {wrong[:4]}"
    wire = [(r.prompt_index, r.wire_problems[:2]) for r in records if r.wire_problems]
    assert not wire, f"SSE token offsets / usage do not add up: {wire[:4]}"
