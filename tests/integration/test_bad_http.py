"""Bad HTTP input against the real gateway: each gets the right status and an OpenAI-style error.

`xllm serve` (one worker with a deliberately small KV cache, so the worker itself refuses some
requests) plus two more gateway processes on the same scheduler: one with an API key and an
admission bound of one request, and one whose scheduler does not exist. After every bad input
the server still answers, and a normal request succeeds at the end.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from common.bus import free_tcp_port

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-test-gateway"
BIG = 8 * 1024 * 1024


class Gateways:
    """The launcher's gateway (`plain`) and two extra gateway processes started here."""

    def __init__(self, server) -> None:
        self.server = server
        self.plain = server.base_url
        self.keyed = f"http://127.0.0.1:{free_tcp_port()}"
        self.orphan = f"http://127.0.0.1:{free_tcp_port()}"
        self.procs: list[subprocess.Popen] = []

    def start(self, url: str, gateway_id: str, *args: str) -> None:
        self.procs.append(subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--port", url.rsplit(":", 1)[1], "--gateway-id", gateway_id,
             "--run-dir", str(self.server.run_dir), "--log-level", "ERROR", *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, process_group=0,
        ))

    def stop(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                assert proc.wait(timeout=20) == 0, f"{proc.args} exited with {proc.returncode}"
            except subprocess.TimeoutExpired:
                proc.kill()
                raise


@pytest.fixture(scope="module")
def gateways(xllm_server_factory):
    server = xllm_server_factory(workers=1, extra_args=("--kv-cache-memory", "8MiB"))
    gws = Gateways(server)
    try:
        gws.start(gws.keyed, "keyed", "--api-key", API_KEY, "--max-queue", "1")
        gws.start(gws.orphan, "orphan", "--frontend-addr", f"ipc://{server.run_dir}/nobody-here.sock")
        wait_http(gws.keyed, "/health")  # exempt from the key
        wait_http(gws.orphan)
        yield gws
    finally:
        gws.stop()


@pytest.fixture(scope="module")
def model_id(gateways: Gateways) -> str:
    async def get() -> str:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{gateways.plain}/v1/models") as response:
                return (await response.json())["data"][0]["id"]

    return asyncio.run(get())


async def _request(method: str, url: str, data: bytes | None = None, headers: dict | None = None):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers) as response:
            return response.status, dict(response.headers), await response.read()


def request(method: str, url: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    return asyncio.run(_request(method, url, data, hdrs))


def assert_openai_error(status: int, headers: dict, payload: bytes, expected: int,
                        param: str | None = None, fragment: str | None = None, code: str | None = None) -> dict:
    assert status == expected, payload
    assert headers.get("Content-Type", "").startswith("application/json")
    error = json.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and len(error["message"]) > 10
    assert error["type"] == ("invalid_request_error" if expected < 500 and expected not in (401, 429)
                             else error["type"])
    if param is not None:
        assert error["param"] == param, error
    if fragment is not None:
        assert fragment in error["message"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def wait_http(url: str, path: str = "/ping", timeout_s: float = 180.0) -> None:
    """Until `path` answers 200 (/ping: the server is up, even with no scheduler behind it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=2):
                return
        except OSError:
            assert time.monotonic() < deadline, f"{url} never answered"
            time.sleep(0.5)


def assert_still_serving(url: str, model: str) -> None:
    status, _, payload = request("POST", f"{url}/v1/completions",
                                 {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200, payload
    assert json.loads(payload)["usage"]["completion_tokens"] >= 1


def chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"

# (name, path, body or raw bytes, expected status, param, message fragment)
CASES = [
    ("malformed json", CHAT_PATH, b'{"model": "x", "messages": [', 400, None, "not valid JSON"),
    ("json array body", CHAT_PATH, b"[1, 2, 3]", 400, None, "JSON object"),
    ("json string body", COMPLETIONS_PATH, b'"prompt"', 400, None, "JSON object"),
    ("empty body", CHAT_PATH, b"", 400, None, "empty"),
    ("invalid utf-8", CHAT_PATH, b'{"model": "\xff\xfe\xfd"}', 400, None, "UTF-8"),
    ("NaN temperature", CHAT_PATH, b'{"model": "M", "messages": [], "temperature": NaN}', 400, None, "JSON"),
    ("missing model", CHAT_PATH, {"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "required"),
    ("missing messages", CHAT_PATH, {"model": "M"}, 400, "messages", "required"),
    ("empty messages", CHAT_PATH, {"model": "M", "messages": []}, 400, "messages", "at least one"),
    ("bad role", CHAT_PATH, {"model": "M", "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages[0].role", "robot"),
    ("messages not a list", CHAT_PATH, {"model": "M", "messages": {"role": "user"}}, 400, "messages", "array"),
    ("negative max_tokens", CHAT_PATH, "chat:max_tokens=-3", 400, "max_tokens", "at least 1"),
    ("zero max_tokens", COMPLETIONS_PATH, "completion:max_tokens=0", 400, "max_tokens", "at least 1"),
    ("string temperature", CHAT_PATH, "chat:temperature='warm'", 400, "temperature", "number"),
    ("top_p out of range", CHAT_PATH, "chat:top_p=1.5", 400, "top_p", "(0, 1]"),
    ("negative temperature", CHAT_PATH, "chat:temperature=-0.5", 400, "temperature", ">= 0"),
    ("huge n", CHAT_PATH, "chat:n=100000", 400, "n", "<= 16"),
    ("stop wrong type", CHAT_PATH, "chat:stop=5", 400, "stop", "string"),
    ("prompt wrong type", COMPLETIONS_PATH, "completion:prompt={'a': 1}", 400, "prompt", "must be"),
    ("token id out of vocab", COMPLETIONS_PATH, "completion:prompt=[1, 99999999]", 400, "prompt", "vocabulary"),
    ("prompt past context", COMPLETIONS_PATH, "completion:prompt=[1]*9000", 400, "prompt", "9000"),
    ("chat past context", CHAT_PATH, "chat:messages=[{'role':'user','content':'hello ' * 9000}]", 400,
     "messages", "context window"),
    ("suffix unsupported", COMPLETIONS_PATH, "completion:suffix='x'", 400, "suffix", "not supported"),
    ("image content", CHAT_PATH,
     "chat:messages=[{'role':'user','content':[{'type':'image_url','image_url':{'url':'x'}}]}]", 400,
     "messages[0].content", "text only"),
    ("top_logprobs without logprobs", CHAT_PATH, "chat:top_logprobs=3", 400, "top_logprobs", "logprobs"),
    ("min_tokens over max_tokens", CHAT_PATH, "chat:min_tokens=5", 400, "min_tokens", "max_tokens"),
    ("penalty out of range", COMPLETIONS_PATH, "completion:presence_penalty=9", 400, "presence_penalty",
     "[-2, 2]"),
]


def _body(spec, model: str):
    """Bodies are built against the real model id; 'chat:field=value' patches a valid body."""
    if isinstance(spec, bytes):
        return None, spec
    if isinstance(spec, str):
        kind, _, patch = spec.partition(":")
        name, _, expr = patch.partition("=")
        base = chat(model) if kind == "chat" else {"model": model, "prompt": "hi", "max_tokens": 2}
        base[name] = eval(expr)  # test-authored literals only
        return base, None
    return {**spec, **({"model": model} if spec.get("model") == "M" else {})}, None


@pytest.mark.parametrize("name, path, spec, status, param, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_openai_error(gateways, model_id, name, path, spec, status, param, fragment):
    body, raw = _body(spec, model_id)
    result = request("POST", f"{gateways.plain}{path}", body=body, raw=raw)
    assert_openai_error(*result, status, param=param, fragment=fragment)
    assert request("GET", f"{gateways.plain}/health")[0] == 200


def test_unknown_model_is_404(gateways, model_id):
    result = request("POST", f"{gateways.plain}{CHAT_PATH}", chat("gpt-17"))
    assert_openai_error(*result, 404, param="model", fragment="gpt-17", code="model_not_found")
    result = request("GET", f"{gateways.plain}/v1/models/gpt-17")
    assert_openai_error(*result, 404, code="model_not_found")


def test_unknown_route_and_wrong_method(gateways):
    assert_openai_error(*request("GET", f"{gateways.plain}/v2/everything"), 404, code="not_found")
    status, headers, payload = request("GET", f"{gateways.plain}{CHAT_PATH}")
    assert_openai_error(status, headers, payload, 405, code="method_not_allowed")
    assert "POST" in headers.get("Allow", "")


def test_body_too_large_is_413(gateways, model_id):
    big = json.dumps(chat(model_id, user="x" * (BIG + 10))).encode()
    assert_openai_error(*request("POST", f"{gateways.plain}{CHAT_PATH}", raw=big), 413, code="request_too_large")


def _raw_http(port: int, payload: bytes) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(payload)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_raw_socket_inputs(gateways, model_id):
    port = int(gateways.plain.rsplit(":", 1)[1])
    # a declared body far past the limit is refused before it is read
    status, body = _raw_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                   b"Content-Length: 999999999\r\nConnection: close\r\n\r\n{")
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    # invalid UTF-8 in a chunked body
    chunk = b'{"model": "\xc3\x28"}'
    status, body = _raw_http(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                   b"Connection: close\r\n\r\n" + f"{len(chunk):x}".encode() + b"\r\n" + chunk
                             + b"\r\n0\r\n\r\n")
    assert status == 400 and "UTF-8" in json.loads(body)["error"]["message"]
    # a JSON body sent as text/plain (curl -d) is tolerated
    good = json.dumps({"model": model_id, "prompt": "Hi", "max_tokens": 1}).encode()
    status, body = _raw_http(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                                   b"Content-Length: " + str(len(good)).encode() + b"\r\nConnection: close\r\n\r\n"
                             + good)
    assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 1


def test_worker_refusal_is_relayed(gateways, model_id):
    # Fits the context window, but not the worker's tiny KV cache: the worker says why.
    result = request("POST", f"{gateways.plain}{COMPLETIONS_PATH}",
                     {"model": model_id, "prompt": "Hi", "max_tokens": 4000})
    error = assert_openai_error(*result, 400)
    assert "KV" in error["message"] or "pages" in error["message"], error


def test_auth_admission_and_no_worker(gateways, model_id):
    keyed = gateways.keyed
    assert_openai_error(*request("POST", f"{keyed}{CHAT_PATH}", chat(model_id)), 401, code="invalid_api_key")
    assert_openai_error(*request("POST", f"{keyed}{CHAT_PATH}", chat(model_id),
                                 headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
    assert_openai_error(*request("GET", f"{keyed}/v1/models"), 401)
    assert request("GET", f"{keyed}/health")[0] == 200  # probes need no key
    assert request("GET", f"{keyed}/metrics")[0] == 200
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert request("GET", f"{keyed}/v1/models", headers=auth)[0] == 200
    # Anthropic's clients send the key as x-api-key
    assert request("GET", f"{keyed}/v1/models", headers={"x-api-key": API_KEY})[0] == 200
    assert_openai_error(*request("GET", f"{keyed}/v1/models", headers={"x-api-key": "wrong"}), 401)

    async def second_while_first_streams() -> tuple:
        body = {"model": model_id, "prompt": "Count", "max_tokens": 100, "ignore_eos": True, "stream": True}
        async with aiohttp.ClientSession(headers=auth) as session:
            async with session.post(f"{keyed}{COMPLETIONS_PATH}", json=body) as first:
                assert first.status == 200
                await first.content.readline()  # it is running: the one slot is taken
                async with session.post(f"{keyed}{COMPLETIONS_PATH}", json={**body, "stream": False}) as second:
                    return second.status, dict(second.headers), await second.read()

    status, headers, payload = asyncio.run(second_while_first_streams())
    assert_openai_error(status, headers, payload, 429, code="rate_limit_exceeded")
    assert headers.get("Retry-After")
    # the slot comes back once the gateway has seen the first client leave
    deadline = time.monotonic() + 20
    while True:
        status, _, payload = request("POST", f"{keyed}{COMPLETIONS_PATH}",
                                     {"model": model_id, "prompt": "Hi", "max_tokens": 1}, headers=auth)
        if status != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200, payload

    orphan = gateways.orphan  # it answers HTTP but never gets healthy
    status, headers, payload = request("GET", f"{orphan}/health")
    assert_openai_error(status, headers, payload, 503)
    status, headers, payload = request("POST", f"{orphan}{CHAT_PATH}", chat(model_id))
    assert_openai_error(status, headers, payload, 503, code="service_unavailable")
    assert headers.get("Retry-After")


def test_still_serving_after_everything(gateways, model_id):
    assert_still_serving(gateways.plain, model_id)
    assert request("GET", f"{gateways.plain}/health")[0] == 200
