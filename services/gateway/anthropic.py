"""`POST /v1/messages` (Anthropic Messages API) and `/v1/messages/count_tokens`.

The request is translated (`anthropic_schema`) onto the chat path: the same chat template, tool
parsers and `Generation`; only the response shapes differ (`anthropic_stream` for SSE). Every
error leaves in Anthropic's shape: `{"type": "error", "error": {"type": ..., "message": ...}}`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from services.gateway.anthropic_schema import MessagesRequest, error_body, parse_messages_request, stop_reason, \
    tool_use_id
from services.gateway.anthropic_stream import stream_message
from services.gateway.context import CTX_KEY, GatewayContext
from services.gateway.generation import Generation
from services.gateway.httpio import json_response, read_json
from services.gateway.openai_schema import APIError, bad_request, check_prompts_for_model
from services.gateway.tool_parsers import ToolParser
from services.gateway.tools import ReplyParser, apply_to_params, model_parser, prompt_ids

def _anthropic_errors(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as error:
            return json_response(error_body(error), status=error.status, headers=error.headers or None)
    return wrapped


def _prepare(request: web.Request, req: MessagesRequest) -> tuple[GatewayContext, ToolParser, list[int]]:
    ctx = request.app[CTX_KEY]
    ctx.model.check(req.model)
    parser = model_parser(ctx.tokenizer, ctx.tool_call_parser)
    try:
        ids = prompt_ids(ctx.tokenizer, req.messages, req.tools, parser)
    except ValueError as exc:
        raise bad_request(str(exc), param="messages") from None
    return ctx, parser, ids


@_anthropic_errors
async def handle_messages(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    req = parse_messages_request(await read_json(request, ctx.max_body_bytes))
    apply_to_params(req.tools, req.params)
    ctx, parser, ids = _prepare(request, req)
    check_prompts_for_model(req.params, [ids], ctx.max_model_len, ctx.vocab_size, param="messages")
    gen = Generation(ctx, f"msg_{uuid.uuid4().hex[:24]}", [ids], req.params, False)
    replies = ReplyParser(req.tools, parser)
    try:
        await gen.start()
        if req.stream:
            return await stream_message(request, ctx, gen, replies)
        return await _complete(ctx, gen, replies)
    finally:
        gen.close()


async def _complete(ctx: GatewayContext, gen: Generation, replies: ReplyParser) -> web.Response:
    texts: list[str] = []
    finish: str | None = None
    async for updates in gen.updates():
        for u in updates:
            texts.append(u.text)
            if u.finish_reason is not None:
                finish = u.finish_reason
    content, calls = replies.extract("".join(texts))
    blocks: list[dict[str, Any]] = []
    if content or not calls:
        blocks.append({"type": "text", "text": content or ""})
    for call in calls:
        blocks.append({"type": "tool_use", "id": tool_use_id(call), "name": call.name,
                       "input": json.loads(call.arguments)})
    reason, sequence = stop_reason(gen, finish, bool(calls))
    return json_response({
        "id": gen.request_id, "type": "message", "role": "assistant", "model": ctx.model.model_id,
        "content": blocks, "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.completion_tokens},
    })


@_anthropic_errors
async def handle_count_tokens(request: web.Request) -> web.Response:
    ctx = request.app[CTX_KEY]
    body = await read_json(request, ctx.max_body_bytes)
    body.setdefault("max_tokens", 1)  # count_tokens takes no max_tokens; the parser wants one
    _, _, ids = _prepare(request, parse_messages_request(body))
    return json_response({"input_tokens": len(ids)})
