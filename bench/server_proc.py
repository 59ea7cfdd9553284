"""Running `xllm serve` as a benchmark's own subprocess: its flags, wait for it, stop it, format numbers."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

__all__ = ["add_server_arguments", "running_server", "wait_ready", "stop_server", "fmt"]

logger = logging.getLogger(__name__)


def add_server_arguments(p: argparse.ArgumentParser, port: int) -> None:
    """The flags of a bench that starts its own ``xllm serve`` on ``port``."""
    p.add_argument("--port", type=int, default=port)
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per request")
    p.add_argument("--serve-arg", action="append", help="extra flags for xllm serve (repeatable, split on spaces)")
    p.add_argument("--server-log", default=None, help="append the servers' output here (default: discard)")


@contextlib.contextmanager
def running_server(argv: list[str], url: str, args: argparse.Namespace, label: str) -> Iterator[subprocess.Popen]:
    """Start `xllm serve` (``argv``), wait until ``url`` is healthy, stop it on the way out.

    Its output goes to ``--server-log`` when given (else it is discarded); it runs in its own
    session so stopping it reaches every child it started.
    """
    print(f"[{label}] starting: {' '.join(argv[1:])}", flush=True)
    if args.server_log:
        os.makedirs(os.path.dirname(os.path.abspath(args.server_log)), exist_ok=True)
    log = open(args.server_log, "ab") if args.server_log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT if args.server_log else None,
                                start_new_session=True)
        try:
            wait_ready(proc, url, args.startup_timeout)
            yield proc
        finally:
            stop_server(proc)
    finally:
        if log is not subprocess.DEVNULL:
            log.close()


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Until `/health` says every worker `xllm serve` started is up (not just the first one)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xllm serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                health = json.loads(resp.read() or b"{}")
                expected = health.get("workers_expected")
                if resp.status == 200 and (expected is None or health.get("workers_up", 0) >= expected):
                    return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"xllm serve not ready at {url} after {timeout_s:g} s")


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM the launcher (it stops its children), SIGKILL its process group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
            return
        except subprocess.TimeoutExpired:
            logger.warning("xllm serve (pid %d) did not stop: killing its process group", proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what it started
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=10)


def fmt(v: float | None, spec: str = ".0f") -> str:
    """A number for a results table; "-" when there is none."""
    return "-" if v is None else format(v, spec)
