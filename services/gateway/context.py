"""What every handler shares: the served model's identity and limits, admission control, settings.

The model's context window and vocabulary come from its files (GGUF metadata or `config.json`)
so the gateway can reject an oversize prompt without a round trip; a worker started with a
smaller `--max-model-len` reports it through the scheduler's status and that wins.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web

from services.gateway.config import GatewayConfig
from services.gateway.openai_schema import APIError

if TYPE_CHECKING:
    from common.tokenizer import Tokenizer
    from services.gateway.client import BusClient
    from services.gateway.images import ImageSupport
    from services.gateway.logprobs import TokenTexts
    from services.gateway.metrics import GatewayMetrics

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LEN = 2048


@dataclass
class ModelInfo:
    """The one model this gateway serves: its public id, the names it answers to, its limits."""

    model_id: str
    path: str
    context_len: int
    aliases: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_path(cls, path: str, context_len: int | None = None) -> ModelInfo:
        real = os.path.realpath(path)
        model_id = os.path.basename(path.rstrip("/")) or path
        stem = model_id[: -len(".gguf")] if model_id.endswith(".gguf") else model_id
        aliases = frozenset({model_id, stem, path, path.rstrip("/"), real})
        return cls(model_id, path, context_len or read_context_len(path), aliases)

    def check(self, requested: str) -> None:
        """404 `model_not_found` unless `requested` names this model."""
        if requested not in self.aliases:
            raise APIError(
                404, f"The model '{requested}' does not exist; this server serves '{self.model_id}'",
                param="model", code="model_not_found",
            )


def read_context_len(path: str) -> int:
    """The model's context window from its metadata, without loading weights."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            value = config.get("max_position_embeddings") or config.get("text_config", {}).get(
                "max_position_embeddings"
            )
            if isinstance(value, int) and value > 0:
                return value
        elif path.endswith(".gguf"):
            return _gguf_context_len(path)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("cannot read the context window of %s (%s); assuming %d", path, exc, DEFAULT_CONTEXT_LEN)
    return DEFAULT_CONTEXT_LEN


def _gguf_context_len(path: str) -> int:
    # transformers' metadata reader skips the tensor table (GGUFReader parses it all: seconds)
    from transformers.integrations.gguf.reader import read_gguf_metadata

    metadata, _ = read_gguf_metadata(path, ())
    value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else DEFAULT_CONTEXT_LEN


class Admission:
    """A bound on in-flight generation requests: past it, 429 with Retry-After."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise APIError(
                429, f"the server is at its limit of {self.limit} requests in flight; retry shortly",
                code="rate_limit_exceeded", headers={"Retry-After": "1"},
            )
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


@dataclass
class GatewayContext:
    """Handed to every handler (stored on the aiohttp app)."""

    model: ModelInfo
    tokenizer: Tokenizer
    token_texts: TokenTexts
    client: BusClient
    metrics: GatewayMetrics
    admission: Admission
    api_key: str | None = None
    max_body_bytes: int = GatewayConfig.max_body_bytes
    started: float = field(default_factory=time.time)
    tool_call_parser: str | None = None  # --tool-call-parser (None: guessed from the chat template)
    images: ImageSupport | None = None  # a multimodal model's image side (None: text only)

    @property
    def max_model_len(self) -> int:
        """The smallest of the model's window (or --max-model-len) and every worker's."""
        lens = [
            inst["max_model_len"]
            for inst in self.client.instances
            if isinstance(inst.get("max_model_len"), int) and inst["max_model_len"] > 0
        ]
        return min([*lens, self.model.context_len])

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


# Where handlers find the context on the aiohttp app.
CTX_KEY: web.AppKey[GatewayContext] = web.AppKey("gateway", GatewayContext)
