"""A client never notices a dead worker or scheduler, apart from a pause (real processes).

`xllm serve --workers 2`; streams run, then the worker holding a chosen stream is SIGKILLed (or
the scheduler is): every stream completes with exactly the text of a run without the fault (no
token repeated or skipped: the SSE deltas' concatenation is compared, and with logprobs on, the
token count), seeded sampling continues the same random stream (and equals the offline
`LLM.generate`), n=2 migrates per choice, a request sent right after a kill succeeds, and after
a scheduler restart streams keep flowing, a request sent while it is down succeeds, and a worker
that dies afterwards still has its stream migrated.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from _migration_helpers import (
    MAX_TOKENS,
    PROMPTS,
    RECOVERY_S,
    SEEDED,
    Stream,
    body,
    holder,
    kill_holder_of,
    run_all,
)

from common.bus import free_tcp_port

REPO = Path(__file__).resolve().parents[2]


def wait_for_workers(server: Any, count: int = 2) -> None:
    def up() -> bool:
        code, health = server.request("GET", "/health", timeout_s=5)
        return code == 200 and health.get("workers_up", 0) >= count
    server.wait_until(up, RECOVERY_S, f"{count} workers up again", interval_s=0.5)


def migrated_total(server: Any) -> float:
    code, text = server.request("GET", "/metrics")
    assert code == 200
    return sum(float(v) for v in re.findall(r'^xllm_requests_migrated_total\{[^}]*\} (\S+)$', text, re.M))


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=2)


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.model_id()


@pytest.fixture(scope="module")
def reference(server, model) -> dict:
    """Every request of this module, run once without a fault."""
    bodies = {f"greedy{i}": body(model, p, logprobs=1) for i, p in enumerate(PROMPTS)}
    bodies["seeded"] = body(model, PROMPTS[0], **SEEDED)
    bodies["n2"] = body(model, PROMPTS[1], n=2, **SEEDED)
    bodies["long"] = body(model, PROMPTS[2], max_tokens=5 * MAX_TOKENS)  # outlives a scheduler restart
    names = list(bodies)
    return {"bodies": bodies, **dict(zip(names, run_all(server, [bodies[n] for n in names])))}


def test_greedy_and_seeded_streams_survive_a_worker_kill(server, reference) -> None:
    bodies = reference["bodies"]
    names = [f"greedy{i}" for i in range(len(PROMPTS))] + ["seeded"]
    streams = {name: Stream(server, bodies[name]) for name in names}
    before = migrated_total(server)
    for s in streams.values():
        s.start()
    killed = kill_holder_of(server, streams["seeded"])
    # Sent right after the kill: it is routed to the live worker or retried there, never a 503.
    late = Stream(server, bodies["greedy1"])
    late.start()
    for name, s in streams.items():
        got, want = s.result(), reference[name]
        assert got["texts"] == want["texts"], (name, killed)
        assert got["tokens"] == want["tokens"], name  # logprob entries: one per token, none twice
        assert got["finish"] == want["finish"] == {0: "length"}
        assert got["usage"] is None or got["usage"] == want["usage"]
    assert late.result()["texts"] == reference["greedy1"]["texts"]
    assert migrated_total(server) > before
    wait_for_workers(server)


def test_seeded_stream_equals_offline_generate(reference) -> None:
    from common.engine.llm import LLM
    from common.engine.sampling_params import SamplingParams

    llm = LLM(dtype="float32", kv_cache_memory="64MiB")
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)
    out = llm.generate(PROMPTS[0], params)[0]
    assert out.outputs[0].text == reference["seeded"]["texts"][0]


def test_n2_stream_migrates_per_choice(server, reference) -> None:
    wait_for_workers(server)
    stream = Stream(server, reference["bodies"]["n2"])
    stream.start()
    kill_holder_of(server, stream)
    got = stream.result()
    assert got["texts"] == reference["n2"]["texts"] and len(got["texts"]) == 2
    assert got["finish"] == {0: "length", 1: "length"}
    wait_for_workers(server)


def test_scheduler_restart_keeps_streams_and_later_worker_death_migrates(server, reference) -> None:
    wait_for_workers(server)
    bodies = reference["bodies"]
    long = Stream(server, bodies["long"])
    long.start()
    server.wait_until(lambda: long.chunks >= 3 and holder(server, long.request_id or "") is not None, 120,
                      "the long stream to run", interval_s=0.1)
    worker = holder(server, long.request_id)
    scheduler_pid = server.child_pid("services.scheduler")
    os.kill(scheduler_pid, signal.SIGKILL)
    # Sent while the scheduler is down: it waits for the restarted one.
    late = Stream(server, bodies["greedy2"])
    late.start()

    def scheduler_back_with(instance_id: str) -> bool:
        try:
            pid = server.child_pid("services.scheduler")
        except LookupError:
            return False
        status = server.status()
        return pid != scheduler_pid and any(i["id"] == instance_id for i in status["instances"])

    server.wait_until(lambda: scheduler_back_with(worker["id"]), 60, "the scheduler back, the worker re-registered",
                      interval_s=0.2)
    assert long.is_alive(), "the long stream should still be running"
    # The new scheduler never assigned this stream: the gateway notices the death on its own.
    os.kill(worker["stats"]["pid"], signal.SIGKILL)
    assert long.result()["texts"] == reference["long"]["texts"]
    assert late.result()["texts"] == reference["greedy2"]["texts"]
    wait_for_workers(server)
    assert server.complete("Hi", max_tokens=2)["choices"][0]["text"] is not None


def _gateway(server: Any, name: str, *args: str) -> tuple[subprocess.Popen, SimpleNamespace]:
    """An extra gateway process on the server's bus, with its own limits."""
    port = free_tcp_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--port", str(port), "--gateway-id", name,
         "--run-dir", str(server.run_dir), "--log-level", "ERROR", *args],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, process_group=0)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    server.wait_until(ready, 120, f"gateway {name} to be ready", interval_s=0.5)
    return proc, SimpleNamespace(base_url=url)


def test_migration_limit_and_deadline_end_requests_with_clear_errors(server, model) -> None:
    wait_for_workers(server)
    limited, limited_gw = _gateway(server, "gw-no-migrations", "--max-migrations", "0")
    hasty, hasty_gw = _gateway(server, "gw-hasty", "--request-timeout", "2")
    try:
        stream = Stream(limited_gw, body(model, PROMPTS[0]))
        stream.start()
        kill_holder_of(server, stream)
        stream.join(RECOVERY_S)
        assert stream.error is not None and "giving up" in str(stream.error["message"]), stream.error
        assert stream.error["code"] == "worker_lost"
        code, reply = _post(hasty_gw.base_url, body(model, PROMPTS[1], max_tokens=600))
        assert code == 504 and reply["error"]["code"] == "timeout", reply
    finally:
        for proc in (limited, hasty):
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    wait_for_workers(server)


def _post(base_url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
