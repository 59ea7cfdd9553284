"""The launcher's restart policy: the first death restarts at once, repeated quick deaths back off,
and a restarted worker is announced once `/status` shows its new incarnation ready."""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from xllm.launcher import ChildSpec, Launcher, restart_delay


def test_restart_delay_is_zero_first_then_backs_off() -> None:
    assert [restart_delay(n) for n in range(7)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    assert restart_delay(50) == 30.0


def test_a_child_that_keeps_dying_is_restarted_at_once_then_with_backoff(tmp_path: Path, capsys) -> None:
    child = ChildSpec("worker-0", [sys.executable, "-c", "raise SystemExit(3)"])
    launcher = Launcher([child], tmp_path, remove_run_dir=False, health_url=None, stop_timeout_s=5,
                        poll_interval_s=0.02)
    assert launcher.run() == 1  # never served, five quick deaths in a row: it gives up
    err = capsys.readouterr().err
    delays = [line.rsplit("restarting in ", 1)[1] for line in err.splitlines() if "restarting in" in line]
    assert delays == ["0.0 s", "0.5 s", "1.0 s", "2.0 s"]
    assert "keeps failing at startup" in err


class _Status:
    """A fake gateway `/status`: worker-0 with the incarnation and readiness set by the test."""

    def __init__(self) -> None:
        self.instance = {"id": "worker-0", "incarnation": "old", "ready": True}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                body = json.dumps({"instances": [outer.instance]} if self.path == "/status"
                                  else {"status": "ok", "workers_up": 1, "workers_expected": 1}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def test_a_killed_worker_is_restarted_at_once_and_announced_when_it_serves(tmp_path: Path, capsys) -> None:
    status = _Status()
    try:
        child = ChildSpec("worker-0", [sys.executable, "-c", "import time; time.sleep(60)"])
        launcher = Launcher([child], tmp_path, remove_run_dir=False, health_url=status.url + "/health",
                            stop_timeout_s=5, poll_interval_s=0.02)
        runner = threading.Thread(target=launcher.run)
        runner.start()
        try:
            _wait(lambda: launcher.ready, 20, "the launcher to see the server ready")
            first = launcher.children[0].proc.pid
            launcher.children[0].proc.send_signal(signal.SIGKILL)
            _wait(lambda: len(launcher.children[0].pids) == 2, 20, "the restart")
            # The launcher reads the old incarnation just after starting the new process (an HTTP
            # call): from then on it waits for the new incarnation.
            _wait(lambda: launcher.children[0].awaited is not None, 5, "the launcher to await the new incarnation")
            time.sleep(0.3)  # the old incarnation still listed: not announced
            seen = capsys.readouterr().err
            assert "serving again" not in seen
            status.instance = {"id": "worker-0", "incarnation": "new", "ready": True}
            _wait(lambda: launcher.children[0].awaited is None, 20, "the announcement")
            assert launcher.children[0].pids[0] == first
        finally:
            launcher._stop_signal = signal.SIGTERM
            runner.join(30)
        err = seen + capsys.readouterr().err
        assert "worker-0 exited with signal 9; restarting in 0.0 s" in err
        assert "worker-0 serving again" in err
        assert launcher.children[0].proc is None  # stopped
    finally:
        status.server.shutdown()
