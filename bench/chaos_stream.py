"""One greedy streamed completion as the chaos benchmark and tests record it: every token (asked
for with `logprobs: 0`, so each SSE event names the tokens it carries and their `text_offset`),
when each arrived, and how the whole compares with a no-fault reference.

The checks a migrated stream must pass:
- its token list equals the reference's (greedy: a migration changes nothing), which it cannot
  if a token was repeated or skipped anywhere between the engine and the client;
- on the wire, each token's `text_offset` is the length of the tokens before it (no SSE event lost
  or sent twice), and the usage block counts exactly the tokens streamed.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.client import SSEEvents

__all__ = ["StreamRecord", "stream_greedy", "compare_tokens", "greedy_body"]


@dataclass
class StreamRecord:
    """One streamed request. Times are `time.perf_counter()` values of this process."""

    prompt_index: int
    start: float = 0.0
    end: float = 0.0
    response_id: str = ""
    status: int | None = None
    ok: bool = False  # a 200 stream that ended with [DONE] and no error event
    error: str = ""
    text: str = ""
    tokens: list[str] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage_tokens: int | None = None
    wire_problems: list[str] = field(default_factory=list)  # offsets or usage that do not add up

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def first_token_after(self, t: float) -> float | None:
        """Arrival time of the first token after `t` (None if none came)."""
        return next((x for x in self.token_times if x > t), None)

    def last_token_before(self, t: float) -> float | None:
        before = [x for x in self.token_times if x <= t]
        return before[-1] if before else None

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t < self.end


def greedy_body(model: str, prompt: str | list[int], max_tokens: int) -> dict:
    """A greedy streamed completion that always generates `max_tokens` tokens."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}


def _take_event(rec: StreamRecord, event: dict, now: float, offset: int) -> int:
    """Fold one SSE event into `rec`; returns the text length of the tokens so far."""
    if not rec.response_id and isinstance(event.get("id"), str):
        rec.response_id = event["id"]
    if isinstance(event.get("usage"), dict):
        rec.usage_tokens = event["usage"].get("completion_tokens")
    for choice in event.get("choices") or []:
        rec.text += choice.get("text") or ""
        if choice.get("finish_reason"):
            rec.finish_reason = choice["finish_reason"]
        logprobs = choice.get("logprobs") or {}
        tokens = logprobs.get("tokens") or []
        offsets = logprobs.get("text_offset") or []
        if len(offsets) != len(tokens):
            rec.wire_problems.append(f"event with {len(tokens)} tokens but {len(offsets)} offsets")
        for k, token in enumerate(tokens):
            if k < len(offsets) and offsets[k] != offset:
                rec.wire_problems.append(f"token {len(rec.tokens)} at text offset {offsets[k]}, expected {offset}")
            rec.tokens.append(token)
            rec.token_times.append(now)
            offset += len(token)
    return offset


async def stream_greedy(session: aiohttp.ClientSession, url: str, body: dict, prompt_index: int,
                        timeout_s: float, record: StreamRecord | None = None) -> StreamRecord:
    """POST `body` to `{url}/v1/completions` and record the stream (never raises for a failure
    of the server: that is the record's `error`). Pass `record` to watch it fill while it runs."""
    rec = record if record is not None else StreamRecord(prompt_index)
    rec.start = time.perf_counter()
    offset = 0
    done = False
    try:
        async with session.post(url + "/v1/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            rec.status = resp.status
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
            else:
                events = SSEEvents(resp)
                async for event in events:
                    if event.get("error"):
                        rec.error = f"stream error: {json.dumps(event['error'])[:300]}"
                        break
                    offset = _take_event(rec, event, time.perf_counter(), offset)
                done = events.done
                if not done and not rec.error:
                    rec.error = "the stream ended without [DONE]"
    except asyncio.TimeoutError:
        rec.error = f"timed out after {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:300]
    except ValueError as exc:
        rec.error = f"bad stream event: {exc}"[:300]
    rec.end = time.perf_counter()
    if done and not rec.error:
        if rec.usage_tokens is not None and rec.usage_tokens != len(rec.tokens):
            rec.wire_problems.append(f"usage says {rec.usage_tokens} tokens, {len(rec.tokens)} were streamed")
        rec.ok = True
    return rec


def compare_tokens(got: list[str], want: list[str]) -> str:
    """"equal", or where and how `got` departs from `want`: a token repeated, skipped, or a
    different one (diverged), or a stream cut short / too long."""
    if got == want:
        return "equal"
    i = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i == len(got):
        return f"short: {len(got)} of {len(want)} tokens"
    if i == len(want):
        return f"long: {len(got)} tokens, {len(want)} expected"
    if i > 0 and got[i] == got[i - 1] and got[i + 1:i + 4] == want[i:i + 3]:
        return f"repeated token at index {i}"
    if got[i:i + 3] == want[i + 1:i + 4]:
        return f"skipped token at index {i}"
    return f"diverged at token {i}: {got[i]!r} instead of {want[i]!r}"
