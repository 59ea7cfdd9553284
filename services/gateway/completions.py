"""`POST /v1/completions`: the handler and its response / stream-chunk builders."""

from __future__ import annotations

import uuid

from aiohttp import web

from services.gateway.context import CTX_KEY, GatewayContext
from services.gateway.generation import Generation
from services.gateway.httpio import SSEWriter, dumps, json_response, read_json
from services.gateway.logprobs import CompletionLogprobs, merge_completion_blocks
from services.gateway.openai_schema import APIError, GenerationRequest, check_prompts_for_model, \
    parse_completion_request


def completion_prompt_ids(ctx: GatewayContext, req: GenerationRequest) -> list[list[int]]:
    """Each prompt as token ids (text prompts are tokenized, id prompts pass through)."""
    return [
        ctx.tokenizer.encode(p, add_special_tokens=req.add_special_tokens) if isinstance(p, str) else p
        for p in req.prompts
    ]


async def handle_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    req = parse_completion_request(await read_json(request, ctx.max_body_bytes))
    ctx.model.check(req.model)
    prompt_ids = completion_prompt_ids(ctx, req)
    check_prompts_for_model(req.params, prompt_ids, ctx.max_model_len, ctx.vocab_size)
    gen = Generation(ctx, f"cmpl-{uuid.uuid4().hex}", prompt_ids, req.params, req.top_logprobs is not None,
                     req.priority)
    try:
        await gen.start()
        if req.stream:
            return await _stream(request, ctx, gen, req)
        return await _complete(ctx, gen, req)
    finally:
        gen.close()


def _logprob_builders(ctx: GatewayContext, gen: Generation, req: GenerationRequest) -> list[CompletionLogprobs]:
    if req.top_logprobs is None:
        return []
    return [CompletionLogprobs(ctx.token_texts, req.top_logprobs) for _ in gen.choices]


async def _complete(ctx: GatewayContext, gen: Generation, req: GenerationRequest) -> web.Response:
    n = len(gen.choices)
    texts: list[list[str]] = [[] for _ in range(n)]
    blocks: list[list[dict]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    builders = _logprob_builders(ctx, gen, req)
    async for updates in gen.updates():
        for u in updates:
            if u.text:
                texts[u.index].append(u.text)
            if builders and u.logprobs:
                blocks[u.index].append(builders[u.index].block(u.logprobs))
            if u.finish_reason is not None:
                finish[u.index] = u.finish_reason
    choices = [
        {
            "index": i,
            "text": "".join(texts[i]),
            "logprobs": merge_completion_blocks(blocks[i]) if builders else None,
            "finish_reason": finish[i],
        }
        for i in range(n)
    ]
    return json_response({
        "id": gen.request_id, "object": "text_completion", "created": int(gen.arrival), "model": ctx.model.model_id,
        "system_fingerprint": None, "choices": choices, "usage": gen.usage(),
    })


async def _stream(request: web.Request, ctx: GatewayContext, gen: Generation,
                  req: GenerationRequest) -> web.StreamResponse:
    # Every chunk shares this envelope: encode it once, splice each choice's small JSON in.
    head = (f'{{"id":"{gen.request_id}","object":"text_completion","created":{int(gen.arrival)},'
            f'"model":{dumps(ctx.model.model_id)},"system_fingerprint":null,"choices":[')
    tail = '],"usage":null}' if req.include_usage else "]}"
    builders = _logprob_builders(ctx, gen, req)
    writer = SSEWriter(request)
    try:
        async for updates in gen.updates():
            chunks = []
            for u in updates:
                lp = dumps(builders[u.index].block(u.logprobs or [])) if builders else "null"
                reason = "null" if u.finish_reason is None else f'"{u.finish_reason}"'
                chunks.append(f'{head}{{"index":{u.index},"text":{dumps(u.text)},"logprobs":{lp},'
                              f'"finish_reason":{reason}}}{tail}')
            await writer.send(chunks)
        if req.include_usage:
            await writer.send([dumps({
                "id": gen.request_id, "object": "text_completion", "created": int(gen.arrival),
                "model": ctx.model.model_id, "system_fingerprint": None, "choices": [], "usage": gen.usage(),
            })])
    except APIError as error:
        if not writer.started:
            raise  # nothing sent yet: a plain HTTP error response
        await writer.send_error(error)  # mid-stream: tell the client in-band
    return await writer.close()
