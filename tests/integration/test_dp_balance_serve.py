"""DP load balance moves running sequences: `xllm serve --workers 2 --dp-balance` (real processes).

Skewed arrival: worker-1 is paused (SIGSTOP) until the scheduler holds it suspect, so every
stream of a burst is routed to worker-0; then worker-1 resumes. The scheduler's balancer moves
running sequences from worker-0 to worker-1 (their KV over worker-1's kv socket, or recomputed
there for the shortest ones): the running counts even out while the streams run, every stream
completes, and each greedy text equals the text of the same request served alone afterwards
(no token lost or duplicated across the move). /status and /metrics count the migrations.
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from _bus_helpers import sse_events

pytestmark = pytest.mark.timeout(600)

FLAGS = ("--dp-balance", "--dp-balance-threshold", "2", "--dp-balance-interval-s", "0.25",
         "--dp-balance-cooldown-s", "0.25", "--dp-balance-max-per-tick", "2", "--dp-balance-recompute-below", "24",
         "--suspect-after", "1", "--heartbeat-timeout", "300")
STREAMS = 6
MAX_TOKENS = 64
WORDS = "the quick brown fox jumps over a lazy dog while the river runs to the sea".split()


def prompt(i: int) -> str:
    # Lengths from ~10 to ~35 tokens: a sequence holding fewer than 24 tokens when it moves is
    # recomputed on the target, a longer one moves its KV; both must continue exactly.
    return f"Tale {i}: " + " ".join(WORDS[(i + k) % len(WORDS)] for k in range(4 + 5 * i))


def body(server: Any, i: int, stream: bool) -> dict:
    return {"model": server.model_id(), "prompt": prompt(i), "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "stream": stream}


def stream_text(server: Any, i: int) -> tuple[str, str | None, int]:
    text, finish, chunks = "", None, 0
    for event in sse_events(server, "/v1/completions", body(server, i, True), timeout_s=400):
        for choice in event.get("choices", []):
            text += choice.get("text") or ""
            finish = choice.get("finish_reason") or finish
            chunks += 1
    return text, finish, chunks


def instances(server: Any) -> dict[str, dict]:
    return {inst["id"]: inst for inst in server.status()["instances"]}


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=2, extra_args=FLAGS)


def test_running_sequences_migrate_and_continue_exactly(server) -> None:
    pid = instances(server)["worker-1"]["stats"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        server.wait_until(lambda: instances(server)["worker-1"]["liveness"] != "alive", 30, "worker-1 suspect")
        pool = ThreadPoolExecutor(STREAMS)
        futures = [pool.submit(stream_text, server, i) for i in range(STREAMS)]
        server.wait_until(lambda: instances(server)["worker-0"]["inflight"] >= STREAMS, 60,
                          "every stream routed to worker-0")
    finally:
        os.kill(pid, signal.SIGCONT)
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            now = instances(server)
            samples.append((now["worker-0"]["inflight"], now["worker-1"]["inflight"]))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = [f.result(timeout=500) for f in futures]
    stop.set()
    watcher.join()
    pool.shutdown()

    balance = server.status()["scheduler"]["dp_balance"]
    assert balance["enabled"] and balance["migrations_total"] >= 1, balance
    # The counts evened out: some moment with both workers running streams, at most 1 apart.
    assert any(a > 0 and b > 0 and abs(a - b) <= 1 for a, b in samples), samples
    for text, finish, _ in results:
        assert finish == "length"
    # The same requests served alone, one at a time (no skew, so nothing moves): same texts.
    for i, (text, _, _) in enumerate(results):
        code, alone = server.request("POST", "/v1/completions", body(server, i, False), timeout_s=300)
        assert code == 200, alone
        assert alone["choices"][0]["text"] == text, f"stream {i} differs after its migration"
        assert alone["usage"]["completion_tokens"] == MAX_TOKENS
    server.wait_until(lambda: "xllm_dp_migrations_total{reason=" in str(server.request("GET", "/metrics")[1]), 30,
                      "the migrations counted in /metrics")
    stats = instances(server)
    moved = sum(s["stats"].get(f"dp_migrations_moved_{m}", 0) for s in stats.values() for m in ("kv", "recompute"))
    assert moved == balance["migrations_total"]


def test_a_target_that_dies_mid_balance_loses_nothing(server) -> None:
    """worker-1 comes back just long enough to be named a migration target, then is killed:
    moves still in flight resume on worker-0 (no Ready / Ack within the transfer timeout), moves
    that landed come back through the gateway's migration of a dead worker's streams. Either
    way every stream ends with the text it has when nothing moves."""
    server.wait_until(lambda: all(i["liveness"] == "alive" for i in instances(server).values())
                      and len(instances(server)) == 2, 120, "both workers alive")
    before = server.status()["scheduler"]["dp_balance"]
    pid = instances(server)["worker-1"]["stats"]["pid"]
    os.kill(pid, signal.SIGSTOP)
    killed = False
    try:
        server.wait_until(lambda: instances(server)["worker-1"]["liveness"] != "alive", 30, "worker-1 suspect")
        pool = ThreadPoolExecutor(STREAMS)
        futures = [pool.submit(stream_text, server, i) for i in range(STREAMS)]
        server.wait_until(lambda: instances(server)["worker-0"]["inflight"] >= STREAMS, 60,
                          "every stream routed to worker-0")
        os.kill(pid, signal.SIGCONT)
        # Killed as soon as the balancer names it (it may have taken a sequence or two by then).
        server.wait_until(lambda: sum(server.status()["scheduler"]["dp_balance"]["ordered"].values())
                          > sum(before["ordered"].values()), 60, "a migration ordered to worker-1")
        os.kill(pid, signal.SIGKILL)
        killed = True
    finally:
        if not killed:
            os.kill(pid, signal.SIGKILL)
    results = [f.result(timeout=500) for f in futures]
    pool.shutdown()
    for i, (text, finish, _) in enumerate(results):
        assert finish == "length"
        code, alone = server.request("POST", "/v1/completions", body(server, i, False), timeout_s=300)
        assert code == 200, alone
        assert alone["choices"][0]["text"] == text, f"stream {i} differs after its target died"
