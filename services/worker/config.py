"""The worker's settings: with the engine's and the shared service settings, the flags of
`python -m services.prefill` / `python -m services.decode`."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.config import add_engine_arguments
from common.service_config import add_service_arguments
from common.settings import SettingsParser, setting
from services.prefill.kv_sender import DEFAULT_TRANSFER_TIMEOUT_S
from services.worker.role_state import ROLES
from services.worker.worker import DEFAULT_HEARTBEAT_INTERVAL_S, DEFAULT_STEP_WATCHDOG_S

__all__ = ["WorkerConfig", "build_parser"]


@dataclass
class WorkerConfig:
    instance_id: str | None = setting(None, "this worker's id (default: generated)")
    # None: the role of the entry point (`services.prefill` or `services.decode`).
    role: str | None = setting(None, "starting role; the scheduler may flip it (default: the entry point's, "
                                     "prefill for services.prefill, decode for services.decode)", choices=ROLES)
    kv_addr: str | None = setting(None, "address of the kv ROUTER (default: from --run-dir)")
    advertise_host: str | None = setting(
        None, "host peers use to reach a tcp kv socket (default: the hostname when bound on 0.0.0.0)")
    heartbeat_interval: float = setting(DEFAULT_HEARTBEAT_INTERVAL_S, "seconds between heartbeats")
    kv_transfer_timeout: float = setting(
        DEFAULT_TRANSFER_TIMEOUT_S, "seconds a prefill worker waits on a decode peer during a KV hand-off "
                                    "before trying the next one")
    kvstore: bool = setting(
        False, "offload evicted KV pages to the kvstore of this --run-dir and reload prefix hits from it")
    kvstore_addr: str | None = setting(None, "the kvstore's ROUTER address (implies --kvstore)")
    kvstore_timeout: float = setting(
        0.25, "seconds an admission waits for the kvstore before computing the prefix itself")
    step_watchdog_s: float = setting(
        DEFAULT_STEP_WATCHDOG_S, "seconds one engine step may run before the worker exits (status 86) to be "
                                 "replaced; 0 disables the watchdog")

    def problems(self) -> list[str]:
        """What makes this configuration unusable, as flag-named messages."""
        if self.heartbeat_interval <= 0 or self.kv_transfer_timeout <= 0:
            return ["--heartbeat-interval and --kv-transfer-timeout must be > 0"]
        if self.step_watchdog_s < 0:
            return ["--step-watchdog-s must be >= 0 (0: off)"]
        return []


def build_parser(role: str) -> SettingsParser:
    parser = SettingsParser(prog=f"python -m services.{role}", description=f"xllm worker ({role} role)")
    add_engine_arguments(parser)
    add_service_arguments(parser)
    parser.add_settings(WorkerConfig, "worker")
    return parser
