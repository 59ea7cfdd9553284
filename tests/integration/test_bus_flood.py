"""Junk on the bus cannot evict healthy workers: a real `xllm serve --workers 2`, its scheduler's
frontend ipc socket flooded with 100k junk messages from a raw DEALER (as a hostile local process
would), while and after which both workers stay registered, a request succeeds, the log stays a
few lines long and the drops are counted in /status and /metrics.

Before the fix the scheduler's event loop spent seconds on the flood (one WARNING line each),
missed both workers' heartbeats and removed them.
"""

from __future__ import annotations

import threading

import msgpack
import pytest
import zmq
from openai import OpenAI

from common.codec import encode
from common.protocol import PROTOCOL_VERSION, StatusQuery

pytestmark = pytest.mark.timeout(600)

FLOOD = 100_000


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=2)


def _junk() -> list[list[bytes]]:
    """A few kinds of junk, cycled: not msgpack, an unknown tag, a backend message on the frontend,
    a Submit with mistyped fields, an empty frame."""
    return [
        [b"\xc1 not msgpack"],
        [msgpack.packb({"t": "nuke", "v": PROTOCOL_VERSION, "d": {}})],
        [msgpack.packb({"t": "heartbeat", "v": PROTOCOL_VERSION, "d": {}})],  # a backend message
        [msgpack.packb({"t": "submit", "v": PROTOCOL_VERSION, "d": {"request_id": 5}})],
        [b""],
    ]


def _flood(address: str, count: int) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDHWM, 0)  # queue it all at once: the scheduler drains at its own pace
        sock.linger = 30_000
        sock.connect(address)
        kinds = _junk()
        for i in range(count):
            sock.send_multipart(kinds[i % len(kinds)])
        sock.close()  # lingers until everything was handed over
    finally:
        ctx.term()


def _dropped(server) -> int:
    counts = server.status()["scheduler"].get("bus_invalid_messages", {})
    return sum(counts.values())


def test_a_junk_flood_on_the_frontend_evicts_no_worker(server):
    server.wait_until(lambda: len(server.instances()) == 2, 60, "both workers registered")
    dropped_before = _dropped(server)
    lines_before = len(server.logs().splitlines())
    client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = server.model_id()

    flooder = threading.Thread(target=_flood, args=(f"ipc://{server.run_dir}/frontend.sock", FLOOD))
    flooder.start()
    # a request while the junk arrives
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.choices[0].text is not None and reply.usage.completion_tokens >= 1
    flooder.join(timeout=120)
    assert not flooder.is_alive()

    # every junk message was dropped (the scheduler counts each one, read or unread)
    server.wait_until(lambda: _dropped(server) - dropped_before >= FLOOD, 120, "the flood to be drained")
    counts = server.status()["scheduler"]["bus_invalid_messages"]
    assert counts.get("rate_limited", 0) > FLOOD // 2, counts  # most of it dropped unread

    # both workers stayed registered throughout: never declared dead, never re-registered
    instances = server.instances()
    assert sorted(instances) == ["worker-0", "worker-1"]
    logs = server.logs().splitlines()[lines_before:]
    assert not [line for line in logs if any(word in line for word in ("is dead", "missed heartbeats", "suspect"))], \
        logs[-20:]
    assert not [line for line in logs if "registered" in line and "deregistered" not in line], logs[-20:]
    # the log stays small: a few lines per peer, a mute line, summaries; not one per message
    assert len(logs) < 40, "\n".join(logs[:60])

    # a request after the flood succeeds on the same workers
    for _ in range(2):
        reply = client.completions.create(model=model, prompt="Count: 1, 2,", max_tokens=3, temperature=0)
        assert reply.usage.completion_tokens >= 1
    code, body = server.request("GET", "/metrics")
    assert code == 200 and 'xllm_bus_invalid_messages_total{reason="rate_limited",service="scheduler"}' in body


def test_an_honest_gateway_peer_is_still_answered_after_a_flood(server):
    """Muting is per peer: a fresh DEALER's StatusQuery gets its StatusReply right away."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(f"ipc://{server.run_dir}/frontend.sock")
        sock.send_multipart(encode(StatusQuery()))
        assert sock.poll(20_000), "no StatusReply"
        assert sock.recv_multipart()
        sock.close()
    finally:
        ctx.term()
