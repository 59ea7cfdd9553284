"""The small endpoints: models, health, status, metrics, tokenize, detokenize."""

from __future__ import annotations

import time

from aiohttp import web

from services.gateway.batch.api import RUNNER_KEY
from services.gateway.chat import chat_prompt_ids
from services.gateway.client import instance_ready
from services.gateway.completions import completion_prompt_ids
from services.gateway.context import CTX_KEY
from services.gateway.httpio import json_response, read_json
from services.gateway.openai_schema import APIError, parse_detokenize_request, parse_tokenize_request


async def handle_models(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": [_model_card(request)]})


async def handle_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    ctx.model.check(request.match_info["model"])
    return json_response(_model_card(request))


def _model_card(request: web.Request) -> dict:
    ctx = request.app[CTX_KEY]
    return {"id": ctx.model.model_id, "object": "model", "created": int(ctx.started), "owned_by": "xllm",
            "root": ctx.model.path, "parent": None, "max_model_len": ctx.max_model_len}


async def handle_health(request: web.Request) -> web.Response:
    """200 once one worker can serve (load balancers and a single worker rely on that); the body
    says how many of the workers the scheduler expects are up, for whoever waits on the whole
    layout (`xllm serve`'s "ready" line, benchmarks)."""
    client = request.app[CTX_KEY].client
    if client.ready:
        workers = client.scheduler_info.get("workers")
        if isinstance(workers, dict):
            up, expected = workers.get("up"), workers.get("expected")
        else:  # a scheduler that does not report it: count the ready instances
            up, expected = sum(1 for inst in client.instances if instance_ready(inst)), None
        return json_response({"status": "ok", "workers_up": up, "workers_expected": expected})
    reason = "no worker is ready" if client.scheduler_alive else "the scheduler is not reachable"
    raise APIError(503, reason, code="service_unavailable", headers={"Retry-After": "1"})


async def handle_status(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    client = ctx.client
    age = time.monotonic() - client.last_status_time if client.last_status_time else None
    return json_response({
        "ready": client.ready,
        "scheduler_reachable": client.scheduler_alive,
        "status_age_s": age,
        "gateway": {"id": client.gateway_id, "in_flight": ctx.admission.in_flight,
                    "max_in_flight": ctx.admission.limit, "model": ctx.model.model_id,
                    "max_model_len": ctx.max_model_len},
        "scheduler": client.scheduler_info,
        "instances": [{**inst, "ready": instance_ready(inst)} for inst in client.instances],
        # the Batch API's offline side: active batches, offline requests in flight, the throttle
        "batches": request.app[RUNNER_KEY].describe() if RUNNER_KEY in request.app else None,
    })


async def handle_metrics(request: web.Request) -> web.Response:
    metrics = request.app[CTX_KEY].metrics
    return web.Response(body=metrics.render(), headers={"Content-Type": metrics.content_type})


async def handle_tokenize(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    req = parse_tokenize_request(await read_json(request, ctx.max_body_bytes))
    if req.model:
        ctx.model.check(req.model)
    ids = chat_prompt_ids(ctx, req) if req.messages is not None else completion_prompt_ids(ctx, req)[0]
    return json_response({"tokens": ids, "count": len(ids), "max_model_len": ctx.max_model_len})


async def handle_detokenize(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    body = await read_json(request, ctx.max_body_bytes)
    if isinstance(body.get("model"), str) and body["model"]:
        ctx.model.check(body["model"])
    ids = parse_detokenize_request(body, ctx.vocab_size)
    return json_response({"prompt": ctx.tokenizer.decode(ids, skip_special_tokens=False)})
