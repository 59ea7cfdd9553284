"""The gateway's connection limits over real loopback sockets, on a small in-process aiohttp app.

`GuardedAppRunner` (services/gateway/http_limits.py) with sub-second timeouts: partial headers,
a stalled body and an idle keep-alive connection are closed (408 in the OpenAI error shape where
a request was under way), unparseable requests get a JSON 400 and one log line, and past the
connection cap a new client gets a JSON 503. The real gateway gets the same checks end to end in
tests/integration/test_hostile_http.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from common.bus import free_tcp_port
from services.gateway.http_limits import GuardedAppRunner, HttpLimits, raw_error_response
from services.gateway.httpio import json_response, read_json
from services.gateway.openai_schema import APIError

LIMITS = HttpLimits(header_timeout_s=0.5, body_timeout_s=0.5, keepalive_timeout_s=0.7, max_connections=8)
WAIT_S = 10.0  # bound on any single read; every expected close comes far sooner


async def _echo(request: web.Request) -> web.Response:
    try:
        body = await read_json(request, 1 << 20)
    except APIError as error:
        return json_response(error.body(), status=error.status)
    return json_response(body)


async def _ping(request: web.Request) -> web.Response:
    return web.Response(text="pong")


def serve(scenario: Callable[[int], Awaitable[None]], limits: HttpLimits = LIMITS) -> None:
    async def main() -> None:
        app = web.Application()
        app.router.add_post("/echo", _echo)
        app.router.add_get("/ping", _ping)
        runner = GuardedAppRunner(app, limits=limits, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        port = free_tcp_port()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        try:
            await asyncio.wait_for(scenario(port), 60)
        finally:
            await runner.cleanup()

    asyncio.run(main())


async def exchange(port: int, payload: bytes, *, then_wait: bool = True) -> bytes:
    """Send `payload`, read until the server closes the connection; what came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(payload)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), WAIT_S)
    finally:
        writer.close()


def parse(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def openai_error(response: bytes, status: int) -> dict:
    code, headers, body = parse(response)
    assert code == status, response
    assert headers["content-type"].startswith("application/json"), headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_partial_headers_get_a_408_and_the_connection_closes() -> None:
    async def scenario(port: int) -> None:
        error = openai_error(await exchange(port, b"GET /ping HTTP/1.1\r\nHost:"), 408)
        assert error["code"] == "request_timeout" and "headers" in error["message"]
        assert await exchange(port, b"") == b""  # said nothing at all: just closed

    serve(scenario)


def test_a_stalled_body_gets_a_408_and_the_connection_closes() -> None:
    async def scenario(port: int) -> None:
        response = await exchange(port, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        error = openai_error(response, 408)
        assert "body" in error["message"]

    serve(scenario)


def test_an_idle_keep_alive_connection_is_closed() -> None:
    async def scenario(port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), WAIT_S)  # returns once the server closes
        writer.close()
        assert parse(data)[0] == 200 and data.endswith(b"pong")

    serve(scenario)


def test_a_slow_but_steady_body_is_not_cut_off() -> None:
    async def scenario(port: int) -> None:
        body = b'{"a": "' + b"x" * 20 + b'"}'
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n")
        for i in range(0, len(body), 4):  # 0.2 s between pieces: under the 0.5 s stall limit
            writer.write(body[i:i + 4])
            await writer.drain()
            await asyncio.sleep(0.2)
        data = await asyncio.wait_for(reader.read(), WAIT_S)
        writer.close()
        assert parse(data)[0] == 200 and json.loads(parse(data)[2]) == {"a": "x" * 20}

    serve(scenario)


@pytest.mark.parametrize("name, request_bytes", [
    ("negative content-length", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("non-numeric content-length", b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("bad chunk size", b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
    ("header over 8 KB", b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
])
def test_unparseable_requests_get_a_json_400_and_one_log_line(
        name: str, request_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(port: int) -> None:
        error = openai_error(await exchange(port, request_bytes), 400)
        assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error"

    with caplog.at_level(logging.INFO):
        serve(scenario)
    ours = [r for r in caplog.records if r.name == "services.gateway.http_limits"]
    assert len(ours) == 1 and "\n" not in ours[0].getMessage()
    assert not [r for r in caplog.records if r.exc_info], "no traceback for a client's mistake"


def test_past_the_connection_cap_a_new_client_gets_a_json_503() -> None:
    limits = HttpLimits(header_timeout_s=5.0, body_timeout_s=5.0, keepalive_timeout_s=5.0, max_connections=3)

    async def scenario(port: int) -> None:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await asyncio.sleep(0.1)
        error = openai_error(await exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"), 503)
        assert error["code"] == "service_unavailable"
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.2)  # the server sees them go
        code, _, body = parse(await exchange(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert code == 200 and body == b"pong"

    serve(scenario, limits)


def test_raw_error_response_is_complete_http() -> None:
    raw = raw_error_response(APIError(503, "busy \ud800", code="x", headers={"Retry-After": "1"}))
    code, headers, body = parse(raw)
    assert code == 503 and headers["retry-after"] == "1" and int(headers["content-length"]) == len(body)
    assert json.loads(body)["error"]["message"] == "busy \ud800"


def test_a_recursion_error_in_a_handler_is_a_400_not_a_500() -> None:
    """Defence in depth for JSON nested inside a field (e.g. a schema sent as a string)."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry, Counter

    from services.gateway.app import error_middleware
    from services.gateway.context import CTX_KEY

    async def deep(request: web.Request) -> web.Response:
        json.loads("[" * 100_000 + "]" * 100_000)
        return web.Response(text="unreachable")

    async def main() -> None:
        app = web.Application(middlewares=[error_middleware])
        responses = Counter("r", "r", ["status"], registry=CollectorRegistry())
        app[CTX_KEY] = SimpleNamespace(metrics=SimpleNamespace(http_responses=responses))  # type: ignore[misc]
        app.router.add_post("/deep", deep)
        runner = GuardedAppRunner(app, limits=LIMITS, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        port = free_tcp_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            response = await exchange(port, b"POST /deep HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                            b"Connection: close\r\n\r\n{}")
            assert "nests too deeply" in openai_error(response, 400)["message"]
        finally:
            await runner.cleanup()

    asyncio.run(main())
