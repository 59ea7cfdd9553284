"""Request bodies that used to crash the gateway (500s) are 400s naming the field; the scheduler
refuses unauthenticated FlipRequests over tcp."""

from __future__ import annotations

import asyncio
import json

import pytest

from common.protocol import FlipRequest
from common.service_config import ServiceAddresses
from services.gateway.httpio import error_response, json_response
from services.gateway.json_fields import MAX_JSON_DEPTH
from services.gateway.openai_schema import APIError, parse_json_body


def _bad(raw: bytes) -> APIError:
    with pytest.raises(APIError) as error:
        parse_json_body(raw)
    assert error.value.status == 400
    return error.value


def test_json_nested_100000_deep_is_a_400_not_a_recursion_error() -> None:
    error = _bad(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    assert error.code == "invalid_json" and str(MAX_JSON_DEPTH) in error.message


def test_nesting_just_past_the_cap_is_refused_and_at_the_cap_accepted() -> None:
    assert parse_json_body(b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}")
    _bad(b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}")
    _bad(b'{"a": ' + b'{"b": ' * MAX_JSON_DEPTH + b"1" + b"}" * MAX_JSON_DEPTH + b"}")


@pytest.mark.parametrize("raw, param", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
    (b'{"model": "m", "prompt": "x\\udfffy"}', "prompt"),
    (b'{"model": "m", "prompt": ["ok", "\\uDC00"]}', "prompt[1]"),
    (b'{"model": "m", "prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
    (b'{"model": "\\ud800"}', "model"),
    (b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
     "messages[0].content[0].text"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(raw: bytes, param: str) -> None:
    error = _bad(raw)
    assert error.param == param and error.code == "invalid_unicode" and "surrogate" in error.message


def test_a_surrogate_in_a_key_and_valid_pairs() -> None:
    assert "key" in _bad(b'{"\\ud800": 1}').message
    assert parse_json_body(b'{"prompt": "\\ud83d\\ude00"}') == {"prompt": "\U0001F600"}  # a real pair


def test_an_error_echoing_a_surrogate_still_encodes_as_json() -> None:
    response = error_response(APIError(404, "model '\ud800' not found", param="model"))
    assert response.status == 404 and response.content_type == "application/json"
    assert json.loads(response.body)["error"]["message"] == "model '\ud800' not found"
    assert json.loads(json_response({"x": "\udfff"}).body) == {"x": "\udfff"}


# ------------------------------------------------------------------------------- FlipRequest


def _scheduler(frontend: str, curve: bool):
    from services.scheduler.server import SchedulerServer

    addresses = ServiceAddresses(frontend=frontend, backend="tcp://127.0.0.1:1", control="tcp://127.0.0.1:2",
                                 curve=object() if curve else None)  # type: ignore[arg-type]
    server = SchedulerServer(addresses)
    orders: list[tuple[str, str, str]] = []

    async def flip(instance_id: str, role: str, reason: str) -> bool:
        orders.append((instance_id, role, reason))
        return True

    server.flip = flip  # type: ignore[method-assign]
    return server, orders


@pytest.mark.parametrize("frontend, curve, obeyed", [
    ("tcp://0.0.0.0:5555", False, False),  # anyone who reaches the port: refused
    ("tcp://0.0.0.0:5555", True, True),  # CurveZMQ: only authorised keys connect
    ("ipc:///run/xllm/frontend.sock", False, True),  # the run directory's file mode decides
])
def test_flip_request_over_tcp_needs_curve(frontend: str, curve: bool, obeyed: bool,
                                           caplog: pytest.LogCaptureFixture) -> None:
    server, orders = _scheduler(frontend, curve)
    asyncio.run(server._on_flip_request(b"op", FlipRequest(instance_id="worker-0", role="prefill")))
    assert orders == ([("worker-0", "prefill", "operator")] if obeyed else [])
    if not obeyed:
        assert any("refused a FlipRequest" in r.getMessage() for r in caplog.records)
