"""`POST /v1/completions`: the handler and its response / stream-chunk builders.

`echo` puts each prompt's text in front of its choices' text (the prompt as sent, or its token ids
decoded). `best_of` > n generates best_of candidates per prompt, each with its tokens' logprobs,
and returns the n with the highest cumulative logprob (vLLM V0's rule), best first; the usage
counts every candidate's tokens, as OpenAI bills them. (`suffix`, `echo` with `logprobs` and
`best_of` with `stream` are refused in `openai_schema`.)
"""

from __future__ import annotations

import math
import uuid

from aiohttp import web

from common.engine.sampling_params import SamplingParams
from services.gateway.context import CTX_KEY, GatewayContext
from services.gateway.generation import Generation
from services.gateway.httpio import SSEWriter, dumps, json_response, read_json
from services.gateway.logprobs import CompletionLogprobs, merge_completion_blocks, unpack
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
    params = _candidate_params(req)
    check_prompts_for_model(params, prompt_ids, ctx.max_model_len, ctx.vocab_size)
    gen = Generation(ctx, f"cmpl-{uuid.uuid4().hex}", prompt_ids, params,
                     req.top_logprobs is not None or req.best_of is not None, req.priority)
    try:
        await gen.start()
        if req.stream:
            return await _stream(request, ctx, gen, req)
        return await _complete(ctx, gen, req)
    finally:
        gen.close()


def _candidate_params(req: GenerationRequest) -> SamplingParams:
    """The request's sampling params, or with `best_of` its candidates' (with logprobs to rank them)."""
    if req.best_of is None:
        return req.params
    logprobs = req.params.logprobs if req.params.logprobs is not None else 0
    return SamplingParams.from_dict({**req.params.to_dict(), "n": req.best_of, "logprobs": logprobs})


def _echo_texts(ctx: GatewayContext, req: GenerationRequest, prompt_ids: list[list[int]]) -> list[str]:
    """Each prompt's text, as echoed in front of its choices (empty strings without `echo`)."""
    if not req.echo:
        return [""] * len(prompt_ids)
    return [p if isinstance(p, str) else ctx.tokenizer.decode(ids, skip_special_tokens=False)
            for p, ids in zip(req.prompts, prompt_ids)]


def _cumulative_logprob(blocks: list[list]) -> float:
    total = 0.0
    for entries in blocks:
        for entry in entries:
            total += unpack(entry)[1]
    return total if math.isfinite(total) else -math.inf


def _logprob_builders(ctx: GatewayContext, gen: Generation, req: GenerationRequest) -> list[CompletionLogprobs]:
    if req.top_logprobs is None:
        return []
    return [CompletionLogprobs(ctx.token_texts, req.top_logprobs) for _ in gen.choices]


async def _complete(ctx: GatewayContext, gen: Generation, req: GenerationRequest) -> web.Response:
    n = len(gen.choices)
    texts: list[list[str]] = [[] for _ in range(n)]
    blocks: list[list[dict]] = [[] for _ in range(n)]
    wire: list[list[list]] = [[] for _ in range(n)]  # raw logprob entries, to rank best_of candidates
    finish: list[str | None] = [None] * n
    builders = _logprob_builders(ctx, gen, req)
    async for updates in gen.updates():
        for u in updates:
            if u.text:
                texts[u.index].append(u.text)
            if u.logprobs:
                if builders:
                    blocks[u.index].append(builders[u.index].block(u.logprobs))
                if req.best_of is not None:
                    wire[u.index].append(u.logprobs)
            if u.finish_reason is not None:
                finish[u.index] = u.finish_reason
    echo = _echo_texts(ctx, req, gen.prompt_ids)
    per_prompt = req.best_of or req.params.n
    order = list(range(n))
    if req.best_of is not None:
        # Per prompt, its candidates by cumulative logprob, best first; the top n are the choices.
        order = []
        for p in range(len(gen.prompt_ids)):
            group = range(p * per_prompt, (p + 1) * per_prompt)
            ranked = sorted(group, key=lambda i: _cumulative_logprob(wire[i]), reverse=True)
            order.extend(ranked[: req.params.n])
    choices = [
        {
            "index": k,
            "text": echo[i // per_prompt] + "".join(texts[i]),
            "logprobs": merge_completion_blocks(blocks[i]) if builders else None,
            "finish_reason": finish[i],
        }
        for k, i in enumerate(order)
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
    echo = _echo_texts(ctx, req, gen.prompt_ids)
    echoed: set[int] = set()  # choices whose prompt text went out (with their first chunk)
    n = req.params.n
    writer = SSEWriter(request)
    try:
        async for updates in gen.updates():
            chunks = []
            for u in updates:
                lp = dumps(builders[u.index].block(u.logprobs or [])) if builders else "null"
                reason = "null" if u.finish_reason is None else f'"{u.finish_reason}"'
                text = u.text
                if req.echo and u.index not in echoed:
                    echoed.add(u.index)
                    text = echo[u.index // n] + text
                chunks.append(f'{head}{{"index":{u.index},"text":{dumps(text)},"logprobs":{lp},'
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
