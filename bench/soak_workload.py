"""The soak benchmark's requests: a seeded mix of short completions and chats (streamed or not),
streams the client abandons mid-way, and malformed requests; and what each one got back.

Every request has an expectation: a malformed one must be refused with a 4xx carrying an
OpenAI-style JSON error; any other must be answered 200 (a complete JSON body, or an SSE stream
that ends with `[DONE]` and carries no error event; an abandoned stream only has to start).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import aiohttp

from bench.client import SSEEvents

__all__ = ["KINDS", "MALFORMED_VARIANTS", "DEFAULT_MIX", "SoakRequest", "Outcome", "parse_mix", "make_requests",
           "send"]

KINDS = ("plain", "stream", "chat", "abort", "malformed")
DEFAULT_MIX = {"plain": 35, "stream": 25, "chat": 10, "abort": 10, "malformed": 20}
MALFORMED_VARIANTS = ("bad_json", "not_object", "missing_prompt", "wrong_type", "bad_temperature",
                      "bad_max_tokens", "bad_token_id", "too_long", "bad_messages", "unknown_model")

_WORDS = (
    "the of and to in is was for on with as by at from that this it be are or an have not but all "
    "time day year world life hand part child eye place work week case point number group problem fact "
    "water light house river city paper music market story garden table window winter summer morning"
).split()


@dataclass
class SoakRequest:
    index: int
    kind: str  # one of KINDS
    variant: str  # how it was built (a MALFORMED_VARIANTS entry for malformed ones)
    path: str  # "/v1/completions" or "/v1/chat/completions"
    body: dict | None = None
    raw: bytes | None = None  # sent as is instead of `body` (bad JSON)
    abort_after: int = 0  # abort kind: close the connection after this many content chunks

    @property
    def stream(self) -> bool:
        return bool(self.body and self.body.get("stream"))


@dataclass
class Outcome:
    index: int
    kind: str
    variant: str
    status: int | None = None  # HTTP status; None when no response came
    ok: bool = False  # what was expected of this kind happened
    problem: str = ""  # why not, in one line
    latency_s: float = 0.0
    chunks: int = 0  # content chunks of a stream
    error_code: str | None = None  # the JSON error's `code` of a refused request
    extra: dict = field(default_factory=dict)


def parse_mix(text: str) -> dict[str, int]:
    """`plain=35,stream=25,...` -> weights; kinds left out weigh 0; ValueError on a bad entry."""
    mix = {kind: 0 for kind in KINDS}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, weight = part.partition("=")
        if name.strip() not in mix or not weight.strip().isdigit():
            raise ValueError(f"bad mix entry {part!r}: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        mix[name.strip()] = int(weight)
    if not any(mix.values()):
        raise ValueError("the mix needs at least one kind with a weight > 0")
    return mix


def _prompt(rng: random.Random) -> str | list[int]:
    if rng.random() < 0.5:
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 48)))
    return [rng.randrange(100, 10_000) for _ in range(rng.randint(4, 128))]


def _sampling(rng: random.Random, max_output: int) -> dict:
    body: dict = {"max_tokens": rng.randint(1, max_output)}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(1 << 30))
    return body


def _malformed(rng: random.Random, model: str, max_model_len: int) -> tuple[str, str, dict | None, bytes | None]:
    variant = rng.choice(MALFORMED_VARIANTS)
    comp, chat = "/v1/completions", "/v1/chat/completions"
    good = {"model": model, "prompt": "Hello", "max_tokens": 4}
    if variant == "bad_json":
        return variant, comp, None, b'{"model": "%s", "prompt": "Hello", "max_tokens": ' % model.encode()
    if variant == "not_object":
        return variant, comp, None, b'["prompt", "Hello"]'
    if variant == "missing_prompt":
        return variant, comp, {"model": model, "max_tokens": 4}, None
    if variant == "wrong_type":
        return variant, comp, {**good, "prompt": 12345, "stream": rng.random() < 0.5}, None
    if variant == "bad_temperature":
        return variant, comp, {**good, "temperature": -1.5}, None
    if variant == "bad_max_tokens":
        return variant, comp, {**good, "max_tokens": rng.choice([0, -3])}, None
    if variant == "bad_token_id":
        return variant, comp, {**good, "prompt": [1, 2, 10**9]}, None
    if variant == "too_long":  # one token over the context, so it can never be served
        return variant, comp, {**good, "prompt": [rng.randrange(100, 10_000) for _ in range(max_model_len + 1)],
                               "stream": rng.random() < 0.5}, None
    if variant == "bad_messages":
        return variant, chat, {"model": model, "messages": "Hello", "max_tokens": 4}, None
    return variant, comp, {**good, "model": model + "-no-such-model"}, None  # unknown_model


def make_requests(n: int, *, seed: int, model: str, max_model_len: int, mix: dict[str, int] | None = None,
                  max_output: int = 16) -> list[SoakRequest]:
    """`n` seeded requests, kinds drawn by the weights of `mix` (default DEFAULT_MIX)."""
    mix = mix or DEFAULT_MIX
    kinds = [k for k in KINDS if mix.get(k, 0) > 0]
    weights = [mix[k] for k in kinds]
    rng = random.Random(seed)
    out: list[SoakRequest] = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        if kind == "malformed":
            variant, path, body, raw = _malformed(rng, model, max_model_len)
            out.append(SoakRequest(i, kind, variant, path, body, raw))
        elif kind == "chat":
            content = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(1, 32)))
            stream = rng.random() < 0.5
            body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": stream,
                    **_sampling(rng, max_output)}
            out.append(SoakRequest(i, kind, "stream" if stream else "json", "/v1/chat/completions", body))
        elif kind == "abort":
            # Long enough that the client leaves while the worker still generates.
            body = {"model": model, "prompt": _prompt(rng), "stream": True, "max_tokens": 4 * max_output + 32,
                    "ignore_eos": True, "temperature": 0.0}
            out.append(SoakRequest(i, kind, "close", "/v1/completions", body, abort_after=rng.randint(1, 3)))
        else:
            body = {"model": model, "prompt": _prompt(rng), "stream": kind == "stream", **_sampling(rng, max_output)}
            if kind == "stream":
                body["stream_options"] = {"include_usage": True}
            out.append(SoakRequest(i, kind, "tokens" if isinstance(body["prompt"], list) else "text",
                                   "/v1/completions", body))
    return out


def _json_error(text: str) -> tuple[bool, str | None]:
    """Whether `text` is an OpenAI-style error object ({"error": {"message": str, ...}}), and its code."""
    try:
        doc = json.loads(text)
    except ValueError:
        return False, None
    error = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str) or not error["message"]:
        return False, None
    return True, error.get("code")


async def _read_stream(resp: aiohttp.ClientResponse, out: Outcome, abort_after: int) -> None:
    events = SSEEvents(resp)
    async for event in events:
        if isinstance(event, dict) and event.get("error"):
            out.problem = f"stream error event: {json.dumps(event['error'])[:200]}"
            return
        for choice in event.get("choices") or []:
            if choice.get("text") or (choice.get("delta") or {}).get("content"):
                out.chunks += 1
        if abort_after and out.chunks >= abort_after:
            resp.close()  # the client walks away: the server must abort the request and free its pages
            out.ok = True
            return
    if abort_after:
        out.ok = True  # finished before the client left: nothing to abort, also fine
    elif not events.done:
        out.problem = "the stream ended without [DONE]"
    else:
        out.ok = True


async def send(session: aiohttp.ClientSession, base_url: str, req: SoakRequest, timeout_s: float) -> Outcome:
    """Send one request and judge what came back against its kind's expectation (never raises
    for a server-side failure: that is the outcome's `problem`)."""
    out = Outcome(req.index, req.kind, req.variant)
    data = req.raw if req.raw is not None else json.dumps(req.body).encode()
    start = time.perf_counter()
    try:
        async with session.post(base_url + req.path, data=data, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            out.status = resp.status
            if req.kind == "malformed" or resp.status != 200:
                text = await resp.text()
                is_error, out.error_code = _json_error(text)
                if req.kind != "malformed":
                    out.problem = f"HTTP {resp.status}: {text[:200]}"
                elif not 400 <= resp.status < 500:
                    out.problem = f"malformed request ({req.variant}) answered {resp.status}: {text[:200]}"
                elif not is_error:
                    out.problem = f"{resp.status} without an OpenAI-style JSON error: {text[:200]}"
                else:
                    out.ok = True
            elif req.stream:
                await _read_stream(resp, out, req.abort_after)
            else:
                doc = await resp.json()
                choices = doc.get("choices") if isinstance(doc, dict) else None
                if choices and isinstance(choices, list):
                    out.ok = True
                else:
                    out.problem = f"200 without choices: {json.dumps(doc)[:200]}"
    except asyncio.TimeoutError:
        out.problem = f"timed out after {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        out.problem = f"{type(exc).__name__}: {exc}"[:300]
    except ValueError as exc:
        out.problem = f"bad response body: {exc}"[:300]
    out.latency_s = time.perf_counter() - start
    return out
