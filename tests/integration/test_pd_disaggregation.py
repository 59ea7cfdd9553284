"""P/D disaggregation with real processes: `xllm serve --prefill-workers 1 --decode-workers 1`.

A prefill worker prefills, streams the first token, and hands the sequence's KV to the decode
worker over its kv socket; role flips arrive on the control socket while streams are running.
Greedy outputs must be token-for-token those of a single mixed worker with the same flags, and
nothing may be lost: not by a flip under load, not by a storm of flips, not by the decode peer
dying in the middle of transfers.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import os

import pytest

from _bus_helpers import order_flip, sse_events

pytestmark = pytest.mark.timeout(600)

# Small chunks so prompts cross chunk and page boundaries (page size 16).
ENGINE_FLAGS = ("--max-num-batched-tokens", "48", "--page-size", "16")
PD_FLAGS = ("--prefill-workers", "1", "--decode-workers", "1", "--kv-transfer-timeout", "2", *ENGINE_FLAGS)
PROMPTS = [
    "Hi",
    "The capital of France is",
    "Write a short poem about the sea and the wind, and how they talk to each other at night. " * 3,
    "List five prime numbers and explain why each one is prime, step by step, in plain words. " * 5,
]
MAX_TOKENS = 24


def complete(server: Any, prompt: str, max_tokens: int = MAX_TOKENS, **extra: Any) -> tuple[int, Any]:
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "logprobs": 0, **extra}
    body["model"] = server.model_id()
    return server.request("POST", "/v1/completions", body, timeout_s=180)


def token_count(reply: dict) -> int:
    return len(reply["choices"][0]["logprobs"]["tokens"])


def stream_tokens(server: Any, prompt: str, max_tokens: int) -> tuple[str, int, str | None]:
    """Stream one completion; (text, chunks with text, finish reason) or raises on an error event."""
    body = {"model": server.model_id(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "ignore_eos": True}
    text, chunks, finish = "", 0, None
    for event in sse_events(server, "/v1/completions", body):
        choice = event["choices"][0]
        text += choice.get("text") or ""
        chunks += 1
        finish = choice.get("finish_reason") or finish
    return text, chunks, finish


def roles(server: Any) -> dict[str, str]:
    return {inst["id"]: inst["role"] for inst in server.status()["instances"]}


@pytest.fixture(scope="module")
def reference(xllm_server_factory) -> dict[str, str]:
    """Greedy completions of a single mixed worker with the same engine flags."""
    mixed = xllm_server_factory(workers=1, extra_args=ENGINE_FLAGS)
    try:
        out = {}
        for prompt in PROMPTS:
            code, reply = complete(mixed, prompt)
            assert code == 200, reply
            out[prompt] = reply["choices"][0]["text"]
        return out
    finally:
        mixed.stop()


@pytest.fixture(scope="module")
def pd_server(reference, xllm_server_factory):
    server = xllm_server_factory(extra_args=PD_FLAGS)
    server.wait_until(lambda: len(server.status()["instances"]) == 2, 60, "both workers to register")
    return server


def test_pd_outputs_match_a_mixed_worker(pd_server, reference) -> None:
    for prompt in PROMPTS:
        code, reply = complete(pd_server, prompt)
        assert code == 200, reply
        assert reply["choices"][0]["text"] == reference[prompt], prompt[:40]
        assert token_count(reply) == MAX_TOKENS or reply["choices"][0]["finish_reason"] == "stop"
    # Every request went prefill -> decode over the kv socket, none fell back to local decode
    # (the stats arrive with heartbeats, up to a second behind).
    stats = pd_server.wait_until(
        lambda: (s := {i["id"]: i["stats"] for i in pd_server.status()["instances"]})
        and s["decode-0"]["kv_received_ok"] >= len(PROMPTS) and s, 10, "the transfers in the stats")
    assert stats["prefill-0"]["kv_transfers_ok"] >= len(PROMPTS)
    assert stats["prefill-0"]["kv_transfer_fallbacks"] == 0
    status = pd_server.status()
    assert status["scheduler"]["pools"] == {"prefill": 1, "decode": 1}
    by_id = {i["id"]: i for i in status["instances"]}
    assert by_id["prefill-0"]["role"] == "prefill" and by_id["decode-0"]["role"] == "decode"
    for field in ("queued_prefill_tokens", "running", "waiting", "used_pages"):
        assert field in by_id["decode-0"]
    code, metrics = pd_server.request("GET", "/metrics")
    assert code == 200
    assert 'xllm_worker_role{instance="prefill-0",role="prefill"} 1.0' in metrics
    assert 'xllm_worker_kv_transfers{instance="decode-0",outcome="received"}' in metrics


def test_abort_during_pd_frees_pages_on_both_workers(pd_server) -> None:
    # A client that goes away mid-stream: the request is aborted wherever it is.
    body = json.dumps({"model": pd_server.model_id(), "prompt": PROMPTS[3], "max_tokens": 200,
                       "stream": True, "ignore_eos": True}).encode()
    req = urllib.request.Request(pd_server.base_url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as response:
        for _ in range(6):
            response.readline()
    pd_server.wait_until(
        lambda: all(i["running"] == 0 and i["waiting"] == 0 and i["stats"].get("requests") == 0
                    for i in pd_server.status()["instances"]),
        60, "the aborted request to leave both workers")
    assert all(i["used_pages"] == 0 or i["stats"]["prefix_cache"] for i in pd_server.status()["instances"])


def _flip_under_load(server: Any, flips: list[tuple[str, str]], gap_s: float, n_streams: int = 6,
                     max_tokens: int = 40) -> list[tuple[str, int, str | None]]:
    with ThreadPoolExecutor(n_streams) as pool:
        futures = [pool.submit(stream_tokens, server, PROMPTS[i % len(PROMPTS)], max_tokens) for i in range(n_streams)]
        time.sleep(1.0)
        for instance_id, role in flips:
            order_flip(server, instance_id, role)
            time.sleep(gap_s)
        return [f.result(timeout=300) for f in futures]


def test_flip_under_load_loses_nothing(pd_server) -> None:
    # Swap the roles while streams are in flight.
    results = _flip_under_load(pd_server, [("decode-0", "prefill"), ("prefill-0", "decode")], gap_s=0.3)
    for text, chunks, finish in results:
        assert finish == "length" and chunks >= 1 and text
    pd_server.wait_until(lambda: roles(pd_server) == {"prefill-0": "decode", "decode-0": "prefill"}, 30,
                         "the swapped roles in the heartbeats")
    # New work flows the other way now, and both flips report their latency.
    code, reply = complete(pd_server, PROMPTS[2])
    assert code == 200, reply
    # The roles above are the acknowledged ones (FlipAck); the workers' own counters come with
    # their next heartbeat.
    stats = pd_server.wait_until(
        lambda: (stats := {i["id"]: i["stats"] for i in pd_server.status()["instances"]})
        and all(stats[i].get("flips_total", 0) >= 1 for i in ("decode-0", "prefill-0")) and stats,
        10, "both flips in the workers' heartbeats")
    assert stats["decode-0"]["flips_total"] >= 1 and stats["prefill-0"]["flips_total"] >= 1
    pd_server.wait_until(lambda: "xllm_worker_flip_latency_seconds{" in pd_server.request("GET", "/metrics")[1],
                         20, "the flip latency metric")


def test_flip_storm_loses_nothing_and_outputs_stay_exact(pd_server, reference) -> None:
    storm = []
    for i in range(10):
        storm += [("decode-0", "decode" if i % 2 else "prefill"), ("prefill-0", "prefill" if i % 2 else "decode")]
    results = _flip_under_load(pd_server, storm, gap_s=0.05)
    for text, chunks, finish in results:
        assert finish == "length" and text
    pd_server.wait_until(lambda: roles(pd_server) == {"prefill-0": "prefill", "decode-0": "decode"}, 30,
                         "the storm's final roles")
    for prompt in PROMPTS[:3]:
        code, reply = complete(pd_server, prompt)
        assert code == 200 and reply["choices"][0]["text"] == reference[prompt]
    assert pd_server.status()["scheduler"]["flips_total"] >= 2


def test_decode_peer_killed_during_transfers_ends_in_retry_or_recompute(pd_server) -> None:
    decode_pid = pd_server.child_pid("services.decode", "decode-0")
    fallbacks_before = pd_server.instances()["prefill-0"]["stats"]["kv_transfer_fallbacks"]
    # Freeze the decode worker so the hand-offs of these requests are in flight when it dies:
    # its kv socket accepts the connection but never answers.
    os.kill(decode_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(complete, pd_server, PROMPTS[3], 16, ignore_eos=True) for _ in range(4)]
            time.sleep(1.0)
            os.kill(decode_pid, signal.SIGKILL)
            outcomes = [future.result(timeout=240) for future in futures]  # no hang
    finally:
        try:
            os.kill(decode_pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # No decode worker took them: each was decoded by the prefill worker itself, in full.
    for code, reply in outcomes:
        assert code == 200, reply
        assert token_count(reply) == 16
    pd_server.wait_until(
        lambda: pd_server.instances()["prefill-0"]["stats"]["kv_transfer_fallbacks"] > fallbacks_before, 10,
        "the prefill worker to report its local fallbacks")
    # After the restart, P/D serves again.
    pd_server.wait_until(lambda: set(roles(pd_server)) == {"prefill-0", "decode-0"}
                         and pd_server.child_pid("services.decode", "decode-0") != decode_pid, 120,
                         "the decode worker to come back")
    code, reply = complete(pd_server, PROMPTS[1])
    assert code == 200, reply
