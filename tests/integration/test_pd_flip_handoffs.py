"""A decode -> prefill flip under load breaks no promise: `xllm serve` with 1 prefill + 2 decode workers.

A dozen streams are routed while both decode workers take KV; once the first hand-off has landed,
the decode worker every one of them named first is flipped to prefill. The sequences the
scheduler had promised to it before the flip are still taken in (none is refused for the role),
every stream completes with exactly the tokens it asked for, and the flip is acknowledged. Before
any of it, `/health` and `/status` say that all three workers are up.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from _bus_helpers import order_flip, sse_events

pytestmark = pytest.mark.timeout(420)

FLAGS = ("--prefill-workers", "1", "--decode-workers", "2", "--max-num-batched-tokens", "48", "--page-size", "16",
         "--kv-cache-memory", "96MiB")
STREAMS = 12
MAX_TOKENS = 40
WORDS = "the quick brown fox jumps over a lazy dog while the river runs to the sea".split()


def prompt(i: int) -> str:
    """Prompts of a few dozen to ~100 tokens: each takes a step or two of chunked prefill."""
    return f"Story {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(20 + 6 * i))


def stream(server: Any, text: str, first_decoded: threading.Event) -> tuple[int, int, str | None]:
    """One streaming completion: (chunks with text, completion tokens from usage, finish reason)."""
    body = {"model": server.model_id(), "prompt": text, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    chunks, tokens, finish = 0, -1, None
    for event in sse_events(server, "/v1/completions", body, timeout_s=240):
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            chunks += 1
            finish = choice.get("finish_reason") or finish
        if chunks >= 3:  # the first token came from prefill, the next ones from a decode worker
            first_decoded.set()
    return chunks, tokens, finish


def stats(server: Any) -> dict[str, dict]:
    return {inst["id"]: inst["stats"] for inst in server.status()["instances"]}


def accounted(server: Any, before: dict[str, dict], count: int) -> dict[str, dict]:
    """The workers' stats once `count` more requests were handed over (or decoded where they were
    prefilled) and none is left running: the counters arrive with heartbeats."""
    def done() -> dict[str, dict] | None:
        now = stats(server)
        # .get: an instance that (re)registered reports no counters until its next heartbeat.
        moved = sum(now[i].get(key, 0) - before.get(i, {}).get(key, 0)
                    for i in now for key in ("kv_received_ok", "kv_transfer_fallbacks"))
        return now if moved >= count and all(s.get("requests", 1) == 0 for s in now.values()) else None

    return server.wait_until(done, 30, f"{count} hand-offs in the workers' stats")


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(extra_args=FLAGS)


def test_health_and_status_count_the_expected_workers(server) -> None:
    # The fixture waited for workers_up == workers_expected; the scheduler says which they are.
    code, health = server.request("GET", "/health")
    assert code == 200 and health["workers_expected"] == 3 and health["workers_up"] == 3
    workers = server.status()["scheduler"]["workers"]
    assert workers == {"expected": 3, "up": 3, "by_role": {"prefill": 1, "decode": 2, "mixed": 0}}


def test_a_flip_under_load_refuses_no_hand_off_for_the_role(server) -> None:
    before = stats(server)
    first_decoded = threading.Event()
    with ThreadPoolExecutor(STREAMS) as pool:
        futures = [pool.submit(stream, server, prompt(i), first_decoded) for i in range(STREAMS)]
        assert first_decoded.wait(120), "no stream reached its decode worker"
        # A burst is ranked alike (idle decode workers tie, then by id): decode-0 is named first.
        order_flip(server, "decode-0", "prefill")
        results = [future.result(timeout=300) for future in futures]
    for chunks, tokens, finish in results:
        assert finish == "length" and tokens == MAX_TOKENS and chunks >= 1

    # The flip was acknowledged: the worker's own role is on record, nothing is pending.
    instances = server.wait_until(
        lambda: (by_id := {i["id"]: i for i in server.status()["instances"]})
        and by_id["decode-0"]["role"] == "prefill" and by_id["decode-0"]["pending_role"] is None and by_id,
        30, "decode-0 to acknowledge its flip")
    assert instances["decode-0"]["flip_id"] >= 1 and instances["decode-0"]["stats"]["flips_total"] >= 1
    recent = server.status()["scheduler"]["recent_flips"]
    assert any(f["instance"] == "decode-0" and f["to"] == "prefill" for f in recent)

    now = accounted(server, before, STREAMS)
    refused_role = {i: s["kv_handoffs_refused_role"] for i, s in now.items()}
    assert sum(refused_role.values()) == 0, refused_role
    # The scenario did happen: hand-offs promised to decode-0 before its flip landed after it.
    assert now["decode-0"]["kv_handoffs_honoured_after_flip"] >= 1, now["decode-0"]
    workers = server.status()["scheduler"]["workers"]
    assert workers["up"] == 3 and workers["by_role"] == {"prefill": 2, "decode": 1, "mixed": 0}

    # New work is named only for the decode worker left: still no refusal for the role.
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: stream(server, prompt(i), threading.Event()), range(4)))
    assert all(tokens == MAX_TOKENS for _, tokens, _ in results)
    later = accounted(server, now, 4)
    assert sum(s["kv_handoffs_refused_role"] for s in later.values()) == 0
    assert later["decode-0"]["kv_received_ok"] == now["decode-0"]["kv_received_ok"]
