"""Helpers the integration tests share beside the fixtures: streaming requests and operator orders."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import zmq

from common.codec import encode
from common.protocol import FlipRequest


def sse_events(server: Any, path: str, body: dict, timeout_s: float = 180,
               errors_fail: bool = True) -> Iterator[dict]:
    """POST `body` as a streaming request and yield each SSE event's JSON; an error event fails
    (or, with `errors_fail` off, is yielded like any other)."""
    req = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout_s) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event and errors_fail:
                raise AssertionError(f"stream error: {event['error']}")
            yield event


def order_flip(server: Any, instance_id: str, role: str) -> None:
    """Ask the scheduler for a flip on its frontend socket, as an operator tool would."""
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 1000
        sock.connect(f"ipc://{server.run_dir}/frontend.sock")
        sock.send_multipart(encode(FlipRequest(instance_id=instance_id, role=role)))
        sock.close()
    finally:
        ctx.term()
