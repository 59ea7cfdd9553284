"""Helpers of the migration tests: streaming requests read on threads, and who holds a request."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from _bus_helpers import sse_events

PROMPTS = [[1, 504, 3458, 282, 260, 3873, 314], [1, 6121, 346, 253, 2358, 563], [1, 378, 1345, 282, 4760],
           [1, 1023, 16489, 282, 1010, 5463]]
MAX_TOKENS = 40
SEEDED = {"temperature": 0.9, "top_p": 0.95, "seed": 1234}
RECOVERY_S = 240.0


class Stream(threading.Thread):
    """One streaming /v1/completions request, read chunk by chunk on its own thread."""

    def __init__(self, server: Any, body: dict) -> None:
        super().__init__(daemon=True)
        self.server, self.body = server, {**body, "stream": True}
        self.request_id: str | None = None
        self.texts: dict[int, str] = {}
        self.tokens: dict[int, int] = {}  # logprob entries seen per choice
        self.finish: dict[int, str] = {}
        self.chunks = 0
        self.error: Any = None
        self.usage: dict | None = None

    def run(self) -> None:
        try:
            for event in sse_events(self.server, "/v1/completions", self.body, RECOVERY_S, errors_fail=False):
                if "error" in event:
                    self.error = event["error"]
                    return
                self.request_id = event.get("id", self.request_id)
                self.usage = event.get("usage") or self.usage
                for choice in event.get("choices", []):
                    i = choice["index"]
                    self.texts[i] = self.texts.get(i, "") + choice.get("text", "")
                    logprobs = choice.get("logprobs") or {}
                    self.tokens[i] = self.tokens.get(i, 0) + len(logprobs.get("tokens") or [])
                    if choice.get("finish_reason"):
                        self.finish[i] = choice["finish_reason"]
                    self.chunks += 1
        except Exception as exc:  # reported by the test
            self.error = repr(exc)

    def result(self) -> dict:
        self.join(RECOVERY_S)
        assert not self.is_alive(), "stream did not finish"
        assert self.error is None, self.error
        return {"texts": self.texts, "tokens": self.tokens, "finish": self.finish, "usage": self.usage}


def body(model: str, prompt: list[int], **extra: Any) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            **extra}


def run_all(server: Any, bodies: list[dict]) -> list[dict]:
    streams = [Stream(server, b) for b in bodies]
    for s in streams:
        s.start()
    return [s.result() for s in streams]


def holder(server: Any, request_id: str) -> dict | None:
    """The instance the scheduler says holds `request_id` (None: not known there now)."""
    for inst in server.status()["instances"]:
        if request_id in (inst.get("requests") or []):
            return inst
    return None


def kill_holder_of(server: Any, stream: Stream, min_chunks: int = 3) -> str:
    """SIGKILL the worker streaming `stream` once it streamed a few chunks; returns its id."""
    found: dict = {}

    def located() -> bool:
        if stream.error is not None or not stream.is_alive():
            raise AssertionError(f"stream ended before the kill: {stream.error}")
        if stream.chunks < min_chunks or stream.request_id is None:
            return False
        inst = holder(server, stream.request_id)
        if inst is not None:
            found.update(inst)
        return inst is not None

    server.wait_until(located, 120, "the stream to run on a worker", interval_s=0.1)
    os.kill(found["stats"]["pid"], signal.SIGKILL)
    return found["id"]
