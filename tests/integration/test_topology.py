"""The real single-box topology (`xllm serve --workers 2`): routing, robustness, abort, supervision.

One server for the module; the tests run in file order and the last one stops it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import msgpack
import psutil
import pytest
import zmq

from common.codec import encode
from common.protocol import Heartbeat, Submit

pytestmark = pytest.mark.timeout(400)

WORKERS = ("worker-0", "worker-1")


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    srv = xllm_server_factory(workers=2)
    srv.wait_until(lambda: set(srv.instances()) == set(WORKERS), 60, "both workers in /status")
    return srv


def test_requests_spread_across_both_workers(server) -> None:
    before = {iid: inst["assigned_total"] for iid, inst in server.instances().items()}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: server.complete(f"Count to {i}:", max_tokens=2), range(4)))
    for reply in replies:
        assert reply["choices"][0]["finish_reason"] in ("length", "stop")
        assert reply["usage"]["completion_tokens"] >= 1

    def spread():
        insts = server.instances()
        assigned = {iid: insts[iid]["assigned_total"] - before[iid] for iid in WORKERS}
        served = {iid: insts[iid]["stats"].get("requests_total", 0) for iid in WORKERS}
        return sum(assigned.values()) == 4 and all(assigned.values()) and all(served.values()) and assigned

    server.wait_until(spread, 10, "both workers to be assigned and report served requests")
    # Finished requests leave the scheduler's table (the gateway's view lags by ~0.5 s).
    server.wait_until(lambda: all(i["inflight"] == 0 for i in server.instances().values()), 5,
                      "an empty request table")
    for inst in server.instances().values():
        assert inst["role"] == "mixed" and inst["total_pages"] > 0 and inst["last_heartbeat_age"] < 3.0


def test_malformed_bus_messages_are_dropped(server) -> None:
    pids = {name: server.child_pid("services." + name) for name in ("scheduler", "gateway")}
    pids["worker-0"] = server.child_pid("services.decode", "worker-0")
    garbage = [
        [b"\x00\xffnot msgpack at all"],
        [msgpack.packb({"t": "assign", "v": 1, "d": {"request_id": ["x"]}})],
        [msgpack.packb({"t": "no_such_message", "v": 1, "d": {}})],
        [msgpack.packb({"t": "submit", "v": 42, "d": {}})],
        [b"", b"\x01" * 100],
    ]
    ctx = zmq.Context()
    try:
        for sock_file in ("frontend.sock", "backend.sock", "kv-worker-0.sock"):
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 1000
            sock.connect(f"ipc://{server.run_dir / sock_file}")
            for frames in garbage:
                sock.send_multipart(frames)
        frontend = ctx.socket(zmq.DEALER)
        frontend.linger = 1000
        frontend.connect(f"ipc://{server.run_dir / 'frontend.sock'}")
        # Valid but impossible: a Submit whose result address is not a bus address at all.
        frontend.send_multipart(encode(Submit(request_id="bad-addr", prompt_ids=[1], sampling={}, gateway_id="x",
                                              tokens_addr="http://nowhere", arrival_time=0.0)))
        frontend.send_multipart(encode(Heartbeat(instance_id="ghost", role="decode", waiting=0, running=0,
                                                 free_pages=0, total_pages=0, used_pages=0, prefix_hit_rate=0.0,
                                                 queued_prefill_tokens=0, max_num_seqs=0, draining=False,
                                                 flipping=False, kv_namespace="", prompt_tokens_total=0,
                                                 generated_tokens_total=0, stats={})))
        time.sleep(0.5)
    finally:
        ctx.destroy(linger=500)
    reply = server.complete("Still there?", max_tokens=2)
    assert reply["choices"][0]["text"] is not None and reply["usage"]["completion_tokens"] >= 1
    logs = server.wait_until(lambda: (text := server.logs()).count("dropped invalid message") >= 15 and text, 10,
                      "the dropped messages to be logged")
    assert "dropped invalid message on ROUTER socket" in logs
    assert "unknown message type" in logs and "wrong protocol version" in logs
    assert "bad tokens address" in logs and "not a gateway message" in logs
    # Nobody crashed or was restarted.
    for name, pid in pids.items():
        assert psutil.pid_exists(pid), f"{name} died"
    assert "restarting" not in logs
    assert set(server.instances()) == set(WORKERS)


def _open_stream(server, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    url = urlparse(server.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"model": server.model_id(), "prompt": "Tell me a long story about the sea.", "max_tokens": max_tokens,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    return conn, response


def _read_event(response: http.client.HTTPResponse) -> dict:
    while True:
        line = response.readline()
        assert line, "the stream ended early"
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            return json.loads(line[len(b"data: "):])


def test_client_disconnect_frees_pages(server) -> None:
    conn, response = _open_stream(server, max_tokens=400)
    try:
        for _ in range(3):
            event = _read_event(response)
            assert event["choices"][0]["finish_reason"] is None

        def pages_in_use():
            _read_event(response)  # keep the stream flowing while the status catches up
            return sum(inst["used_pages"] for inst in server.instances().values())

        assert server.wait_until(pages_in_use, 15, "the worker to report the stream's pages") > 0
    finally:
        conn.close()  # the client goes away mid-stream

    def freed():
        insts = server.instances().values()
        return all(i["used_pages"] == 0 and i["running"] == 0 and i["inflight"] == 0 for i in insts)

    server.wait_until(freed, 15, "the aborted stream's pages to be freed on the worker")
    # The generation really stopped: no worker is still producing tokens for it.
    steps = {iid: inst["stats"]["steps"] for iid, inst in server.instances().items()}
    time.sleep(1.5)
    assert {iid: inst["stats"]["steps"] for iid, inst in server.instances().items()} == steps
    # Idle workers audit their page pools; the aborted stream left every page free XOR referenced.
    server.wait_until(lambda: all(i["stats"]["audited_at_step"] == i["stats"]["steps"]
                                  for i in server.instances().values()), 10, "the idle integrity audit")
    assert all(i["stats"]["integrity_failures"] == 0 for i in server.instances().values())


def test_killed_worker_is_restarted(server) -> None:
    old = server.instances()["worker-1"]
    old_pid = old["stats"]["pid"]
    assert old_pid == server.child_pid("services.decode", "worker-1")
    os.kill(old_pid, signal.SIGKILL)

    def replaced_or_gone():
        inst = server.instances().get("worker-1")
        return inst is None or inst["stats"].get("pid") != old_pid

    server.wait_until(replaced_or_gone, 15, "the scheduler to drop the killed worker")
    # Serving goes on with the other worker while worker-1 reloads its model.
    for _ in range(2):
        assert server.complete("Hi", max_tokens=2)["usage"]["completion_tokens"] >= 1
    def restarted():
        pid = server.instances().get("worker-1", {}).get("stats", {}).get("pid")
        return pid not in (None, old_pid)

    server.wait_until(restarted, 150, "the launcher to restart worker-1")
    assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
    assert "worker-1 exited with signal 9" in server.logs()
    # The restarted worker takes requests again.
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda i: server.complete(f"Again {i}", max_tokens=2), range(2)))
    server.wait_until(lambda: server.instances()["worker-1"]["stats"].get("requests_total", 0) >= 1, 10,
                      "the restarted worker to serve a request")


def test_sigterm_stops_everything(server) -> None:
    children = server.children()
    assert len(children) >= 4  # scheduler, two workers, gateway
    assert list(server.run_dir.glob("*.sock"))
    code = server.stop(signal.SIGTERM)  # asserts no process and no ipc file is left
    assert code == 0
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
