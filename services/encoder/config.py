"""The encoder service's settings: with the engine's model/device flags and the shared service
settings, the flags of `python -m services.encoder` (and what `xllm serve` passes it)."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.config import EngineConfig
from common.service_config import add_service_arguments
from common.settings import SettingsParser, format_bytes, parse_bytes, setting

__all__ = ["EncoderConfig", "ENGINE_SETTINGS", "build_parser"]

# The engine settings an encoder uses: which model, in what dtype, on which device.
ENGINE_SETTINGS = ("model", "dtype", "device", "num_threads", "weight_cache", "weight_cache_dir")


@dataclass
class EncoderConfig:
    instance_id: str | None = setting(None, "this encoder's id (default: generated)")
    colocated_with: str = setting(
        "", "the worker this encoder shares a device with (ED-P: a decode worker's id); empty: a standalone "
            "encoder (E-P-D)")
    max_batch_images: int = setting(16, "images the vision tower encodes in one batch at most")
    batch_wait_ms: float = setting(2.0, "how long a batch waits for more images before it runs")
    embedding_cache_bytes: int = setting(parse_bytes("256MiB"), "memory for cached image embeddings (e.g. 1GiB; 0: off)",
                                         parse=parse_bytes, show=format_bytes)
    heartbeat_interval: float = setting(0.5, "seconds between heartbeats")

    def problems(self) -> list[str]:
        """What makes this configuration unusable, as flag-named messages."""
        problems = []
        if self.max_batch_images < 1:
            problems.append("--max-batch-images must be >= 1")
        if self.batch_wait_ms < 0:
            problems.append("--batch-wait-ms must be >= 0")
        if self.heartbeat_interval <= 0:
            problems.append("--heartbeat-interval must be > 0")
        if self.embedding_cache_bytes < 0:
            problems.append("--embedding-cache-bytes must be >= 0")
        return problems


def build_parser() -> SettingsParser:
    parser = SettingsParser(prog="python -m services.encoder",
                            description="xllm encoder: a vision tower serving image embeddings (EPD placements)")
    parser.add_settings(EngineConfig, "model", only=ENGINE_SETTINGS)
    add_service_arguments(parser)
    parser.add_settings(EncoderConfig, "encoder")
    return parser
