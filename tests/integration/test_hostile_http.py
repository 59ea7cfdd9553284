"""A hostile HTTP client against the real gateway of `xllm serve`: every input that used to give a
500 (or a plain-text 400 with a traceback in the log, or a connection held open forever) gets an
OpenAI-style JSON error, logs at most one line, and the server keeps serving.

The timeouts and the connection cap are set through `xllm serve`'s own flags (short, so the test
is quick): that they reach the gateway is part of what is tested.
"""

from __future__ import annotations

import json
import socket
import time

import psutil
import pytest
from openai import OpenAI

pytestmark = pytest.mark.timeout(600)

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEEPALIVE_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 40
READ_S = 30.0  # bound on any single read; every expected answer or close comes far sooner


@pytest.fixture(scope="module")
def server(xllm_server_factory):
    return xllm_server_factory(workers=1, extra_args=(
        "--http-header-timeout", str(HEADER_TIMEOUT_S), "--http-body-timeout", str(BODY_TIMEOUT_S),
        "--http-keepalive-timeout", str(KEEPALIVE_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS),
    ))


@pytest.fixture(scope="module")
def port(server) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def model(server) -> str:
    return server.model_id()


def exchange(port: int, payload: bytes, timeout_s: float = READ_S) -> bytes:
    """Send raw bytes; everything the server sends until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(payload)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data


def post(port: int, path: str, body: bytes) -> bytes:
    return exchange(port, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


def openai_error(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert int(lines[0].split()[1]) == status, response[:500]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    assert headers.get("content-type", "").startswith("application/json"), response[:500]
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def new_log_lines(server, since: int) -> list[str]:
    return server.logs().splitlines()[since:]


# ------------------------------------------------------------------------ 500s that are 400s


def test_json_nested_100000_deep_is_a_400(port, model):
    body = b'{"model": "' + model.encode() + b'", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = openai_error(post(port, "/v1/chat/completions", body), 400)
    assert "nests deeper" in error["message"]


@pytest.mark.parametrize("path, template, param", [
    ("/v1/chat/completions", '{"model": "M", "messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content"),
    ("/v1/completions", '{"model": "M", "prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "M", "prompt": "hi", "max_tokens": 2, "stop": ["\\udc00"]}', "stop[0]"),
    ("/tokenize", '{"prompt": "a\\ud800b"}', "prompt"),
    ("/v1/chat/completions", '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, port, model, path, template, param):
    since = len(server.logs().splitlines())
    body = template.replace('"M"', json.dumps(model)).encode()
    error = openai_error(post(port, path, body), 400)
    assert error["param"] == param and "surrogate" in error["message"], error
    assert not [line for line in new_log_lines(server, since) if "Traceback" in line or "ERROR" in line]


# --------------------------------------------------------------- HTTP-level errors: JSON, one line


@pytest.mark.parametrize("name, raw", [
    ("negative content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n"),
    ("non-numeric content-length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"),
    ("bad chunk size", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\nabc\r\n0\r\n\r\n"),
    ("header over 8 KB", b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"),
])
def test_http_level_errors_are_openai_json_and_log_one_line(server, port, name, raw):
    since = len(server.logs().splitlines())
    error = openai_error(exchange(port, raw), 400)
    assert error["code"] == "invalid_http_request" and error["type"] == "invalid_request_error"
    lines = new_log_lines(server, since)
    assert len(lines) <= 1 and not [line for line in lines if "Traceback" in line], lines


# ------------------------------------------------------------------------------------ timeouts


def test_partial_headers_are_answered_408_and_closed(port):
    error = openai_error(exchange(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Ty"), 408)
    assert error["code"] == "request_timeout"


def test_a_body_that_stops_after_one_byte_is_answered_408_and_closed(port):
    raw = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n{"
    assert "body" in openai_error(exchange(port, raw), 408)["message"]


def test_an_idle_keep_alive_connection_is_closed(port):
    data = exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # keep-alive: returns once closed
    assert data.startswith(b"HTTP/1.1 200")


def _gateway_connections(server, port: int) -> int:
    gateway = psutil.Process(server.child_pid("services.gateway"))
    return sum(1 for c in gateway.net_connections("tcp") if c.laddr and c.laddr.port == port and c.raddr)


def test_slow_clients_are_shed_and_the_cap_answers_503(server, port, model):
    since = len(server.logs().splitlines())
    # Hold more connections than the cap: some silent, some mid-headers.
    held = []
    for i in range(MAX_CONNECTIONS + 10):
        sock = socket.create_connection(("127.0.0.1", port), timeout=READ_S)
        if i % 2:
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost:")
        held.append(sock)
    try:
        # The ones past the cap were answered 503 in the OpenAI shape (or are about to be).
        refused = 0
        for sock in held[MAX_CONNECTIONS:]:
            sock.sendall(b" x\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            if data.startswith(b"HTTP/1.1 503"):
                assert openai_error(data, 503)["code"] == "service_unavailable"
                refused += 1
        assert refused >= 5
        # The held ones are dropped by the header timeout: the gateway is back to (almost) no connections.
        server.wait_until(lambda: _gateway_connections(server, port) <= 2, 30, "slow clients to be shed")
    finally:
        for sock in held:
            sock.close()
    lines = new_log_lines(server, since)
    assert any("refusing connections" in line for line in lines)
    assert len(lines) < 30, lines  # rate-limited, not one line per connection
    # And a normal client is served, with the official OpenAI client.
    client = OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=120)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert reply.choices[0].message.content is not None


def test_still_serving_after_everything(server, model):
    time.sleep(0.1)
    assert server.complete(max_tokens=2)["usage"]["completion_tokens"] >= 1
