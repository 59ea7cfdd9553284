"""`POST /v1/chat/completions`: the handler and its response / stream-chunk builders."""

from __future__ import annotations

import uuid

from aiohttp import web

from common.engine.multimodal import ImageItem
from services.gateway.context import CTX_KEY, GatewayContext
from services.gateway.generation import Generation
from services.gateway.httpio import SSEWriter, dumps, json_response, read_json
from services.gateway.images import image_parts, refuse_images
from services.gateway.logprobs import chat_entries
from services.gateway.openai_schema import APIError, GenerationRequest, bad_request, check_prompts_for_model, \
    parse_chat_request
from services.gateway.tool_parsers import StreamPiece, ToolStreamer
from services.gateway.tools import ReplyParser, ToolRequest, finish_reason, model_parser, prompt_ids


def chat_prompt_ids(ctx: GatewayContext, req: GenerationRequest) -> list[int]:
    """The conversation rendered with the model's chat template (and its tools), as token ids."""
    try:
        parser = model_parser(ctx.tokenizer, ctx.tool_call_parser)
        return prompt_ids(ctx.tokenizer, req.messages or [], req.tools or ToolRequest(), parser,
                          req.add_generation_prompt)
    except ValueError as exc:  # the template refused the conversation (roles out of order, no template...)
        raise bad_request(str(exc), param="messages") from None


async def chat_images(ctx: GatewayContext, req: GenerationRequest) -> list[ImageItem]:
    """The request's images as items, in prompt order ([] without image parts); `req.messages`
    becomes the conversation for the chat template. 400 for a bad image or a text-only model."""
    messages = req.messages or []
    if not image_parts(messages):
        return []
    if ctx.images is None:
        refuse_images(ctx.model.model_id, messages)
    assert ctx.images is not None
    req.messages, items = await ctx.images.prepare(messages)
    return items


async def handle_chat(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX_KEY]
    req = parse_chat_request(await read_json(request, ctx.max_body_bytes))
    ctx.model.check(req.model)
    images = await chat_images(ctx, req)
    prompt_ids_ = chat_prompt_ids(ctx, req)
    if images:
        assert ctx.images is not None
        prompt_ids_ = ctx.images.expand(prompt_ids_, images)
    check_prompts_for_model(req.params, [prompt_ids_], ctx.max_model_len, ctx.vocab_size, param="messages")
    gen = Generation(ctx, f"chatcmpl-{uuid.uuid4().hex}", [prompt_ids_], req.params, req.top_logprobs is not None,
                     req.priority, images=[images] if images else None)
    replies = ReplyParser(req.tools or ToolRequest(), model_parser(ctx.tokenizer, ctx.tool_call_parser))
    try:
        await gen.start()
        if req.stream:
            return await _stream(request, ctx, gen, req, replies)
        return await _complete(ctx, gen, req, replies)
    finally:
        gen.close()


async def _complete(ctx: GatewayContext, gen: Generation, req: GenerationRequest,
                    replies: ReplyParser) -> web.Response:
    n = len(gen.choices)
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    async for updates in gen.updates():
        for u in updates:
            if u.text:
                texts[u.index].append(u.text)
            if u.logprobs:
                logprobs[u.index].extend(u.logprobs)
            if u.finish_reason is not None:
                finish[u.index] = u.finish_reason
    top_n = req.top_logprobs or 0
    choices = []
    for i in range(n):
        content, calls = replies.extract("".join(texts[i]))
        message: dict = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [call.to_openai() for call in calls]
        elif content is None:
            message["content"] = ""
        choices.append({
            "index": i,
            "message": message,
            "logprobs": ({"content": chat_entries(ctx.token_texts, logprobs[i], top_n)}
                         if req.top_logprobs is not None else None),
            "finish_reason": finish_reason(finish[i], bool(calls)),
        })
    return json_response({
        "id": gen.request_id, "object": "chat.completion", "created": int(gen.arrival), "model": ctx.model.model_id,
        "system_fingerprint": None, "choices": choices, "usage": gen.usage(),
    })


async def _stream(request: web.Request, ctx: GatewayContext, gen: Generation, req: GenerationRequest,
                  replies: ReplyParser) -> web.StreamResponse:
    # Every chunk shares this envelope: encode it once, splice each choice's small JSON in.
    head = (f'{{"id":"{gen.request_id}","object":"chat.completion.chunk","created":{int(gen.arrival)},'
            f'"model":{dumps(ctx.model.model_id)},"system_fingerprint":null,"choices":[')
    tail = '],"usage":null}' if req.include_usage else "]}"
    top_n = req.top_logprobs or 0
    want_logprobs = req.top_logprobs is not None
    streamers: list[ToolStreamer | None] = [replies.streamer() for _ in gen.choices]
    single_call = not replies.request.parallel
    writer = SSEWriter(request)
    # The role chunks go out with the first tokens (see SSEWriter).
    role_chunks = [
        f'{head}{{"index":{c.index},"delta":{{"role":"assistant","content":""}},"logprobs":null,'
        f'"finish_reason":null}}{tail}'
        for c in gen.choices
    ]
    try:
        async for updates in gen.updates():
            chunks, role_chunks = role_chunks, []
            for u in updates:
                streamer = streamers[u.index]
                reason = u.finish_reason
                if streamer is None:
                    delta = f'{{"content":{dumps(u.text)}}}' if u.text or reason is None else "{}"
                else:
                    piece = streamer.feed(u.text) if u.text else None
                    if reason is not None:
                        last = streamer.finish()
                        if piece is None:
                            piece = last
                        else:
                            piece.extend(last)
                        reason = finish_reason(reason, streamer.num_calls > 0)
                    delta = _tool_delta(piece, single_call)
                    if delta is None:
                        if reason is None and not (want_logprobs and u.logprobs):
                            continue  # held back by the parser: nothing to say yet
                        delta = "{}"
                lp = "null"
                if want_logprobs:
                    lp = dumps({"content": chat_entries(ctx.token_texts, u.logprobs or [], top_n)})
                reason_json = "null" if reason is None else f'"{reason}"'
                chunks.append(f'{head}{{"index":{u.index},"delta":{delta},"logprobs":{lp},'
                              f'"finish_reason":{reason_json}}}{tail}')
            await writer.send(chunks)
        if req.include_usage:
            await writer.send([dumps({
                "id": gen.request_id, "object": "chat.completion.chunk", "created": int(gen.arrival),
                "model": ctx.model.model_id, "system_fingerprint": None, "choices": [], "usage": gen.usage(),
            })])
    except APIError as error:
        if not writer.started:
            raise  # nothing sent yet: a plain HTTP error response
        await writer.send_error(error)  # mid-stream: tell the client in-band
    return await writer.close()


def _tool_delta(piece: StreamPiece | None, single_call: bool) -> str | None:
    """The `delta` JSON of a parsed stream piece, or None when it holds nothing."""
    if piece is None:
        return None
    calls = [c for c in piece.calls if not single_call or c.index == 0]
    delta: dict = {}
    if piece.content:
        delta["content"] = piece.content
    if calls:
        delta["tool_calls"] = [c.to_openai() for c in calls]
    return dumps(delta) if delta else None
