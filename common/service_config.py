"""Service addresses and the settings shared by every service process.

Every service takes `--run-dir DIR` (ipc:// addresses derived from it) or explicit
`--frontend-addr/--backend-addr/--control-addr` (e.g. tcp:// across hosts), plus `--config FILE`
(JSON or TOML with the same keys as the flags; flags given on the command line win) and
`--log-level`: the fields of `ServiceConfig`, turned into flags by `common.settings`. The bus
itself is DESIGN.md §2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Sequence

from common import bus
from common.bus import default_ipc_dir
from common.settings import SettingsParser, from_namespace, load_config_file, setting

__all__ = [
    "CurveKeys",
    "ServiceAddresses",
    "ServiceConfig",
    "DEFAULT_RUN_DIR_NAME",
    "add_service_arguments",
    "addresses_from_args",
    "load_config_file",
    "parse_args_with_config",
    "setup_logging",
    "safe_name",
    "exit_process",
]

# Used when a service is started on its own without --run-dir or explicit addresses, so that
# `python -m services.scheduler` and `python -m services.decode` with no flags find each other.
DEFAULT_RUN_DIR_NAME = "default"

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def safe_name(name: str) -> str:
    """A string usable inside a socket file name (ids come from flags and peers)."""
    cleaned = _SAFE_NAME.sub("_", name)
    return cleaned[:64] or "_"


@dataclass(frozen=True)
class CurveKeys:
    """CurveZMQ keys for the scheduler's sockets, from one directory (`xllm keys DIR` makes it).

    ``scheduler.key`` / ``scheduler.key_secret`` is the scheduler's certificate; ``authorized/``
    holds the public keys of the peers it accepts; ``<name>.key_secret`` is a peer's own
    certificate. A peer whose public key is not authorized never gets a message through, so
    it cannot register or submit.
    """

    directory: Path
    name: str = "client"

    def make_server(self, sock) -> None:
        bus.configure_curve_server(sock, self.directory / "scheduler.key_secret", self.directory / "authorized")

    def make_client(self, sock) -> None:
        bus.configure_curve_client(sock, self.directory / f"{self.name}.key_secret",
                                   self.directory / "scheduler.key")


@dataclass(frozen=True)
class ServiceAddresses:
    """Where the scheduler's sockets live, and how per-gateway / per-worker addresses are made."""

    frontend: str  # scheduler ROUTER; gateways connect DEALER
    backend: str  # scheduler ROUTER; workers connect DEALER
    control: str  # scheduler PUB; workers connect SUB
    run_dir: str | None = None  # set when the addresses are ipc files under one directory
    # Host used for per-service tcp addresses when there is no run dir (tcp deployments).
    tcp_host: str = "127.0.0.1"
    curve: CurveKeys | None = None  # when set, the scheduler's sockets require CurveZMQ

    @classmethod
    def from_run_dir(cls, run_dir: str | os.PathLike) -> ServiceAddresses:
        base = Path(run_dir).absolute()
        return cls(
            frontend=f"ipc://{base / 'frontend.sock'}",
            backend=f"ipc://{base / 'backend.sock'}",
            control=f"ipc://{base / 'control.sock'}",
            run_dir=str(base),
        )

    def tokens_addr(self, gateway_id: str) -> str:
        """The address a gateway binds its tokens PULL on (bind may resolve a tcp port)."""
        if self.run_dir is not None:
            return f"ipc://{Path(self.run_dir) / f'tokens-{safe_name(gateway_id)}.sock'}"
        return f"tcp://{self.tcp_host}:0"

    def kv_addr(self, instance_id: str) -> str:
        """The address a worker binds its kv ROUTER on (bind may resolve a tcp port)."""
        if self.run_dir is not None:
            return f"ipc://{Path(self.run_dir) / f'kv-{safe_name(instance_id)}.sock'}"
        return f"tcp://{self.tcp_host}:0"

    def ipc_files(self) -> list[Path]:
        """Socket files currently present in the run dir (for cleanup and tests)."""
        if self.run_dir is None:
            return []
        return sorted(Path(self.run_dir).glob("*.sock"))


def default_run_dir() -> Path:
    return default_ipc_dir() / DEFAULT_RUN_DIR_NAME


# ------------------------------------------------------------------------------------ flags


@dataclass
class ServiceConfig:
    """Where the scheduler's sockets are, CurveZMQ keys and logging: every service's settings."""

    run_dir: str | None = setting(None, f"directory of the ipc:// sockets (default: {default_run_dir()})")
    frontend_addr: str | None = setting(None, "scheduler frontend ROUTER address (overrides --run-dir)")
    backend_addr: str | None = setting(None, "scheduler backend ROUTER address (overrides --run-dir)")
    control_addr: str | None = setting(None, "scheduler control PUB address (overrides --run-dir)")
    tcp_host: str = setting("127.0.0.1", "host for per-service tcp addresses when no run dir is used")
    curve_dir: str | None = setting(
        None, "require CurveZMQ on the scheduler's sockets, keys from this directory (see `xllm keys`)")
    curve_key: str | None = setting(None, "this peer's certificate name in --curve-dir (default: the service kind)")
    log_level: str = setting("WARNING", "DEBUG | INFO | WARNING | ERROR")


def add_service_arguments(parser: SettingsParser) -> None:
    """`--config` and the `ServiceConfig` flags every service accepts."""
    parser.add_config_option("service")
    parser.add_settings(ServiceConfig, "service")


def addresses_from_args(args: argparse.Namespace | ServiceConfig, kind: str = "client") -> ServiceAddresses:
    """Explicit addresses win over the run dir; without either, the default run dir is used.

    ``kind`` names this peer's CurveZMQ certificate when ``--curve-dir`` is given and
    ``--curve-key`` is not.
    """
    config = args if isinstance(args, ServiceConfig) else from_namespace(ServiceConfig, args)
    curve = CurveKeys(Path(config.curve_dir), config.curve_key or kind) if config.curve_dir else None
    run_dir = config.run_dir
    explicit = {"frontend": config.frontend_addr, "backend": config.backend_addr, "control": config.control_addr}
    tcp_host = config.tcp_host
    if all(explicit.values()) and run_dir is None:
        return ServiceAddresses(**explicit, tcp_host=tcp_host, curve=curve)
    base = ServiceAddresses.from_run_dir(run_dir or default_run_dir())
    overrides = {key: value for key, value in explicit.items() if value}
    return ServiceAddresses(
        frontend=overrides.get("frontend", base.frontend),
        backend=overrides.get("backend", base.backend),
        control=overrides.get("control", base.control),
        run_dir=base.run_dir,
        tcp_host=tcp_host if overrides else base.tcp_host,
        curve=curve,
    )


# ------------------------------------------------------------------------------ config files


def parse_args_with_config(parser: SettingsParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from `--config FILE` become defaults, so flags on the command line win."""
    return parser.parse_args_with_config(argv)


def setup_logging(level: str, service: str) -> None:
    """Quiet by default (WARNING); each line names the service and pid, since the launcher's
    children share one stderr."""
    numeric = logging.getLevelName(str(level).upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(
        level=numeric,
        format=f"%(asctime)s %(levelname)s [{service} {os.getpid()}] %(name)s: %(message)s",
        force=True,
    )


def exit_process(code: int) -> NoReturn:
    """Leave a service process at once after its own clean shutdown.

    Interpreter finalization (garbage-collecting torch, tokenizers and module state) takes
    seconds on a busy machine and does nothing useful for a process that already closed its
    sockets, so stop the ZeroMQ context (waits for queued messages up to their linger) and exit.
    """
    import zmq
    import zmq.asyncio

    try:
        # Context.instance() is per class: the asyncio one is not zmq.Context's. Only look.
        for cls in (zmq.asyncio.Context, zmq.Context):
            context = vars(cls).get("_instance")
            if context is not None and not context.closed:
                context.destroy(linger=500)
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
