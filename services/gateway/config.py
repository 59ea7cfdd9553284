"""The gateway's settings: its flags, config-file keys and `xllm serve`'s HTTP flags come from here."""

from __future__ import annotations

from dataclasses import dataclass

from common.service_config import add_service_arguments
from common.settings import SettingsParser, setting

__all__ = ["GatewayConfig", "build_parser"]


@dataclass
class GatewayConfig:
    host: str = setting("127.0.0.1", "HTTP host")
    port: int = setting(8000, "HTTP port")
    model: str | None = setting(None, "GGUF file or HF directory whose tokenizer to use "
                                      "(default: the bundled SmolLM2-135M-Instruct)")
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' (env XLLM_API_KEY)")
    max_queue: int = setting(256, "requests in flight before 429")
    max_body_bytes: int = setting(8 * 1024 * 1024, "largest request body (413 past it)")
    max_model_len: int | None = setting(None, "context window to enforce (default: the model's, or the "
                                              "workers' if smaller)")
    gateway_id: str | None = setting(None, "this gateway's id on the bus (default: generated)")
    tokens_addr: str | None = setting(None, "where to bind the token PULL socket (default: ipc under "
                                            "--run-dir, or tcp with --tcp-host)")
    advertise_host: str | None = setting(None, "host workers should push tokens to when --tokens-addr binds a "
                                               "tcp wildcard (default: this machine's hostname)")

    def problems(self) -> list[str]:
        """What makes this configuration unusable, as flag-named messages."""
        out = []
        if not 0 < self.port < 65536:
            out.append("--port must be in 1..65535")
        if self.max_queue < 1:
            out.append("--max-queue must be >= 1")
        return out


def build_parser() -> SettingsParser:
    parser = SettingsParser(prog="python -m services.gateway",
                            description="The OpenAI-compatible HTTP gateway (aiohttp on uvloop).")
    parser.add_settings(GatewayConfig, "gateway")
    add_service_arguments(parser)
    return parser
