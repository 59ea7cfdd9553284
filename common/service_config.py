"""Service addresses and flags shared by every service process.

Every service takes `--run-dir DIR` (ipc:// addresses derived from it) or explicit
`--frontend-addr/--backend-addr/--control-addr` (e.g. tcp:// across hosts), plus `--config FILE`
(JSON or TOML with the same keys as the flags; flags given on the command line win) and
`--log-level`. See /tmp/services_contract.md and DESIGN.md §2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from common import bus
from common.bus import default_ipc_dir

__all__ = [
    "CurveKeys",
    "ServiceAddresses",
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


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    """The bus/config/logging flags every service accepts."""
    g = parser.add_argument_group("service")
    g.add_argument("--config", default=None, help="JSON or TOML file with the same keys as the flags (flags win)")
    g.add_argument("--run-dir", default=None,
                   help=f"directory of the ipc:// sockets (default: {default_run_dir()})")
    g.add_argument("--frontend-addr", default=None, help="scheduler frontend ROUTER address (overrides --run-dir)")
    g.add_argument("--backend-addr", default=None, help="scheduler backend ROUTER address (overrides --run-dir)")
    g.add_argument("--control-addr", default=None, help="scheduler control PUB address (overrides --run-dir)")
    g.add_argument("--tcp-host", default="127.0.0.1",
                   help="host for per-service tcp addresses when no run dir is used")
    g.add_argument("--curve-dir", default=None,
                   help="require CurveZMQ on the scheduler's sockets, keys from this directory (see `xllm keys`)")
    g.add_argument("--curve-key", default=None,
                   help="this peer's certificate name in --curve-dir (default: the service kind)")
    g.add_argument("--log-level", default="WARNING", help="DEBUG | INFO | WARNING | ERROR")


def addresses_from_args(args: argparse.Namespace, kind: str = "client") -> ServiceAddresses:
    """Explicit addresses win over the run dir; without either, the default run dir is used.

    ``kind`` names this peer's CurveZMQ certificate when ``--curve-dir`` is given and
    ``--curve-key`` is not.
    """
    curve_dir = getattr(args, "curve_dir", None)
    curve = CurveKeys(Path(curve_dir), getattr(args, "curve_key", None) or kind) if curve_dir else None
    run_dir = getattr(args, "run_dir", None)
    explicit = {
        "frontend": getattr(args, "frontend_addr", None),
        "backend": getattr(args, "backend_addr", None),
        "control": getattr(args, "control_addr", None),
    }
    tcp_host = getattr(args, "tcp_host", "127.0.0.1")
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


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON (`.json`) or TOML (`.toml`, anything else tried as TOML then JSON) file."""
    file = Path(path)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read config file {file}: {exc.strerror or exc}") from exc
    suffix = file.suffix.lower()
    parsers = [_parse_json] if suffix == ".json" else [_parse_toml] if suffix == ".toml" else [_parse_toml, _parse_json]
    errors = []
    for parse in parsers:
        try:
            data = parse(raw)
        except ValueError as exc:
            errors.append(str(exc))
            continue
        if not isinstance(data, dict):
            raise ValueError(f"config file {file} must hold a table/object at the top level")
        return data
    raise ValueError(f"config file {file} is not valid: {'; '.join(errors)}")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"JSON: {exc}") from exc


def _parse_toml(raw: bytes) -> Any:
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"TOML: {exc}") from exc


def _config_defaults(parser: argparse.ArgumentParser, config: dict[str, Any], source: str) -> dict[str, Any]:
    """Map config keys (flag names with or without dashes, or dests) onto parser defaults."""
    by_key: dict[str, argparse.Action] = {}
    for action in parser._actions:  # argparse has no public accessor for its actions
        if isinstance(action, argparse._HelpAction) or action.dest in ("config", argparse.SUPPRESS):
            continue
        by_key[action.dest] = action
        for option in action.option_strings:
            by_key[option.lstrip("-").replace("-", "_")] = action
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        norm = str(key).lstrip("-").replace("-", "_")
        action = by_key.get(norm)
        if action is None:
            raise ValueError(f"{source}: unknown setting {key!r}")
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction)):
            if not isinstance(value, bool):
                raise ValueError(f"{source}: setting {key!r} must be true or false")
            if norm == action.dest:
                defaults[action.dest] = value  # the dest itself, e.g. enable_prefix_cache = false
            elif value:
                defaults[action.dest] = action.const  # the flag's name, e.g. no_prefix_cache = true
            continue
        if value is not None and action.type is not None and not isinstance(value, (list, dict, bool)):
            try:
                value = action.type(value) if isinstance(value, str) else action.type(str(value))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{source}: setting {key!r}: {exc}") from exc
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"{source}: setting {key!r} must be one of {list(action.choices)}")
        defaults[action.dest] = value
    return defaults


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from `--config FILE` become defaults, so flags on the command line win."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**_config_defaults(parser, load_config_file(known.config), known.config))
        except ValueError as exc:
            parser.error(str(exc))
    return parser.parse_args(argv)


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
