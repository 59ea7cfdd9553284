"""The benchmarks' HTTP client of an OpenAI-compatible server: the `/v1` base URL, model discovery,
and one streamed request timed chunk by chunk."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp

__all__ = ["BenchError", "RequestResult", "base_url", "discover_model", "stream_request"]


class BenchError(Exception):
    """A setup problem reported as one line (no model to ask for, ...)."""


@dataclass
class RequestResult:
    """One streamed request as the client saw it. Times in seconds: `ttft` and `e2e` from sending
    the request, `itl` the gaps between consecutive content chunks."""

    ok: bool = False
    error: str = ""
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first; None with fewer than two tokens."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def base_url(url: str) -> str:
    """`url` ending in `/v1`, whether or not it was given with it (or with a trailing slash)."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


async def discover_model(session: aiohttp.ClientSession, base: str) -> str:
    """The first model `GET {base}/models` lists; BenchError when there is none to be had."""
    try:
        async with session.get(base + "/models", timeout=aiohttp.ClientTimeout(total=30)) as resp:
            resp.raise_for_status()
            return (await resp.json())["data"][0]["id"]
    except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, IndexError, TypeError, ValueError) as exc:
        reason = str(exc) or type(exc).__name__
        raise BenchError(f"cannot list the models at {base}/models ({reason}); pass --model") from None


class SSEEvents:
    """The JSON of each `data:` event of a streamed response, up to `data: [DONE]` (which sets
    `done`: a stream that ends without it was cut off)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self.done = False

    async def __aiter__(self):  # noqa: ANN204 - an async generator
        async for raw in self.resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                return
            yield json.loads(data)


async def stream_request(session: aiohttp.ClientSession, url: str, body: dict, *, chat: bool,
                         timeout: float) -> RequestResult:
    """POST `body` (which asks for an SSE stream) to `url` and time it.

    Content is read from `delta.content` when `chat`, else from `text`. Token counts come from the
    usage block of the final chunk when the server sends one; otherwise each content chunk counts
    as one token and the prompt length is that of a token-id prompt. A failed request (HTTP error,
    stream error, timeout, no content) comes back with `ok` False and a one-line `error` rather
    than as an exception, so one bad request does not end a benchmark.
    """
    res = RequestResult()
    usage = None
    chunks = 0
    last = None
    start = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return res
            async for event in SSEEvents(resp):
                if event.get("error"):
                    res.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return res
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
                for choice in event.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
                    if text:
                        now = time.perf_counter()
                        if last is None:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        last = now
                        chunks += 1
    except asyncio.TimeoutError:
        res.error = f"timed out after {timeout:g} s"
    except aiohttp.ClientError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    except (ValueError, AttributeError) as exc:
        res.error = f"bad stream chunk: {exc}"
    res.e2e = time.perf_counter() - start
    if res.error:
        return res
    if last is None:
        res.error = "the stream carried no content"
        return res
    res.output_tokens = int(usage.get("completion_tokens", chunks)) if usage else chunks
    res.prompt_tokens = int(usage.get("prompt_tokens", 0)) if usage else len(body.get("prompt") or [])
    res.ok = True
    return res
