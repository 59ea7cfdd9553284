"""Process supervision for `xllm serve`: start the children, restart the ones that die, stop all.

`xllm.serve` decides which children (`python -m services.scheduler`, the workers, the gateway,
maybe the kvstore, all talking over ipc:// sockets in one run directory) and their command lines;
this module runs them. A child that dies is reported and restarted at once; only repeated quick
deaths back off exponentially. A restarted worker is watched on the gateway's `/status` until its
new incarnation is registered and ready, and that is said on stderr ("worker-0 serving again").
SIGINT/SIGTERM stops every child (SIGTERM, then SIGKILL after a timeout) and removes the run
directory's socket files.

Each child runs in its own process group, so a terminal's Ctrl-C reaches only the launcher
(which then stops the children in order) and a stop signal reaches a child's own subprocesses
too; each child also gets SIGTERM from the kernel if the launcher itself dies (PDEATHSIG), so
not even a SIGKILLed launcher leaves orphans.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ChildSpec", "Launcher", "restart_delay"]

logger = logging.getLogger("xllm.launcher")

_PR_SET_PDEATHSIG = 1
# A child that ran at least this long before dying is restarted without accumulated backoff.
_STABLE_AFTER_S = 30.0
_BACKOFF_BASE_S = 0.5  # after the second quick death in a row; the first restarts at once
_BACKOFF_MAX_S = 30.0
# Consecutive quick deaths of one child before the topology was ever ready that make us give up.
_MAX_STARTUP_FAILURES = 5
# Stands in for a signal number when the launcher decides to stop by itself.
_SELF_STOP = 0
# Exit status of argparse usage errors: restarting with the same flags cannot help.
_USAGE_ERROR = 2
# Children that are not engine workers (their names in `xllm.serve`).
_NOT_WORKERS = frozenset({"gateway", "scheduler", "kvstore"})
# How often `/status` is read while a restarted worker is awaited.
_RESTART_POLL_S = 0.25


def restart_delay(failures: int) -> float:
    """Seconds before restarting a child after its ``failures``-th quick death in a row (0: it ran
    long enough): the first death restarts at once, repeated quick deaths back off."""
    if failures <= 1:
        return 0.0
    return min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (failures - 2))


@dataclass
class ChildSpec:
    name: str
    argv: list[str]


@dataclass
class _Child:
    spec: ChildSpec
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    failures: int = 0  # consecutive short-lived runs
    restart_at: float | None = None
    restarts: int = 0
    pids: list[int] = field(default_factory=list)
    # A restarted worker not yet seen serving: (when it died, the incarnation /status showed then).
    awaited: tuple[float, str | None] | None = None


def _child_preexec(parent_pid: int) -> None:
    """In the child before exec: die with the launcher (Linux), even if it is SIGKILLed."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class Launcher:
    def __init__(
        self,
        specs: list[ChildSpec],
        run_dir: Path,
        remove_run_dir: bool,
        health_url: str | None,
        stop_timeout_s: float,  # `xllm serve --stop-timeout` (ServeConfig.stop_timeout)
        poll_interval_s: float = 0.2,
    ) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.run_dir = run_dir
        self.remove_run_dir = remove_run_dir
        self.health_url = health_url
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.serving = False  # /health answered 200: some worker serves
        self.ready = False  # and every worker the scheduler expects is up
        self.exit_code = 0
        self._stop_signal: int | None = None
        self.status_url = health_url.rsplit("/health", 1)[0] + "/status" if health_url else None

    # ---- signals ----------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame) -> None:
        self._stop_signal = signum

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    # ---- children ---------------------------------------------------------------------

    def _start(self, child: _Child) -> None:
        logger.info("starting %s: %s", child.spec.name, " ".join(child.spec.argv))
        parent = os.getpid()
        child.proc = subprocess.Popen(
            child.spec.argv, process_group=0, preexec_fn=lambda: _child_preexec(parent), close_fds=True,
        )
        child.pids.append(child.proc.pid)
        child.started_at = time.monotonic()
        child.restart_at = None

    def _check(self, child: _Child, now: float) -> None:
        if child.proc is None:
            if child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._start(child)
            return
        code = child.proc.poll()
        if code is None:
            return
        lived = now - child.started_at
        child.proc = None
        _kill_group(child.pids[-1], signal.SIGKILL)  # anything the dead child left behind
        if code == _USAGE_ERROR and lived < _STABLE_AFTER_S:
            logger.error("%s exited with status %d (bad flags?): stopping", child.spec.name, code)
            self.exit_code = 1
            self._stop_signal = self._stop_signal or _SELF_STOP
            return
        child.failures = 0 if lived >= _STABLE_AFTER_S else child.failures + 1
        if not self.serving and child.failures >= _MAX_STARTUP_FAILURES:
            # Never served yet and keeps dying (a bad model path, a taken port): give up loudly.
            logger.error("%s failed %d times in a row before the server became ready: stopping",
                         child.spec.name, child.failures)
            print(f"xllm: {child.spec.name} keeps failing at startup (last exit status {code}); see the log above",
                  file=sys.stderr, flush=True)
            self.exit_code = 1
            self._stop_signal = self._stop_signal or _SELF_STOP
            return
        delay = restart_delay(child.failures)
        how = f"signal {-code}" if code < 0 else f"status {code}"
        logger.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                       child.spec.name, child.pids[-1], how, lived, delay)
        print(f"xllm: {child.spec.name} exited with {how}; restarting in {delay:.1f} s", file=sys.stderr, flush=True)
        child.restart_at = now + delay
        if delay == 0:
            child.restarts += 1
            self._start(child)  # not one poll interval later: every tenth of a second counts here
        if child.spec.name not in _NOT_WORKERS and self.status_url is not None:
            # Read after the restart began (the new process needs seconds to register).
            child.awaited = (now, self._incarnation_of(child.spec.name))

    def _status_instances(self, timeout_s: float) -> list[dict] | None:
        try:
            with urllib.request.urlopen(self.status_url, timeout=timeout_s) as response:
                status = json.loads(response.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        instances = status.get("instances") if isinstance(status, dict) else None
        return [i for i in instances if isinstance(i, dict)] if isinstance(instances, list) else None

    def _incarnation_of(self, name: str) -> str | None:
        """The incarnation `/status` lists for worker ``name`` now (None: not listed)."""
        for inst in self._status_instances(0.5) or []:
            if inst.get("id") == name:
                return inst.get("incarnation")
        return None

    def _poll_restarted(self, now: float) -> None:
        """Say when each restarted worker serves again: a new incarnation, registered and ready."""
        awaited = [c for c in self.children if c.awaited is not None]
        if not awaited:
            return
        instances = {i.get("id"): i for i in self._status_instances(0.5) or []}
        for child in awaited:
            died_at, old = child.awaited
            inst = instances.get(child.spec.name)
            if inst is None or not inst.get("ready") or inst.get("incarnation") in (None, old):
                continue
            child.awaited = None
            logger.info("%s serving again %.1f s after it died", child.spec.name, now - died_at)
            print(f"xllm: {child.spec.name} serving again ({now - died_at:.1f} s after it died)",
                  file=sys.stderr, flush=True)

    def _poll_health(self) -> None:
        if self.ready or self.health_url is None:
            return
        try:
            with urllib.request.urlopen(self.health_url, timeout=0.5) as response:
                self.serving = self.serving or response.status == 200
                body = response.read()
        except (urllib.error.URLError, OSError, ValueError):
            return
        self.ready = self.serving and _all_workers_up(body)
        if self.ready:
            base = self.health_url.rsplit("/health", 1)[0]
            print(f"xllm: ready at {base}", flush=True)

    def run(self) -> int:
        """Start everything, supervise until a stop signal, stop everything; returns the exit code."""
        try:
            for child in self.children:
                if self._stop_signal is not None:
                    break
                self._start(child)
            last_health = last_restart_poll = 0.0
            while self._stop_signal is None:
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
                if now - last_health >= 0.5:
                    last_health = now
                    self._poll_health()
                if now - last_restart_poll >= _RESTART_POLL_S:
                    last_restart_poll = now
                    self._poll_restarted(now)
                time.sleep(self.poll_interval_s)
            if self._stop_signal != _SELF_STOP:
                logger.info("received %s: stopping", signal.Signals(self._stop_signal).name)
        finally:
            self.stop()
            self.cleanup()
        return self.exit_code

    def stop(self) -> None:
        """SIGTERM every child's process group, wait, then SIGKILL what is left."""
        # The gateway first (no new requests), the scheduler last (workers deregister with it).
        order = sorted(self.children, key=lambda c: {"gateway": 0, "scheduler": 2, "kvstore": 3}.get(c.spec.name, 1))
        running = [c for c in order if c.proc is not None and c.proc.poll() is None]
        for child in running:
            _kill_group(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        for child in running:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %.0f s: killing it", child.spec.name, self.stop_timeout_s)
        for child in self.children:
            # Whole groups, dead leaders included: nothing a child started may survive it.
            for pid in child.pids:
                _kill_group(pid, signal.SIGKILL)
            if child.proc is not None:
                try:
                    child.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    logger.error("%s (pid %d) survived SIGKILL", child.spec.name, child.proc.pid)
                child.proc = None

    def cleanup(self) -> None:
        """Remove socket files a killed child could not remove itself (and our own run dir)."""
        if self.remove_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            return
        for path in self.run_dir.glob("*.sock"):
            try:
                path.unlink()
            except OSError:
                pass


def _all_workers_up(body: bytes) -> bool:
    """Whether a 200 `/health` body says every expected worker is up (true when it names no
    expected count: a gateway or scheduler that does not report one has nothing to wait for)."""
    try:
        health = json.loads(body)
    except ValueError:
        return True
    if not isinstance(health, dict):
        return True
    up, expected = health.get("workers_up"), health.get("workers_expected")
    if not isinstance(expected, int) or isinstance(expected, bool):
        return True
    return isinstance(up, int) and up >= expected


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
