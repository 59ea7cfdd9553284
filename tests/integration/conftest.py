"""Fixtures that start the real topology: `xllm serve` as a subprocess (scheduler, workers and a
gateway as separate processes over ipc://), on a free port, in a short temporary run dir.

    @pytest.fixture(scope="module")
    def server(xllm_server_factory):
        return xllm_server_factory(workers=2)

`xllm_server_factory` is module-scoped so the tests of one module share a server (startup costs
seconds on 2 CPU cores); every server it started is stopped at the end of the module, and the stop
asserts that every process the launcher ever started has exited and no socket file is left.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from common.bus import free_tcp_port

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.25) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _die_with_parent() -> None:
    # If the test runner is killed, the launcher (and through it every service) goes too.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class XllmServer:
    """One running `xllm serve`: its URL, run dir, launcher process and log."""

    def __init__(self, proc: subprocess.Popen, base_url: str, run_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.base_url = base_url
        self.run_dir = run_dir
        self.log_path = log_path
        self.stopped = False
        self._seen: dict[int, psutil.Process] = {}

    # Test modules use it through the fixture (importing conftest by name is fragile).
    wait_until = staticmethod(wait_until)

    # ---- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout_s: float = 60.0) -> tuple[int, Any]:
        """(status, parsed JSON or text) of one HTTP request; never raises on 4xx/5xx."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode(errors="replace")

    def status(self) -> dict:
        """The gateway's `GET /status` (the scheduler's view of every instance, ~0.5 s old)."""
        code, body = self.request("GET", "/status", timeout_s=10)
        assert code == 200, body
        return body

    def instances(self) -> dict[str, dict]:
        return {inst["id"]: inst for inst in self.status()["instances"]}

    def model_id(self) -> str:
        code, body = self.request("GET", "/v1/models", timeout_s=10)
        assert code == 200, body
        return body["data"][0]["id"]

    def complete(self, prompt: str = "Hello", max_tokens: int = 2, **extra: Any) -> dict:
        body = {"model": self.model_id(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        code, reply = self.request("POST", "/v1/completions", body)
        assert code == 200, reply
        return reply

    # ---- processes ------------------------------------------------------------------------

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        """The launcher's live descendants; each one seen is remembered for the exit check."""
        try:
            found = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        for child in found:
            self._seen.setdefault(child.pid, child)
        return found

    def child_pid(self, module: str, *args: str) -> int:
        """The pid of the live child started as `python -m module ... args...`."""
        for child in self.children():
            try:
                cmdline = child.cmdline()
            except psutil.NoSuchProcess:
                continue
            if module in cmdline and all(arg in cmdline for arg in args):
                return child.pid
        raise LookupError(f"no child process runs {module} {args}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the launcher; assert that every process it started exited and no ipc file is left."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        self.children()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            for child in self._seen.values():
                _kill_quietly(child)
            raise AssertionError(f"the launcher did not stop within {STOP_TIMEOUT_S} s")
        survivors = [p for p in self._seen.values() if _alive(p)]
        for child in survivors:
            _kill_quietly(child)
        assert not survivors, f"processes left behind: {[(p.pid, _cmd(p)) for p in survivors]}"
        sockets = sorted(path.name for path in self.run_dir.glob("*.sock"))
        assert not sockets, f"ipc files left behind: {sockets}"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return code


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _cmd(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.Error:
        return "?"


def _kill_quietly(proc: psutil.Process) -> None:
    try:
        proc.kill()
    except psutil.Error:
        pass


def start_server(
    workers: int = 1, extra_args: tuple[str, ...] = (), timeout_s: float = STARTUP_TIMEOUT_S
) -> XllmServer:
    """Launch `xllm serve` and wait until `GET /health` is 200 with every worker it starts up."""
    # Short path: ipc socket paths are limited to 107 bytes.
    run_dir = Path(tempfile.mkdtemp(prefix="xsrv-", dir="/tmp"))
    log_path = run_dir / "serve.log"  # removed with the run dir when the server stops cleanly
    port = free_tcp_port()
    cmd = [
        sys.executable, "-m", "xllm.cli", "serve", "--workers", str(workers), "--port", str(port),
        "--run-dir", str(run_dir), "--kv-cache-memory", "64MiB", "--dtype", "float32", *extra_args,
    ]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, process_group=0,
                                preexec_fn=_die_with_parent)
    server = XllmServer(proc, f"http://127.0.0.1:{port}", run_dir, log_path)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"xllm serve exited with {proc.returncode}:\n{server.logs()[-4000:]}")
        server.children()
        try:
            with urllib.request.urlopen(server.base_url + "/health", timeout=2) as response:
                health = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False
        expected = health.get("workers_expected")
        return expected is None or health.get("workers_up", 0) >= expected

    try:
        wait_until(healthy, timeout_s, "xllm serve to become healthy", interval_s=0.5)
    except BaseException:
        try:
            server.stop()
        except AssertionError:
            pass
        raise
    return server


@pytest.fixture(scope="module")
def xllm_server_factory() -> Iterator[Callable[..., XllmServer]]:
    servers: list[XllmServer] = []

    def make(workers: int = 1, extra_args: tuple[str, ...] = ()) -> XllmServer:
        server = start_server(workers, extra_args)
        servers.append(server)
        return server

    yield make
    errors = []
    for server in servers:
        try:
            server.stop()
        except AssertionError as exc:
            errors.append(str(exc))
    assert not errors, errors


# ---- shared fixtures of the HTTP API test modules (a module overrides `server` for another layout)


@pytest.fixture(scope="module")
def server(xllm_server_factory) -> XllmServer:
    """`xllm serve` with one worker."""
    return xllm_server_factory(workers=1)


@pytest.fixture(scope="module")
def client(server):  # noqa: ANN001, ANN201 - the official openai client on `server`
    import openai

    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model_id(server) -> str:  # noqa: ANN001
    return server.model_id()
