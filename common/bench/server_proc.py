"""Running `xllm serve` as a benchmark's own subprocess: wait for it, stop it, format numbers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

__all__ = ["wait_ready", "stop_server", "fmt"]

logger = logging.getLogger(__name__)


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xllm serve exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as resp:
                if resp.status == 200:
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
