"""Connection-level limits of the HTTP server: header, body and keep-alive timeouts, a connection cap,
and OpenAI-shaped answers to requests aiohttp cannot even parse.

aiohttp closes idle keep-alive connections itself (`keepalive_timeout`, also armed when a
connection opens) and caps line and header sizes, but it has no deadline for reading a request's
headers or body: a client that sends half a header line, or one byte of its body, holds its
connection (and a file descriptor) forever, and enough of them make the process run out of
descriptors, after which new clients get empty replies with nothing logged.

The cleanest hook is aiohttp's protocol factory: `GuardedAppRunner` makes a `GuardedServer`
(a `web.Server`) whose factory returns `GuardedRequestHandler`, a `RequestHandler` subclass with
one watchdog timer per connection, driven from `data_received`:

- headers: from the first byte of a request (or from the moment a connection opens) until its
  headers have been parsed; past `header_timeout_s` the client gets a 408 (when it sent anything)
  and the connection is closed;
- body: while a request's body is still arriving, at most `body_timeout_s` between two reads;
  past it the client gets a 408 and the connection is closed (its handler is cancelled);
- idle keep-alive: aiohttp's own `keepalive_timeout`, set from `keepalive_timeout_s`.

Past `max_connections` open connections a new one gets a 503 in the OpenAI error shape and is
closed, instead of the process running out of descriptors. Errors aiohttp raises while parsing
(a bad Content-Length, a bad chunk size, a header over 8 KB) are answered in the OpenAI JSON
shape too, and logged as one rate-limited line, not a traceback per bad client.

This leans on a few RequestHandler internals (`_request_count`, `_messages`, `_current_request`,
`_reading_paused`); aiohttp is pinned in requirements.txt and tests/integration/test_hostile_http.py
exercises each path against a real server.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from common.log_limits import RateLimitedLog
from services.gateway.httpio import dumps_ascii
from services.gateway.openai_schema import APIError

__all__ = ["HttpLimits", "GuardedAppRunner", "GuardedServer", "GuardedRequestHandler", "raw_error_response"]

logger = logging.getLogger(__name__)

# File descriptors kept free for everything but client connections (bus sockets, log files, model files).
_RESERVED_FDS = 128
# How long a refused (over-cap) connection may take to send its request before it is simply closed.
_REFUSE_GRACE_S = 2.0

_CLIENT_LOG = RateLimitedLog(logger, "HTTP client errors", interval_s=10.0, burst=5)
_CAP_LOG = RateLimitedLog(logger, "connections refused at the cap", interval_s=10.0, burst=1)


@dataclass(frozen=True)
class HttpLimits:
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float
    max_connections: int

    def effective_max_connections(self) -> int:
        """The cap, lowered to what the process's descriptor limit can hold (else it never triggers)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        return max(1, min(self.max_connections, soft - _RESERVED_FDS))


def raw_error_response(error: APIError) -> bytes:
    """A complete HTTP/1.1 response (Connection: close) for an error, written straight to a transport
    when there is no aiohttp request to answer through."""
    body = dumps_ascii(error.body()).encode()
    lines = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
             "Content-Type: application/json", f"Content-Length: {len(body)}", "Connection: close",
             *(f"{name}: {value}" for name, value in error.headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _peer(transport: asyncio.BaseTransport | None) -> str:
    name = transport.get_extra_info("peername") if transport is not None else None
    if isinstance(name, tuple) and len(name) >= 2:
        return f"{name[0]}:{name[1]}"
    return str(name or "unknown peer")


def _one_line(text: str, limit: int = 300) -> str:
    # aiohttp's parser errors span lines (the bad bytes, then a caret under them).
    parts = [line.strip() for line in str(text).splitlines() if line.strip() and line.strip() != "^"]
    joined = " ".join(parts)
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection protocol plus the header/body watchdog (see the module docstring)."""

    def __init__(self, manager: GuardedServer, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._guard_manager = manager
        self._phase = "headers"  # "headers": waiting for a request's headers; "body"; "idle" (handling)
        self._got_bytes = False  # any byte of the current request's headers yet
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None
        self._counted = False

    # ---- connection lifecycle -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard_manager.open_connections += 1
        self._counted = True
        self._arm(self._limits.header_timeout_s)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard_manager.open_connections -= 1
        self._disarm()
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        parsed_before = self._request_count
        super().data_received(data)
        if self.transport is None:
            return
        if self._request_count != parsed_before:
            # A request's headers are complete (or unparseable: aiohttp answers that one itself).
            payload = self._messages[-1][1] if self._messages else None
            self._got_bytes = False
            if isinstance(payload, StreamReader) and not payload.is_eof():
                self._phase, self._body = "body", payload
                self._arm(self._limits.body_timeout_s)
            else:
                self._idle()
        elif self._phase == "body":
            if self._body is None or self._body.is_eof():
                self._idle()
            else:
                self._deadline = self._loop.time() + self._limits.body_timeout_s  # the timer re-arms itself
        elif data and self._current_request is None and self._phase == "idle":
            # The first bytes of the next request on a kept-alive connection.
            self._phase, self._got_bytes = "headers", True
            self._arm(self._limits.header_timeout_s)
        elif data and self._phase == "headers":
            self._got_bytes = True

    # ---- the watchdog -------------------------------------------------------------------

    def _idle(self) -> None:
        self._phase, self._body = "idle", None
        self._disarm()

    def _arm(self, timeout_s: float) -> None:
        self._deadline = self._loop.time() + timeout_s
        if self._timer is None:
            self._timer = self._loop.call_at(self._deadline, self._on_timer)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if self.transport is None or self._phase == "idle":
            return
        now = self._loop.time()
        # A body read paused by flow control (its handler is busy) is not the client's fault.
        if now < self._deadline or (self._phase == "body" and self._reading_paused):
            self._timer = self._loop.call_at(max(self._deadline, now + 0.1), self._on_timer)
            return
        if self._phase == "headers":
            if not self._got_bytes:
                logger.debug("closed an idle connection from %s: no request within %.0f s",
                             _peer(self.transport), self._limits.header_timeout_s)
                self.force_close()
                return
            self._time_out(f"the request headers did not arrive within {self._limits.header_timeout_s:g} s",
                           "header")
        else:
            self._time_out(f"the request body stalled for {self._limits.body_timeout_s:g} s", "body")

    def _time_out(self, message: str, what: str) -> None:
        transport = self.transport
        _CLIENT_LOG.log(_peer(transport), "closed the connection from %s: %s timeout", _peer(transport), what)
        request = self._current_request
        # Answer only a request that has had no response yet (a body still arriving after its
        # handler answered, e.g. a 413, just gets closed).
        unanswered = what == "header" or (request is not None and request.writer.output_size == 0)
        if transport is not None and unanswered:
            transport.write(raw_error_response(APIError(408, message, code="request_timeout")))
        self.force_close()  # the transport flushes the 408 before it closes; the handler is cancelled

    # ---- requests aiohttp could not parse -----------------------------------------------

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """aiohttp's answer to an unparseable request (or a failure outside the app's middlewares),
        in the OpenAI error shape; a client's mistake is one rate-limited log line."""
        if status >= 500:
            logger.error("error handling a request from %s", request.remote, exc_info=exc)
            error = APIError(status, "internal server error", code="internal_error")
        else:
            text = _one_line(getattr(exc, "message", None) or message or HTTPStatus(status).phrase)
            _CLIENT_LOG.log(str(request.remote), "bad HTTP request from %s: %s", request.remote, text)
            error = APIError(status, f"malformed HTTP request: {text}", code="invalid_http_request")
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started: cannot send the error")
        response = web.Response(body=dumps_ascii(error.body()).encode(), status=status,
                                content_type="application/json")
        response.force_close()
        return response


class _RefusingProtocol(asyncio.Protocol):
    """An over-cap connection: answer its first request with a 503 and close.

    The answer waits for the request's first bytes, so the client reads it instead of a reset;
    a client that sends nothing is closed after a short grace period.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(_REFUSE_GRACE_S, self._close)

    def data_received(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            error = APIError(503, "the server has too many open connections; retry shortly",
                             code="service_unavailable", headers={"Retry-After": "1"})
            self.transport.write(raw_error_response(error))
            self._close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.transport = None

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class GuardedServer(web.Server):
    """aiohttp's protocol factory, making guarded connections up to the cap and refusing the rest."""

    def __init__(self, *args: Any, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.max_connections = limits.effective_max_connections()
        self.open_connections = 0
        self.refused_connections = 0

    def __call__(self) -> asyncio.Protocol:  # type: ignore[override]
        if self.open_connections >= self.max_connections:
            self.refused_connections += 1
            _CAP_LOG.log("cap", "refusing connections: %d open, the cap is %d (--max-connections); "
                         "%d refused so far", self.open_connections, self.max_connections,
                         self.refused_connections)
            return _RefusingProtocol()
        kwargs = {**self._kwargs, "keepalive_timeout": self.limits.keepalive_timeout_s}
        return GuardedRequestHandler(self, loop=self._loop, limits=self.limits, **kwargs)


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` whose server is a `GuardedServer` with `limits`."""

    def __init__(self, app: web.Application, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # runs the app's startup and freezes it
        return GuardedServer(plain.request_handler, request_factory=plain.request_factory,
                             handler_cancellation=plain.handler_cancellation, loop=plain._loop,
                             limits=self._limits, **plain._kwargs)
