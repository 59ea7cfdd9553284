"""OpenAI request bodies -> validated internal requests (+ SamplingParams).

Everything here is pure: no sockets, no tokenizer. Rejections are `APIError`s (defined in
`json_fields`, re-exported here) naming the offending parameter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from common.engine.sampling_params import MAX_LOGPROBS, InvalidSamplingParameter, SamplingParams
from services.gateway.json_fields import APIError, Fields, bad_request, json_type, parse_json_body
from services.gateway.structured import parse_structured
from services.gateway.tools import ToolRequest, apply_to_params, check_tool_messages, parse_openai_tools

__all__ = [
    "APIError", "GenerationRequest", "bad_request", "parse_json_body", "parse_chat_request",
    "parse_completion_request", "parse_tokenize_request", "parse_detokenize_request", "check_prompts_for_model",
]

# Hard caps on one request, so a single body cannot ask for unbounded work.
MAX_N = 16
MAX_BATCH_PROMPTS = 64
MAX_CHOICES = 64  # prompts x n
MAX_TOTAL_TOKENS = 16 * 32768  # choices x max_tokens
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 512
CHAT_ROLES = frozenset(("system", "developer", "user", "assistant", "tool"))


# ------------------------------------------------------------------------------ request types


@dataclass
class GenerationRequest:
    """What both endpoints turn into: prompts (text, messages or ids) plus sampling settings."""

    kind: str  # "chat" | "completion"
    model: str
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    # chat: the conversation; completion: a list of prompts, each a string or a list of token ids
    messages: list[dict[str, Any]] | None = None
    prompts: list[str | list[int]] = field(default_factory=list)
    add_generation_prompt: bool = True
    top_logprobs: int | None = None  # None: no logprobs in the response
    add_special_tokens: bool = True  # completions: tokenizer adds BOS etc. to text prompts
    priority: str = "online"  # "offline" work yields to online work (pages, batch slots)
    tools: ToolRequest | None = None  # chat: tools / tool_choice (services.gateway.tools)
    echo: bool = False  # completions: each choice's text starts with its prompt
    best_of: int | None = None  # completions: candidates per prompt (> n: the n most likely are returned)


def _model(fields: Fields) -> str:
    model = fields.str("model")
    if model is None or not model.strip():
        raise bad_request("'model' is required", param="model", code="missing_required_parameter")
    return model


def _stop(fields: Fields) -> list[str]:
    value = fields.body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    stops = [s for s in stops if s]  # OpenAI ignores empty stop strings
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"'stop' may hold at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"each stop string may be at most {MAX_STOP_CHARS} characters", param="stop")
    return stops


def _stop_token_ids(fields: Fields) -> list[int]:
    value = fields.body.get("stop_token_ids")
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise bad_request("'stop_token_ids' must be an array of integers", param="stop_token_ids",
                          code="invalid_type")
    return value


def _stream_options(fields: Fields, stream: bool) -> bool:
    options = fields.dict("stream_options")
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include = options.get("include_usage", False)
    if include is None:
        return False
    if not isinstance(include, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", param="stream_options.include_usage",
                          code="invalid_type")
    return include


def _reject_unsupported(fields: Fields) -> None:
    """Fields we cannot honour: a clear 400 beats silently ignoring them."""
    body = fields.body
    if body.get("logit_bias"):
        raise bad_request("'logit_bias' is not supported", param="logit_bias", code="unsupported_parameter")
    # response_format and guided_* are parsed by services.gateway.structured (in _sampling)
    # tools / tool_choice / parallel_tool_calls are validated by services.gateway.tools (chat only)


def _allowed_token_ids(fields: Fields) -> list[int] | None:
    value = fields.body.get("allowed_token_ids")
    if value is None:
        return None
    if not _is_token_list(value) or not value:
        raise bad_request("'allowed_token_ids' must be a non-empty array of integers", param="allowed_token_ids",
                          code="invalid_type")
    return value


def _early_stopping(fields: Fields) -> bool | str:
    value = fields.body.get("early_stopping", False)
    if value is None:
        return False
    if not isinstance(value, bool) and value != "never":
        raise bad_request(f"'early_stopping' must be true, false or \"never\", got {value!r}", param="early_stopping")
    return value


def _sampling(fields: Fields, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
    n = fields.int("n", 1)
    if n is not None and n > MAX_N:
        raise bad_request(f"'n' must be <= {MAX_N}, got {n}", param="n")
    structured_kind, structured_spec = parse_structured(fields.body)
    # vLLM's extension: `n` is the beam width; beam search is deterministic, so temperature 0 unless given.
    beam = bool(fields.bool("use_beam_search", False))
    params = SamplingParams(
        n=n,
        temperature=fields.number("temperature", 0.0 if beam else 1.0),
        top_p=fields.number("top_p", 1.0),
        top_k=fields.int("top_k", 0),
        min_p=fields.number("min_p", 0.0),
        seed=fields.int("seed"),
        presence_penalty=fields.number("presence_penalty", 0.0),
        frequency_penalty=fields.number("frequency_penalty", 0.0),
        repetition_penalty=fields.number("repetition_penalty", 1.0),
        max_tokens=max_tokens,
        min_tokens=fields.int("min_tokens", 0),
        stop_token_ids=_stop_token_ids(fields),
        stop=_stop(fields),
        ignore_eos=fields.bool("ignore_eos", False),
        logprobs=logprobs,
        skip_special_tokens=fields.bool("skip_special_tokens", True),
        structured_kind=structured_kind,
        structured_spec=structured_spec,
        use_beam_search=beam,
        length_penalty=fields.number("length_penalty", 1.0),
        early_stopping=_early_stopping(fields),
        allowed_token_ids=_allowed_token_ids(fields),
    )
    if beam and fields.bool("stream", False):
        # The beams are only known once the search is over: there is nothing to stream before.
        raise bad_request("'use_beam_search' cannot be used with 'stream': the beams are only known at the end",
                          param="use_beam_search", code="unsupported_parameter")
    try:
        params.validate()
    except InvalidSamplingParameter as exc:
        raise bad_request(str(exc), param=exc.param) from None
    return params


def _priority(fields: Fields) -> str:
    """xllm's `priority` ("online" | "offline"), or OpenAI's `service_tier` ("flex" = offline)."""
    priority = fields.str("priority")
    if priority is not None:
        if priority not in ("online", "offline"):
            raise bad_request(f"'priority' must be 'online' or 'offline', got {priority!r}", param="priority")
        return priority
    tier = fields.str("service_tier")
    if tier is not None and tier not in ("auto", "default", "flex", "priority"):
        raise bad_request(f"'service_tier' must be 'auto', 'default', 'flex' or 'priority', got {tier!r}",
                          param="service_tier")
    return "offline" if tier == "flex" else "online"


def _max_tokens(fields: Fields, names: tuple[str, ...], default: int | None) -> int | None:
    # The newer name wins when both are given (OpenAI deprecated max_tokens for chat).
    for name in names:
        value = fields.int(name)
        if value is not None:
            if value < 1:
                raise bad_request(f"'{name}' must be at least 1, got {value}", param=name)
            return value
    return default


# ---------------------------------------------------------------------------------- endpoints


def parse_chat_request(body: dict[str, Any]) -> GenerationRequest:
    """Validate a `/v1/chat/completions` body."""
    fields = Fields(body)
    model = _model(fields)
    messages = _messages(body.get("messages"))
    stream = fields.bool("stream", False)
    include_usage = _stream_options(fields, stream)
    _reject_unsupported(fields)
    want_logprobs = fields.bool("logprobs", False)
    top = fields.int("top_logprobs")
    if top is not None:
        if not want_logprobs:
            raise bad_request("'top_logprobs' requires 'logprobs' to be true", param="top_logprobs")
        if not 0 <= top <= MAX_LOGPROBS:
            raise bad_request(f"'top_logprobs' must be in [0, {MAX_LOGPROBS}], got {top}", param="top_logprobs")
    top_logprobs = (top or 0) if want_logprobs else None
    max_tokens = _max_tokens(fields, ("max_completion_tokens", "max_tokens"), None)
    params = _sampling(fields, max_tokens, top_logprobs)
    tools = parse_openai_tools(body)
    check_tool_messages(messages)
    apply_to_params(tools, params)  # "required" / a named function: the reply is held to the call schema
    return GenerationRequest(
        kind="chat", model=model, params=params, stream=stream, include_usage=include_usage,
        messages=messages, add_generation_prompt=fields.bool("add_generation_prompt", True),
        top_logprobs=top_logprobs, priority=_priority(fields), tools=tools,
    )


def _messages(value: Any) -> list[dict[str, Any]]:
    if value is None:
        raise bad_request("'messages' is required", param="messages", code="missing_required_parameter")
    if not isinstance(value, list):
        raise bad_request(f"'messages' must be an array, got {json_type(value)}", param="messages",
                          code="invalid_type")
    if not value:
        raise bad_request("'messages' must hold at least one message", param="messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object, got {json_type(message)}", param=where,
                              code="invalid_type")
        role = message.get("role")
        if not isinstance(role, str):
            raise bad_request(f"{where}.role is required and must be a string", param=f"{where}.role")
        if role not in CHAT_ROLES:
            raise bad_request(f"{where}.role {role!r} is not one of {sorted(CHAT_ROLES)}", param=f"{where}.role")
        content = message.get("content")
        if content is None:
            if role != "assistant":
                raise bad_request(f"{where}.content is required for role {role!r}", param=f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_content_part(part, f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise bad_request(f"{where}.content must be a string or an array of content parts",
                              param=f"{where}.content", code="invalid_type")
        clean = dict(message)
        if role == "developer":
            clean["role"] = "system"  # OpenAI's newer name; chat templates know "system"
        out.append(clean)
    return out


def _check_content_part(part: Any, where: str) -> None:
    """A text part, or an image part (whether the model can read images is the handler's check)."""
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return
    if isinstance(part, dict) and part.get("type") == "image_url":
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
            raise bad_request(f"{where}.image_url must be an object with a non-empty 'url' string", param=where,
                              code="invalid_type")
        if image.get("detail", "auto") not in ("auto", "low", "high"):
            raise bad_request(f"{where}.image_url.detail must be 'auto', 'low' or 'high'", param=where)
        return
    kind = part.get("type") if isinstance(part, dict) else json_type(part)
    raise bad_request(f"{where} must be a text part {{'type': 'text', 'text': ...}} or an image part "
                      f"{{'type': 'image_url', 'image_url': {{'url': ...}}}}; part type {kind!r} is not supported",
                      param=where)


def parse_completion_request(body: dict[str, Any]) -> GenerationRequest:
    """Validate a `/v1/completions` body."""
    fields = Fields(body)
    model = _model(fields)
    prompts = _prompts(body.get("prompt"))
    stream = fields.bool("stream", False)
    include_usage = _stream_options(fields, stream)
    _reject_unsupported(fields)
    if fields.str("suffix"):
        raise bad_request("'suffix' is not supported: the served model has no fill-in-the-middle mode",
                          param="suffix", code="unsupported_parameter")
    logprobs = fields.int("logprobs")
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise bad_request(f"'logprobs' must be in [0, {MAX_LOGPROBS}], got {logprobs}", param="logprobs")
    echo = fields.bool("echo", False)
    if echo and logprobs is not None:
        # OpenAI would add the prompt tokens' logprobs; the workers do not compute those.
        raise bad_request("'echo' together with 'logprobs' is not supported (prompt-token logprobs are not "
                          "computed); drop one of them", param="echo", code="unsupported_parameter")
    max_tokens = _max_tokens(fields, ("max_tokens",), 16)  # OpenAI's completions default
    params = _sampling(fields, max_tokens, logprobs)
    best_of = _best_of(fields, params.n, stream)
    candidates = best_of or params.n
    if len(prompts) * candidates > MAX_CHOICES:
        name = "best_of" if best_of else "n"
        raise bad_request(
            f"{len(prompts)} prompts x {name}={candidates} gives {len(prompts) * candidates} choices; at most "
            f"{MAX_CHOICES} are allowed per request", param=name,
        )
    return GenerationRequest(
        kind="completion", model=model, params=params, stream=stream, include_usage=include_usage,
        prompts=prompts, top_logprobs=logprobs,
        add_special_tokens=fields.bool("add_special_tokens", True), priority=_priority(fields),
        echo=echo, best_of=best_of,
    )


def _best_of(fields: Fields, n: int, stream: bool) -> int | None:
    """`best_of` when it asks for more candidates than `n` (None: just the n choices)."""
    best_of = fields.int("best_of")
    if best_of is None or best_of == n:
        return None
    if fields.bool("use_beam_search", False):
        raise bad_request("'best_of' cannot be used with 'use_beam_search' ('n' is the beam width)", param="best_of",
                          code="unsupported_parameter")
    if best_of < n:
        raise bad_request(f"'best_of' must be at least n ({n}), got {best_of}", param="best_of")
    if best_of > MAX_N:
        raise bad_request(f"'best_of' must be <= {MAX_N}, got {best_of}", param="best_of")
    if stream:
        # The best candidates are only known once every one has finished.
        raise bad_request("'best_of' greater than n cannot be used with 'stream'", param="best_of",
                          code="unsupported_parameter")
    return best_of


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)


def _prompts(value: Any) -> list[str | list[int]]:
    if value is None:
        raise bad_request("'prompt' is required", param="prompt", code="missing_required_parameter")
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise bad_request(
            f"'prompt' must be a string, an array of strings, an array of token ids or an array of such arrays, "
            f"got {json_type(value)}", param="prompt", code="invalid_type",
        )
    if not value:
        raise bad_request("'prompt' must not be an empty array", param="prompt")
    if _is_token_list(value):
        return [value]
    if all(isinstance(p, str) for p in value) or all(_is_token_list(p) for p in value):
        if len(value) > MAX_BATCH_PROMPTS:
            raise bad_request(f"at most {MAX_BATCH_PROMPTS} prompts per request, got {len(value)}", param="prompt")
        for i, p in enumerate(value):
            if isinstance(p, list) and not p:
                raise bad_request(f"prompt[{i}] is an empty token list", param="prompt")
        return list(value)
    raise bad_request(
        "'prompt' must be a string, an array of strings, an array of token ids or an array of token-id arrays "
        "(not a mix)", param="prompt", code="invalid_type",
    )


# ------------------------------------------------------------------- limits of the served model


def check_prompts_for_model(
    params: SamplingParams,
    prompt_ids: list[list[int]],
    max_model_len: int,
    vocab_size: int,
    param: str = "prompt",
) -> None:
    """Context-window, vocabulary and total-work checks once the prompts are token ids."""
    total = 0
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise bad_request("the prompt is empty: at least one token is needed", param=param)
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab_size})", param=param)
        try:
            params.validate_for_model(len(ids), max_model_len, vocab_size)
        except InvalidSamplingParameter as exc:
            message = str(exc) if len(prompt_ids) == 1 else f"prompt {i}: {exc}"
            code = "context_length_exceeded" if exc.param in ("prompt", "max_tokens") else "invalid_value"
            raise bad_request(message, param=param if exc.param == "prompt" else exc.param, code=code) from None
        total += params.n * params.resolved_max_tokens(len(ids), max_model_len)
    if total > MAX_TOTAL_TOKENS:
        raise bad_request(
            f"the request asks for up to {total} generated tokens in all (n x max_tokens over every prompt); "
            f"the limit is {MAX_TOTAL_TOKENS}: lower n or max_tokens", param="n",
        )


def parse_tokenize_request(body: dict[str, Any]) -> GenerationRequest:
    """`/tokenize`: {"prompt": str} or {"messages": [...]} (model optional)."""
    fields = Fields(body)
    model = fields.str("model", "")
    if "messages" in body:
        return GenerationRequest(
            kind="chat", model=model, params=SamplingParams(), messages=_messages(body.get("messages")),
            add_generation_prompt=fields.bool("add_generation_prompt", True),
        )
    prompt = fields.str("prompt")
    if prompt is None:
        raise bad_request("'prompt' (a string) or 'messages' is required", param="prompt",
                          code="missing_required_parameter")
    return GenerationRequest(
        kind="completion", model=model, params=SamplingParams(), prompts=[prompt],
        add_special_tokens=fields.bool("add_special_tokens", True),
    )


def parse_detokenize_request(body: dict[str, Any], vocab_size: int) -> list[int]:
    """`/detokenize`: {"tokens": [ids]} -> the ids, checked against the vocabulary."""
    tokens = body.get("tokens")
    if tokens is None:
        raise bad_request("'tokens' is required", param="tokens", code="missing_required_parameter")
    if not _is_token_list(tokens):
        raise bad_request("'tokens' must be an array of integers", param="tokens", code="invalid_type")
    bad = next((t for t in tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary (size {vocab_size})", param="tokens")
    return tokens
