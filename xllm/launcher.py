"""`xllm serve`: the single-box topology as separate processes, supervised.

Starts `python -m services.scheduler`, N workers (`python -m services.decode`) and one
`python -m services.gateway`, all talking over ipc:// sockets in one run directory. A child that
dies is reported and restarted with exponential backoff; SIGINT/SIGTERM stops every child
(SIGTERM, then SIGKILL after a timeout) and removes the run directory's socket files.

Each child runs in its own process group, so a terminal's Ctrl-C reaches only the launcher
(which then stops the children in order) and a stop signal reaches a child's own subprocesses
too; each child also gets SIGTERM from the kernel if the launcher itself dies (PDEATHSIG), so
not even a SIGKILLed launcher leaves orphans.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from common.bus import default_ipc_dir

__all__ = ["ChildSpec", "Launcher", "add_serve_arguments", "build_specs", "run_serve", "worker_threads"]

logger = logging.getLogger("xllm.launcher")

_PR_SET_PDEATHSIG = 1
# A child that ran at least this long before dying is restarted without accumulated backoff.
_STABLE_AFTER_S = 30.0
_BACKOFF_BASE_S = 0.5
_BACKOFF_MAX_S = 30.0
# Consecutive quick deaths of one child before the topology was ever ready that make us give up.
_MAX_STARTUP_FAILURES = 5
# Stands in for a signal number when the launcher decides to stop by itself.
_SELF_STOP = 0
# Exit status of argparse usage errors: restarting with the same flags cannot help.
_USAGE_ERROR = 2


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
        health_url: str | None = None,
        stop_timeout_s: float = 10.0,
        poll_interval_s: float = 0.2,
    ) -> None:
        self.children = [_Child(spec) for spec in specs]
        self.run_dir = run_dir
        self.remove_run_dir = remove_run_dir
        self.health_url = health_url
        self.stop_timeout_s = stop_timeout_s
        self.poll_interval_s = poll_interval_s
        self.ready = False
        self.exit_code = 0
        self._stop_signal: int | None = None

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
        if not self.ready and child.failures >= _MAX_STARTUP_FAILURES:
            # Never served yet and keeps dying (a bad model path, a taken port): give up loudly.
            logger.error("%s failed %d times in a row before the server became ready: stopping",
                         child.spec.name, child.failures)
            print(f"xllm: {child.spec.name} keeps failing at startup (last exit status {code}); see the log above",
                  file=sys.stderr, flush=True)
            self.exit_code = 1
            self._stop_signal = self._stop_signal or _SELF_STOP
            return
        delay = min(_BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** max(0, child.failures - 1))
        how = f"signal {-code}" if code < 0 else f"status {code}"
        logger.warning("%s (pid %d) exited with %s after %.1f s; restarting in %.1f s",
                       child.spec.name, child.pids[-1], how, lived, delay)
        print(f"xllm: {child.spec.name} exited with {how}; restarting in {delay:.1f} s", file=sys.stderr, flush=True)
        child.restart_at = now + delay

    def _poll_health(self) -> None:
        if self.ready or self.health_url is None:
            return
        try:
            with urllib.request.urlopen(self.health_url, timeout=0.5) as response:
                self.ready = response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return
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
            last_health = 0.0
            while self._stop_signal is None:
                now = time.monotonic()
                for child in self.children:
                    self._check(child, now)
                if now - last_health >= 0.5:
                    last_health = now
                    self._poll_health()
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


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------- flags


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The launcher's own flags (the engine flags are added by the caller)."""
    g = parser.add_argument_group("serve")
    g.add_argument("--workers", type=int, default=1,
                   help="number of mixed workers when no --prefill-workers/--decode-workers are given (default 1)")
    g.add_argument("--prefill-workers", type=int, default=0, help="workers starting in the prefill role")
    g.add_argument("--decode-workers", type=int, default=0, help="workers starting in the decode role")
    g.add_argument("--mixed-workers", type=int, default=None,
                   help="mixed workers beside the P/D pools (default: --workers without P/D pools, else 0)")
    g.add_argument("--pd-policy", choices=("static", "dynamic"), default="static",
                   help="static: roles stay as started; dynamic: the scheduler flips P/D workers to meet the SLOs")
    g.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="time-to-first-token target for --pd-policy")
    g.add_argument("--tpot-slo-ms", type=float, default=200.0, help="time-per-output-token target for --pd-policy")
    g.add_argument("--kvstore-dir", default=None,
                   help="start the kvstore (DRAM tier + LMDB SSD tier under DIR): workers offload evicted KV "
                        "pages to it and reload prefix hits from it")
    g.add_argument("--kvstore-dram", default="1GiB", help="kvstore DRAM tier budget (default 1GiB)")
    g.add_argument("--kvstore-ssd", default="16GiB", help="kvstore SSD tier budget (default 16GiB)")
    g.add_argument("--kvstore-timeout", type=float, default=None,
                   help="seconds an admission waits for the kvstore before computing the prefix itself (0.25)")
    g.add_argument("--kv-transfer-timeout", type=float, default=None,
                   help="seconds a prefill worker waits on a decode peer before trying the next one")
    g.add_argument("--host", default="127.0.0.1", help="HTTP host of the gateway (default 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port of the gateway (default 8000)")
    g.add_argument("--run-dir", default=None, help="directory for the ipc sockets (default: a fresh temporary one)")
    g.add_argument("--api-key", default=None, help="require this API key (Authorization: Bearer ...)")
    g.add_argument("--max-queue", type=int, default=None, help="gateway admission queue bound")
    g.add_argument("--stop-timeout", type=float, default=10.0, help="seconds to wait for children on stop")
    # SUPPRESS: the top-level `xllm --log-level` stays in effect unless given again here.
    g.add_argument("--log-level", default=argparse.SUPPRESS, help="log level of the launcher and every service")


def worker_threads(requested: int | None, workers: int) -> int:
    """Torch threads per worker: as asked, else the CPUs this process may use split evenly."""
    if requested:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def engine_flags(args: argparse.Namespace, skip: tuple[str, ...] = ("num_threads",)) -> list[str]:
    """The engine flags that differ from their defaults, as command-line arguments again."""
    from xllm.cli import add_engine_arguments

    reference = argparse.ArgumentParser(add_help=False)
    add_engine_arguments(reference)
    argv: list[str] = []
    for action in reference._actions:  # argparse has no public accessor for its actions
        if not action.option_strings or action.dest in skip or not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if value == action.default:
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
            argv.append(action.option_strings[0])
        else:
            argv += [action.option_strings[0], str(value)]
    return argv


def worker_roles(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(instance id, starting role) of every worker `xllm serve` starts."""
    prefill, decode = getattr(args, "prefill_workers", 0) or 0, getattr(args, "decode_workers", 0) or 0
    mixed = getattr(args, "mixed_workers", None)
    if not prefill and not decode:
        # The single-box default: mixed workers named as before P/D pools existed.
        return [(f"worker-{i}", "mixed") for i in range(mixed if mixed is not None else args.workers)]
    roles = [(f"prefill-{i}", "prefill") for i in range(prefill)]
    roles += [(f"decode-{i}", "decode") for i in range(decode)]
    roles += [(f"mixed-{i}", "mixed") for i in range(mixed or 0)]
    return roles


def build_specs(args: argparse.Namespace, run_dir: Path, log_level: str) -> list[ChildSpec]:
    py = sys.executable
    common = ["--run-dir", str(run_dir), "--log-level", log_level]
    scheduler = [py, "-m", "services.scheduler", *common, "--pd-policy", getattr(args, "pd_policy", "static")]
    for flag in ("ttft_slo_ms", "tpot_slo_ms"):
        if getattr(args, flag, None) is not None:
            scheduler += ["--" + flag.replace("_", "-"), str(getattr(args, flag))]
    kvstore_dir = getattr(args, "kvstore_dir", None)
    specs = []
    if kvstore_dir:
        scheduler.append("--kvstore")
        specs.append(ChildSpec("kvstore", [
            py, "-m", "services.kvstore", *common, "--dir", str(Path(kvstore_dir).absolute()),
            "--dram-bytes", args.kvstore_dram, "--ssd-bytes", args.kvstore_ssd,
        ]))
    specs.append(ChildSpec("scheduler", scheduler))
    roles = worker_roles(args)
    threads = worker_threads(args.num_threads, len(roles))
    for instance_id, role in roles:
        argv = [py, "-m", f"services.{'prefill' if role == 'prefill' else 'decode'}", *common,
                "--instance-id", instance_id, "--role", role, "--threads", str(threads), *engine_flags(args)]
        if getattr(args, "kv_transfer_timeout", None):
            argv += ["--kv-transfer-timeout", str(args.kv_transfer_timeout)]
        if kvstore_dir:
            argv.append("--kvstore")
            if getattr(args, "kvstore_timeout", None):
                argv += ["--kvstore-timeout", str(args.kvstore_timeout)]
        specs.append(ChildSpec(instance_id, argv))
    gateway = [py, "-m", "services.gateway", "--host", args.host, "--port", str(args.port), *common]
    if args.model:
        gateway += ["--model", args.model]
    if args.api_key:
        gateway += ["--api-key", args.api_key]
    if args.max_queue is not None:
        gateway += ["--max-queue", str(args.max_queue)]
    specs.append(ChildSpec("gateway", gateway))
    return specs


def _make_run_dir(requested: str | None) -> tuple[Path, bool]:
    if requested:
        path = Path(requested).absolute()
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        return path, False
    base = default_ipc_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="serve-", dir=base)), True


def run_serve(args: argparse.Namespace) -> int:
    """Entry of `xllm serve`."""
    log_level = str(getattr(args, "log_level", "WARNING")).upper()
    logging.getLogger().setLevel(log_level)
    counts = (args.workers, args.prefill_workers, args.decode_workers, args.mixed_workers or 0)
    if min(counts) < 0 or args.workers < 1:
        print("xllm serve: worker counts must be >= 0 (and --workers >= 1)", file=sys.stderr)
        return 2
    if bool(args.prefill_workers) != bool(args.decode_workers) and not args.mixed_workers:
        print("xllm serve: P/D disaggregation needs --prefill-workers and --decode-workers (or --mixed-workers)",
              file=sys.stderr)
        return 2
    if not 0 < args.port < 65536:
        print("xllm serve: --port must be in 1..65535", file=sys.stderr)
        return 2
    run_dir, created = _make_run_dir(args.run_dir)
    # The longest socket name is the gateway's tokens-<id>.sock; sun_path holds 107 bytes.
    if len(os.fsencode(run_dir)) > 60:
        print(f"xllm serve: --run-dir {run_dir} is too long for ipc socket paths (max 60 bytes)", file=sys.stderr)
        return 2
    specs = build_specs(args, run_dir, log_level)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "", "::") else args.host
    url = f"http://{host}:{args.port}"
    launcher = Launcher(specs, run_dir, remove_run_dir=created, health_url=f"{url}/health",
                        stop_timeout_s=args.stop_timeout)
    launcher.install_signal_handlers()
    model = args.model or "the default model (SmolLM2-135M-Instruct)"
    roles = ", ".join(f"{sum(r == role for _, r in worker_roles(args))} {role}"
                      for role in ("prefill", "decode", "mixed") if any(r == role for _, r in worker_roles(args)))
    print(f"xllm: serving {model} at {url} with workers: {roles}; run dir {run_dir}", flush=True)
    code = launcher.run()
    print("xllm: stopped", flush=True)
    return code
