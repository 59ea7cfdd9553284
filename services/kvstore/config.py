"""The kvstore's settings: its flags, config-file keys and `xllm serve`'s `--kvstore-*` tier budgets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.codec import DEFAULT_MAX_MESSAGE_BYTES
from common.service_config import add_service_arguments
from common.settings import SettingsParser, format_bytes, parse_bytes, setting

__all__ = ["KvStoreConfig", "build_parser"]


def _size(default: str | int, help: str) -> Any:
    """A byte-size setting: `512MiB`, `4GiB` or a number on flags and in config files."""
    return setting(parse_bytes(default), help, parse=parse_bytes, show=format_bytes)


@dataclass
class KvStoreConfig:
    dir: str | None = setting(None, "directory of the SSD tier (LMDB); survives restarts", required=True)
    dram_bytes: int = _size("1GiB", "DRAM tier budget")
    ssd_bytes: int = _size("16GiB", "SSD tier budget")
    addr: str | None = setting(None, "request ROUTER address (default: <run-dir>/kvstore.sock)")
    events_addr: str | None = setting(None, "event PUB address (default: <run-dir>/kvstore-events.sock)")
    source_id: str = setting("kvstore", "`source` of its events and PUB topic")
    max_block_bytes: int = _size("16MiB", "largest block accepted")
    max_message_bytes: int = _size(DEFAULT_MAX_MESSAGE_BYTES, "largest bus message; clients must use the same")
    writebehind_bytes: int = _size("256MiB", "DRAM evictions waiting for the SSD beyond this are dropped")
    no_sync: bool = setting(False, "no fsync per LMDB commit: survives a process crash, not a power loss")
    namespace: list[str] | None = setting(None, "serve only this namespace (repeatable; default: any)")

    def problems(self) -> list[str]:
        """What makes this configuration unusable."""
        if self.dram_bytes < 0 or self.ssd_bytes < 0 or self.max_block_bytes <= 0:
            return ["sizes must be positive"]
        return []


def build_parser() -> SettingsParser:
    parser = SettingsParser(prog="python -m services.kvstore", description="xllm tiered KV store")
    add_service_arguments(parser)
    parser.add_settings(KvStoreConfig, "kvstore")
    return parser
