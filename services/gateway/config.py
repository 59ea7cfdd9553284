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
    http_header_timeout: float = setting(10.0, "seconds a client may take to send a request's headers "
                                               "(408 and closed past it)")
    http_body_timeout: float = setting(30.0, "seconds a request body may stall between two reads (408 and "
                                             "closed past it)")
    # Longer than clients' own pool expiry (httpx 5 s, aiohttp 15 s), so that a client does not
    # reuse a connection the server is just closing.
    http_keepalive_timeout: float = setting(30.0, "seconds an idle keep-alive connection stays open")
    max_connections: int = setting(4096, "open HTTP connections at most; past it a new one gets a 503 (lowered "
                                         "to fit the open-files limit)")
    max_model_len: int | None = setting(None, "context window to enforce (default: the model's, or the "
                                              "workers' if smaller)")
    gateway_id: str | None = setting(None, "this gateway's id on the bus (default: generated)")
    tokens_addr: str | None = setting(None, "where to bind the token PULL socket (default: ipc under "
                                            "--run-dir, or tcp with --tcp-host)")
    advertise_host: str | None = setting(None, "host workers should push tokens to when --tokens-addr binds a "
                                               "tcp wildcard (default: this machine's hostname)")
    batch_dir: str | None = setting(None, "where the Batch API keeps files, batches and results (LMDB; default: "
                                          "'batches' under --run-dir, else $XDG_STATE_HOME/xllm/batches)")
    max_batch_file_bytes: int = setting(200 * 1024 * 1024, "largest batch input file (413 past it)")
    batch_max_in_flight: int = setting(16, "offline (batch) requests in flight at most; online requests take "
                                           "their room first")
    batch_tpot_target_ms: float = setting(200.0, "offline work backs off while a batch line's time per output "
                                                 "token (the shared decode step) is above this")

    tool_call_parser: str | None = setting(None, "format the model writes tool calls in: hermes or llama3_json "
                                                 "(default: guessed from its chat template)")

    # Last token by default: in a causal decoder only the last token has attended to the whole input
    # (decoder embedding models such as E5-Mistral and vLLM's causal-LM pooler take it).
    embedding_pooling: str = setting("last", "how /v1/embeddings pools the final hidden states: last | mean",
                                     choices=("last", "mean"))
    embedding_normalize: bool = setting(True, "return /v1/embeddings vectors as computed, not L2-normalised",
                                        flag="--no-embedding-normalize")

    # Images in chat requests (multimodal models only); a text-only model refuses image parts.
    image_max_bytes: int = setting(16 * 1024 * 1024, "largest image (data: URL or fetched) in bytes; 400 past it")
    image_fetch_timeout: float = setting(10.0, "seconds an http(s) image URL may take to fetch in all; 400 past it")
    image_max_pixels: int = setting(4096 * 4096, "largest image in pixels (width x height, before the model's "
                                                "processor resizes it); 400 past it")
    max_images_per_request: int = setting(8, "images one chat request may hold; 400 past it")

    request_timeout: float = setting(600.0, "seconds a request may take in all (its migrations included) before "
                                            "it fails with a clear error")
    max_migrations: int = setting(3, "times one choice may move to another worker after losing its own "
                                     "before the request fails")
    scheduler_wait: float = setting(30.0, "seconds a new request waits for a scheduler that went away (restarting)")

    def problems(self) -> list[str]:
        """What makes this configuration unusable, as flag-named messages."""
        out = []
        if self.request_timeout <= 0 or self.scheduler_wait < 0 or self.max_migrations < 0:
            out.append("--request-timeout must be > 0, --scheduler-wait and --max-migrations >= 0")
        if not 0 < self.port < 65536:
            out.append("--port must be in 1..65535")
        if self.max_queue < 1:
            out.append("--max-queue must be >= 1")
        for flag, value in (("--http-header-timeout", self.http_header_timeout),
                            ("--http-body-timeout", self.http_body_timeout),
                            ("--http-keepalive-timeout", self.http_keepalive_timeout)):
            if not value > 0:
                out.append(f"{flag} must be > 0")
        if self.max_connections < 1:
            out.append("--max-connections must be >= 1")
        from services.gateway.tool_parsers import PARSERS

        if self.tool_call_parser is not None and self.tool_call_parser not in PARSERS:
            out.append(f"--tool-call-parser must be one of {sorted(PARSERS)}")
        if min(self.image_max_bytes, self.image_max_pixels, self.max_images_per_request) < 1:
            out.append("--image-max-bytes, --image-max-pixels and --max-images-per-request must be >= 1")
        if not self.image_fetch_timeout > 0:
            out.append("--image-fetch-timeout must be > 0")
        if self.batch_max_in_flight < 1:
            out.append("--batch-max-in-flight must be >= 1")
        if self.batch_tpot_target_ms <= 0:
            out.append("--batch-tpot-target-ms must be > 0")
        return out


def build_parser() -> SettingsParser:
    parser = SettingsParser(prog="python -m services.gateway",
                            description="The OpenAI-compatible HTTP gateway (aiohttp on uvloop).")
    parser.add_settings(GatewayConfig, "gateway")
    add_service_arguments(parser)
    return parser
