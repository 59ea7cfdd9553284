"""Anthropic Messages request bodies -> the chat path's inputs (OpenAI-style messages, tools, SamplingParams).

`system`, text blocks, `tool_use` blocks (assistant) and `tool_result` blocks (user) become the
system / user / assistant-with-`tool_calls` / `tool` messages the chat template renders; `tools`
and `tool_choice` become a `ToolRequest` (`any` = OpenAI's "required", `tool` = a named function).
Rejections are `APIError`s; the handler writes them in Anthropic's error shape (`error_body`).
The last section holds the response pieces both the full reply and the stream use.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any

from common.engine.sampling_params import InvalidSamplingParameter, SamplingParams
from services.gateway.json_fields import APIError, Fields, bad_request, json_type
from services.gateway.openai_schema import MAX_STOP_CHARS, MAX_STOP_STRINGS
from services.gateway.tool_parsers import ToolCall
from services.gateway.tools import ToolRequest, check_choice, check_unique, function_tool

ROLES = ("user", "assistant")

if TYPE_CHECKING:
    from services.gateway.generation import Generation


@dataclass
class MessagesRequest:
    model: str
    messages: list[dict[str, Any]]  # OpenAI-style chat messages
    params: SamplingParams
    tools: ToolRequest
    stream: bool = False


def _required(body: dict[str, Any], name: str) -> Any:
    if body.get(name) is None:
        raise bad_request(f"{name}: Field required", param=name, code="missing_required_parameter")
    return body[name]


def parse_messages_request(body: dict[str, Any]) -> MessagesRequest:
    """Validate a `/v1/messages` body."""
    fields = Fields(body)
    model = _required(body, "model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("model: must be a non-empty string", param="model")
    max_tokens = _required(body, "max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise bad_request(f"max_tokens: must be an integer >= 1, got {max_tokens!r}", param="max_tokens")
    messages = _system(body.get("system")) + _messages(_required(body, "messages"))
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata: must be an object", param="metadata", code="invalid_type")
    params = SamplingParams(
        temperature=fields.number("temperature", 1.0),
        top_p=fields.number("top_p", 1.0),
        top_k=fields.int("top_k", 0),
        max_tokens=max_tokens,
        stop=_stop_sequences(body.get("stop_sequences")),
    )
    if not 0.0 <= params.temperature <= 1.0:  # Anthropic's range (OpenAI's goes to 2)
        raise bad_request(f"temperature: must be between 0 and 1, got {params.temperature}", param="temperature")
    try:
        params.validate()
    except InvalidSamplingParameter as exc:
        raise bad_request(str(exc), param=exc.param) from None
    return MessagesRequest(model=model, messages=messages, params=params, tools=_tools(body),
                           stream=fields.bool("stream", False))


def _stop_sequences(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("stop_sequences: must be an array of strings", param="stop_sequences")
    stops = [s for s in value if s]
    if len(stops) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise bad_request(f"stop_sequences: at most {MAX_STOP_STRINGS} sequences of at most {MAX_STOP_CHARS} "
                          "characters", param="stop_sequences")
    return stops


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if isinstance(value, list):
        texts = [_text_block(block, f"system[{i}]") for i, block in enumerate(value)]
        return [{"role": "system", "content": "\n".join(texts)}] if texts else []
    raise bad_request(f"system: must be a string or an array of text blocks, got {json_type(value)}",
                      param="system")


def _text_block(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
        kind = block.get("type") if isinstance(block, dict) else json_type(block)
        raise bad_request(f"{where}: expected a text block {{'type': 'text', 'text': ...}}, got type {kind!r}",
                          param=where)
    return block["text"]


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad_request("messages: must be a non-empty array", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad_request(f"{where}: must be an object, got {json_type(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{where}.role: must be 'user' or 'assistant', got {role!r}", param=f"{where}.role")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif isinstance(content, list):
            out.extend(_blocks(role, content, where))
        else:
            raise bad_request(f"{where}.content: must be a string or an array of content blocks",
                              param=f"{where}.content")
    return out


def _blocks(role: str, blocks: list[Any], where: str) -> list[dict[str, Any]]:
    """One Anthropic message's blocks -> OpenAI messages (tool results first, as their own messages)."""
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        here = f"{where}.content.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            texts.append(_text_block(block, here))
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                    or not isinstance(block.get("input", {}), dict):
                raise bad_request(f"{here}: a tool_use block needs 'id', 'name' and an object 'input'", param=here)
            calls.append({"id": block["id"], "type": "function",
                          "function": {"name": block["name"],
                                       "arguments": json.dumps(block.get("input", {}), ensure_ascii=False)}})
        elif kind == "tool_result" and role == "user":
            if not isinstance(block.get("tool_use_id"), str):
                raise bad_request(f"{here}.tool_use_id: Field required", param=here)
            result = block.get("content", "")
            if isinstance(result, list):
                result = "\n".join(_text_block(b, f"{here}.content.{k}") for k, b in enumerate(result))
            elif not isinstance(result, str):
                raise bad_request(f"{here}.content: must be a string or text blocks", param=here)
            if block.get("is_error"):
                result = f"Error: {result}"
            results.append({"role": "tool", "tool_call_id": block["tool_use_id"], "content": result})
        else:
            raise bad_request(f"{here}: content block type {kind!r} is not supported in a {role} message "
                              "(this model takes text, tool_use and tool_result blocks)", param=here)
    out = list(results)
    if calls:
        out.append({"role": "assistant", "content": "\n".join(texts) or None, "tool_calls": calls})
    elif texts or not results:
        out.append({"role": role, "content": "\n".join(texts)})
    return out


def _tools(body: dict[str, Any]) -> ToolRequest:
    raw = body.get("tools")
    tools = []
    if raw is not None:
        if not isinstance(raw, list):
            raise bad_request("tools: must be an array", param="tools")
        for i, tool in enumerate(raw):
            where = f"tools.{i}"
            if not isinstance(tool, dict) or tool.get("type", "custom") != "custom":
                kind = tool.get("type") if isinstance(tool, dict) else json_type(tool)
                raise bad_request(f"{where}: only custom tools {{name, description, input_schema}} are supported, "
                                  f"got type {kind!r}", param=where)
            if "input_schema" not in tool:
                raise bad_request(f"{where}.input_schema: Field required", param=f"{where}.input_schema")
            tools.append(function_tool(tool.get("name"), tool.get("description"), tool["input_schema"], where))
        check_unique(tools, "tools")
    request = ToolRequest(tools=tools, mode="auto" if tools else "none")
    choice = body.get("tool_choice")
    if choice is None:
        return request
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        raise bad_request("tool_choice: must be {'type': 'auto' | 'any' | 'tool' | 'none'}", param="tool_choice")
    disable = choice.get("disable_parallel_tool_use", False)
    if not isinstance(disable, bool):
        raise bad_request("tool_choice.disable_parallel_tool_use: must be a boolean", param="tool_choice")
    request.parallel = not disable
    kind = choice["type"]
    request.mode = {"auto": "auto" if tools else "none", "any": "required", "tool": "named", "none": "none"}[kind]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice.name: Field required", param="tool_choice.name")
        request.named = choice["name"]
    return check_choice(request, "tool_choice")


# ------------------------------------------------------------------------- response pieces

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error",
               529: "overloaded_error"}


def error_body(error: APIError) -> dict[str, Any]:
    """An error in Anthropic's shape."""
    kind = ERROR_TYPES.get(error.status, "api_error" if error.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


def tool_use_id(call: ToolCall | str) -> str:
    """Anthropic's id for a call (`toolu_...`), from the parser's `call_...` id."""
    call_id = call if isinstance(call, str) else call.id
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(gen: "Generation", finish: str | None, calls_made: bool) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence) of the one choice of `gen`."""
    if finish == "length":
        return "max_tokens", None
    if calls_made:
        return "tool_use", None
    matcher = gen.choices[0].matcher
    if matcher is not None and matcher.matched is not None:
        return "stop_sequence", matcher.matched
    return "end_turn", None
