"""HTTP plumbing shared by the handlers: reading a JSON body, JSON responses, the SSE writer."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from services.gateway.openai_schema import APIError, parse_json_body

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
dumps_ascii = json.JSONEncoder(ensure_ascii=True, separators=(",", ":")).encode


def dumps(value: Any) -> str:
    """Compact JSON (UTF-8 text as is, no spaces): the wire form of every body we send."""
    return _dumps(value)


def _encode(value: Any) -> bytes:
    try:
        return _dumps(value).encode()
    except UnicodeEncodeError:
        # A lone surrogate (e.g. echoed from a client's "\ud800") has no UTF-8 form; escaped
        # JSON (\ud800) still says it, so an error about it can always be sent.
        return dumps_ascii(value).encode()


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=_encode(value), status=status, headers=headers, content_type="application/json")


def error_response(error: APIError) -> web.Response:
    return json_response(error.body(), status=error.status, headers=error.headers or None)


async def read_json(request: web.Request, max_bytes: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `max_bytes`, 400 for anything that is not a JSON object.

    The content type is not checked: a JSON body sent as text/plain (curl's default with -d) is
    still accepted, as vLLM and OpenAI do.
    """
    length = request.content_length
    if length is not None and length > max_bytes:
        raise _too_large(length, max_bytes)
    chunks = []
    size = 0
    try:
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > max_bytes:
                raise _too_large(size, max_bytes)
            chunks.append(chunk)
    except RequestPayloadError as exc:  # e.g. a bad chunk size or a truncated compressed body
        raise APIError(400, f"request body could not be read: {exc}", code="invalid_body") from None
    return parse_json_body(b"".join(chunks))


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"request body is too large ({size} bytes or more; the limit is {limit} bytes)",
                    code="request_too_large")


class SSEWriter:
    """Server-sent events: `data: <json>\\n\\n` per chunk, then `data: [DONE]`.

    The response starts with the first chunk, not before: an error that comes back before any
    token (a worker refusing the request) still gets its proper HTTP status.
    """

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(
            status=200,
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                     "X-Accel-Buffering": "no"},
        )

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def send(self, payloads: list[str]) -> None:
        """One write for everything ready now (fewer syscalls when a batch of tokens lands)."""
        if not self.response.prepared:
            await self.response.prepare(self.request)
        if payloads:
            await self.response.write("".join(f"data: {p}\n\n" for p in payloads).encode())

    async def send_error(self, error: APIError) -> None:
        await self.response.write(b"data: " + _encode(error.body()) + b"\n\n")

    async def close(self) -> web.StreamResponse:
        if not self.response.prepared:
            await self.response.prepare(self.request)
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
