"""`POST /v1/embeddings`: validate, tokenize, one Submit per input, gather the EmbeddingResults.

Each input is its own request on the bus (`<id>-<i>`, an `EmbedTask` on its Submit), routed by
the scheduler like a prefill; a worker computes every embedding request it has queued in one
engine call, so a batch's inputs share forwards. The vectors come back as little-endian float32
bytes and leave as OpenAI's response: floats, or base64 of those same bytes
(`encoding_format: base64`, what the official client asks for by default).

`dimensions` is accepted only when it equals the model's hidden size: truncating a vector is only
meaningful for Matryoshka-trained models, which a causal LM's hidden states are not.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from aiohttp import web

from common.protocol import EmbeddingResult, EmbedTask, RequestError, Sampling
from services.gateway.client import RequestStream
from services.gateway.config import GatewayConfig
from services.gateway.context import CTX_KEY, GatewayContext
from services.gateway.generation import SUBMIT_TIMEOUT_S, error_from_worker
from services.gateway.httpio import json_response, read_json
from services.gateway.json_fields import APIError, Fields, bad_request, json_type

__all__ = ["EmbeddingSettings", "EMBEDDING_KEY", "EmbeddingRequest", "parse_embedding_request",
           "handle_embeddings"]

logger = logging.getLogger(__name__)

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit per request
ENCODING_FORMATS = ("float", "base64")
MAX_RETRIES = 2  # per input, when its worker was lost (a retriable RequestError)
# A lost answer (a worker gone without the scheduler noticing) must not hold the client forever.
EMBEDDING_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class EmbeddingSettings:
    pooling: str = GatewayConfig.embedding_pooling
    normalize: bool = GatewayConfig.embedding_normalize


# Set by `app.serve` from the gateway's flags; an app built without it uses the defaults.
EMBEDDING_KEY: web.AppKey[EmbeddingSettings] = web.AppKey("embedding", EmbeddingSettings)


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str | list[int]]
    encoding_format: str = "float"
    dimensions: int | None = None


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)


def _inputs(value: Any) -> list[str | list[int]]:
    if value is None:
        raise bad_request("'input' is required", param="input", code="missing_required_parameter")
    if isinstance(value, str):
        if not value:
            raise bad_request("'input' must not be an empty string", param="input")
        return [value]
    if not isinstance(value, list):
        raise bad_request(f"'input' must be a string, an array of strings, an array of token ids or an array "
                          f"of token-id arrays, got {json_type(value)}", param="input", code="invalid_type")
    if not value:
        raise bad_request("'input' must not be an empty array", param="input")
    if _is_token_list(value):
        return [value]
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise bad_request(f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(value)}", param="input")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v:
                raise bad_request(f"input[{i}] is an empty string", param="input")
        return list(value)
    if all(isinstance(v, list) for v in value):
        for i, v in enumerate(value):
            if not _is_token_list(v):
                what = "an empty token list" if not v else "not an array of integer token ids"
                raise bad_request(f"input[{i}] is {what}", param="input", code="invalid_type" if v else None)
        return list(value)
    raise bad_request("'input' must be a string, an array of strings, an array of token ids or an array of "
                      "token-id arrays (not a mix)", param="input", code="invalid_type")


def parse_embedding_request(body: dict[str, Any]) -> EmbeddingRequest:
    """Validate a `/v1/embeddings` body (pure: no tokenizer, no model)."""
    fields = Fields(body)
    model = fields.str("model")
    if model is None or not model.strip():
        raise bad_request("'model' is required", param="model", code="missing_required_parameter")
    inputs = _inputs(body.get("input"))
    encoding = fields.str("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise bad_request(f"'encoding_format' must be one of {list(ENCODING_FORMATS)}, got {encoding!r}",
                          param="encoding_format")
    dimensions = fields.int("dimensions")
    if dimensions is not None and dimensions < 1:
        raise bad_request(f"'dimensions' must be at least 1, got {dimensions}", param="dimensions")
    fields.str("user")  # accepted (and type-checked) as OpenAI does; not used
    return EmbeddingRequest(model=model, inputs=inputs, encoding_format=encoding, dimensions=dimensions)


@lru_cache(maxsize=8)
def model_width(path: str) -> int | None:
    """The model's hidden size from its metadata (None when it cannot be read)."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
                config = json.load(f)
            value = config.get("hidden_size") or config.get("text_config", {}).get("hidden_size")
        else:
            from transformers.integrations.gguf.reader import read_gguf_metadata

            metadata, _ = read_gguf_metadata(path, ())
            value = metadata.get(f"{metadata.get('general.architecture')}.embedding_length")
    except (OSError, ValueError, KeyError, ImportError) as exc:
        logger.warning("cannot read the hidden size of %s: %s", path, exc)
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


async def _check_dimensions(ctx: GatewayContext, dimensions: int | None) -> None:
    if dimensions is None:
        return
    width = await asyncio.get_running_loop().run_in_executor(None, model_width, ctx.model.path)
    if width is not None and dimensions != width:
        raise bad_request(f"'dimensions' must be {width} (the model's embedding size) or left out: this model's "
                          f"embeddings cannot be shortened, got {dimensions}", param="dimensions",
                          code="unsupported_value")


def _token_ids(ctx: GatewayContext, inputs: list[str | list[int]]) -> list[list[int]]:
    """Each input as token ids, checked against the context window and the vocabulary."""
    out = []
    limit, vocab = ctx.max_model_len, ctx.vocab_size
    for i, item in enumerate(inputs):
        ids = ctx.tokenizer.encode(item) if isinstance(item, str) else item
        where = "the input" if len(inputs) == 1 else f"input[{i}]"
        if not ids:
            raise bad_request(f"{where} has no tokens", param="input")
        if len(ids) > limit:
            raise bad_request(f"{where} has {len(ids)} tokens, more than the model's context length of {limit}",
                              param="input", code="context_length_exceeded")
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"{where}: token id {bad} is outside the vocabulary (size {vocab})", param="input")
        out.append(ids)
    return out


async def handle_embeddings(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    req = parse_embedding_request(await read_json(request, ctx.max_body_bytes))
    ctx.model.check(req.model)
    await _check_dimensions(ctx, req.dimensions)
    ids = _token_ids(ctx, req.inputs)
    settings = request.app.get(EMBEDDING_KEY) or EmbeddingSettings()
    vectors = await _compute(ctx, ids, EmbedTask(pooling=settings.pooling, normalize=settings.normalize))
    if req.dimensions is not None and vectors and req.dimensions != vectors[0].shape[0]:
        # The metadata could not be read up front: refuse now rather than return another size.
        raise bad_request(f"'dimensions' must be {vectors[0].shape[0]} (the model's embedding size) or left out",
                          param="dimensions", code="unsupported_value")
    data = [
        {"object": "embedding", "index": i,
         "embedding": base64.b64encode(v.tobytes()).decode("ascii") if req.encoding_format == "base64"
         else v.tolist()}
        for i, v in enumerate(vectors)
    ]
    tokens = sum(len(x) for x in ids)
    return json_response({"object": "list", "data": data, "model": ctx.model.model_id,
                          "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


async def _compute(ctx: GatewayContext, ids: list[list[int]], task: EmbedTask) -> list[np.ndarray]:
    """Submit every input and wait for its vector; any failure fails the whole request."""
    ctx.admission.acquire()
    request_id = f"embd-{uuid.uuid4().hex}"
    subs = [f"{request_id}-{i}" for i in range(len(ids))]
    stream = RequestStream()
    pending = set(subs)
    results: dict[str, np.ndarray] = {}
    retries = dict.fromkeys(subs, 0)
    sampling = Sampling(max_tokens=1)
    try:
        if not ctx.client.ready:
            raise APIError(503, "no worker is available to serve the request; retry shortly",
                           code="service_unavailable", headers={"Retry-After": "2"})
        for sub in subs:
            ctx.client.register(sub, stream)
        arrival = time.time()
        position = dict(zip(subs, ids))

        async def submit(sub: str) -> None:
            try:
                async with asyncio.timeout(SUBMIT_TIMEOUT_S):
                    await ctx.client.submit(sub, position[sub], sampling, arrival, embed=task)
            except TimeoutError:
                raise APIError(503, "the scheduler is not accepting requests; retry shortly",
                               code="service_unavailable", headers={"Retry-After": "2"}) from None

        for sub in subs:
            await submit(sub)
        deadline = asyncio.get_running_loop().time() + EMBEDDING_TIMEOUT_S
        while pending:
            try:
                async with asyncio.timeout_at(deadline):
                    batch = await stream.get_batch()
            except TimeoutError:
                raise APIError(504, f"no embedding came back within {EMBEDDING_TIMEOUT_S:.0f} s; retry",
                               code="timeout") from None
            for msg in batch:
                if msg.request_id not in pending:
                    continue
                if type(msg) is EmbeddingResult:
                    vector = np.frombuffer(msg.embedding, dtype="<f4")
                    if vector.shape[0] != msg.dim:
                        raise APIError(500, "a worker sent a malformed embedding", code="worker_error")
                    results[msg.request_id] = vector
                    pending.discard(msg.request_id)
                elif type(msg) is RequestError:
                    if msg.retriable and retries[msg.request_id] < MAX_RETRIES:
                        retries[msg.request_id] += 1  # its worker was lost: nothing was wrong with it
                        await submit(msg.request_id)
                        continue
                    pending.discard(msg.request_id)
                    raise error_from_worker(msg)
    finally:
        for sub in subs:
            ctx.client.unregister(sub)
        for sub in pending:  # the client left or another input failed: free the workers
            ctx.client.abort_soon(sub, "embedding request ended")
        ctx.admission.release()
    return [results[sub] for sub in subs]
