"""Tool calling on the gateway: validate `tools` / `tool_choice`, put the tools into the prompt, force
calls with the grammar engine, and pick what parses the reply.

`tool_choice` "required" and a named function are enforced, not hoped for: the request gets a JSON
schema (`structured_kind="json_schema"`) for the call(s), so the reply always parses as calls
(see `tool_parsers/forced.py` for the shapes). "auto" leaves the model free and parses its reply in
the format of its chat template (`tool_parsers`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from common.engine.grammar import grammar_for
from common.engine.sampling_params import SamplingParams
from common.tokenizer import Tokenizer
from services.gateway.json_fields import bad_request, json_type
from services.gateway.tool_parsers import StreamPiece, ToolCall, ToolParser, ToolStreamer, forced, \
    parser_for_template

MAX_TOOLS = 128
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolRequest:
    """A request's tools (OpenAI function-tool dicts) and how the model may use them."""

    tools: list[dict] = field(default_factory=list)
    mode: str = "none"  # "none" | "auto" | "required" | "named"
    named: str | None = None  # mode "named": the function to call
    parallel: bool = True

    @property
    def active(self) -> bool:
        return self.mode != "none" and bool(self.tools)

    def schema_of(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or EMPTY_PARAMETERS
        raise KeyError(name)


# ---------------------------------------------------------------------------------- validation


def function_tool(name: Any, description: Any, parameters: Any, where: str) -> dict:
    """One validated function tool in OpenAI's shape."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise bad_request(f"{where}: the function name must be 1-64 letters, digits, '_', '.' or '-', "
                          f"got {name!r}", param=where)
    if description is not None and not isinstance(description, str):
        raise bad_request(f"{where}: 'description' must be a string", param=where, code="invalid_type")
    if parameters is None:
        parameters = EMPTY_PARAMETERS
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}: the parameters must be a JSON schema object, got {json_type(parameters)}",
                          param=where, code="invalid_type")
    if parameters.get("type", "object") != "object":
        raise bad_request(f"{where}: the parameters schema must describe an object", param=where)
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    function["parameters"] = parameters
    return {"type": "function", "function": function}


def check_unique(tools: list[dict], param: str) -> None:
    names = [tool["function"]["name"] for tool in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise bad_request(f"two tools are named {duplicate!r}", param=param)
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools per request, got {len(tools)}", param=param)


def parse_openai_tools(body: dict[str, Any]) -> ToolRequest:
    """`tools`, `tool_choice`, `parallel_tool_calls` of a chat completions body."""
    raw = body.get("tools")
    tools = []
    if raw is not None:
        if not isinstance(raw, list):
            raise bad_request(f"'tools' must be an array, got {json_type(raw)}", param="tools", code="invalid_type")
        for i, tool in enumerate(raw):
            where = f"tools[{i}]"
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                kind = tool.get("type") if isinstance(tool, dict) else json_type(tool)
                raise bad_request(f"{where} must be a function tool {{'type': 'function', 'function': {{...}}}}, "
                                  f"got type {kind!r}", param=where)
            function = tool.get("function")
            if not isinstance(function, dict):
                raise bad_request(f"{where}.function is required and must be an object", param=f"{where}.function")
            tools.append(function_tool(function.get("name"), function.get("description"),
                                       function.get("parameters"), f"{where}.function"))
        check_unique(tools, "tools")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is None:
        parallel = True
    if not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls",
                          code="invalid_type")
    choice = body.get("tool_choice")
    request = ToolRequest(tools=tools, parallel=parallel, mode="auto" if tools else "none")
    if choice is None:
        return request
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise bad_request(f"'tool_choice' must be 'none', 'auto', 'required' or a function, got {choice!r}",
                              param="tool_choice")
        request.mode = choice
    elif isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise bad_request("'tool_choice' as an object must be {'type': 'function', 'function': {'name': ...}}",
                              param="tool_choice")
        request.mode, request.named = "named", name
    else:
        raise bad_request(f"'tool_choice' must be a string or an object, got {json_type(choice)}",
                          param="tool_choice", code="invalid_type")
    return check_choice(request, "tool_choice")


def check_choice(request: ToolRequest, param: str) -> ToolRequest:
    if request.mode in ("required", "named") and not request.tools:
        raise bad_request(f"'{param}' asks for a tool call but no tools were given", param=param)
    if request.mode == "named" and request.named not in {t["function"]["name"] for t in request.tools}:
        raise bad_request(f"'{param}' names function {request.named!r}, which is not among the tools",
                          param=param)
    return request


def check_tool_messages(messages: list[dict]) -> None:
    """Assistant `tool_calls` and `tool` messages of a chat history, OpenAI's shapes."""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        calls = message.get("tool_calls")
        if calls is not None:
            if message.get("role") != "assistant" or not isinstance(calls, list):
                raise bad_request(f"{where}.tool_calls must be an array on an assistant message",
                                  param=f"{where}.tool_calls")
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str) \
                        or not isinstance(function.get("arguments", ""), (str, dict)):
                    raise bad_request(f"{where}.tool_calls[{j}] must be {{'id', 'type': 'function', 'function': "
                                      "{'name': str, 'arguments': str}}", param=f"{where}.tool_calls")
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id", ""), str):
            raise bad_request(f"{where}.tool_call_id must be a string", param=f"{where}.tool_call_id")


# ------------------------------------------------------------------------------ forcing calls


def forced_schema(request: ToolRequest) -> dict | None:
    """The JSON schema the reply must follow, or None when the model may answer freely."""
    if request.mode == "named":
        return request.schema_of(request.named or "")
    if request.mode != "required":
        return None
    variants = [
        {"type": "object",
         "properties": {"name": {"type": "string", "enum": [tool["function"]["name"]]},
                        "arguments": tool["function"].get("parameters") or EMPTY_PARAMETERS},
         "required": ["name", "arguments"]}
        for tool in request.tools
    ]
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": item, "minItems": 1}
    if not request.parallel:
        schema["maxItems"] = 1
    return schema


def apply_to_params(request: ToolRequest, params: SamplingParams, param: str = "tool_choice") -> None:
    """Constrain the sampler for "required" / a named function (structured outputs' fields)."""
    schema = forced_schema(request)
    if schema is None:
        return
    if params.structured_kind is not None:
        raise bad_request("a forced tool call cannot be combined with 'response_format'", param=param)
    spec = json.dumps(schema, ensure_ascii=False)
    try:
        grammar_for("json_schema", spec)  # compiled (and cached) now: a bad tool schema is a 400 here
    except ValueError as exc:  # the grammar engine's error (a ValueError) names what it cannot enforce
        message = str(exc).removeprefix("structured_spec: ")
        raise bad_request(f"the tools' parameter schemas cannot be enforced: {message}", param="tools") from None
    params.structured_kind = "json_schema"
    params.structured_spec = spec


# ------------------------------------------------------------------------------------ prompts


def model_parser(tokenizer: Tokenizer, override: str | None = None) -> ToolParser:
    """The served model's call format: `--tool-call-parser`'s choice, else the one its template shows."""
    return parser_for_template(_template_text(tokenizer), override)


def _template_text(tokenizer: Tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        return template.get("tool_use") or template.get("default") or ""
    return template or ""


def prompt_ids(tokenizer: Tokenizer, messages: list[dict], request: ToolRequest, parser: ToolParser,
               add_generation_prompt: bool = True) -> list[int]:
    """The conversation (with tools, tool calls and results) rendered by the model's template.

    A template that renders tools gets them as transformers passes them; one that does not gets the
    parser's instructions in the system prompt, and calls/results of the history written in the
    parser's format (so small models like SmolLM2 still see them).
    """
    template = _template_text(tokenizer)
    knows_tools = "tools" in template
    knows_calls = "tool_calls" in template
    if not knows_calls:
        messages = _history_as_text(messages, parser)
    tools = request.tools if request.active else None
    if tools and not knows_tools:
        messages = _with_system(messages, parser.tools_system_prompt(tools))
        tools = None
    return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def _history_as_text(messages: list[dict], parser: ToolParser) -> list[dict]:
    out: list[dict] = []
    results: list[str] = []
    for message in messages:
        if message.get("role") == "tool":
            results.append(_text_of(message.get("content")))
            continue
        if results:
            out.append({"role": "user", "content": parser.render_results(results)})
            results = []
        if message.get("role") == "assistant" and message.get("tool_calls"):
            text = _text_of(message.get("content"))
            calls = parser.render_calls(message["tool_calls"])
            out.append({"role": "assistant", "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append(message)
    if results:
        out.append({"role": "user", "content": parser.render_results(results)})
    return out


def _with_system(messages: list[dict], prompt: str) -> list[dict]:
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        text = _text_of(first.get("content"))
        first["content"] = f"{text}\n\n{prompt}" if text else prompt
        return [first, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


# ------------------------------------------------------------------------------------ replies


class ReplyParser:
    """Turns one request's replies into content + calls, per its tool mode."""

    def __init__(self, request: ToolRequest, parser: ToolParser) -> None:
        self.request = request
        self.parser = parser

    @property
    def active(self) -> bool:
        return self.request.active

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        mode = self.request.mode
        if not self.request.active:
            return text, []
        if mode == "named":
            return forced.extract_named(text, self.request.named or "")
        if mode == "required":
            return forced.extract_required(text)
        content, calls = self.parser.extract(text)
        if calls and not self.request.parallel:
            calls = calls[:1]
        return content, calls

    def streamer(self) -> ToolStreamer | None:
        mode = self.request.mode
        if not self.request.active:
            return None
        if mode == "named":
            return forced.NamedStreamer(self.request.named or "")
        if mode == "required":
            return forced.RequiredStreamer()
        return self.parser.streamer()


def finish_reason(reason: str | None, calls_made: bool) -> str | None:
    """OpenAI reports a reply that ended in calls as "tool_calls" (a cut-off one stays "length")."""
    if calls_made and reason == "stop":
        return "tool_calls"
    return reason


__all__ = [
    "ReplyParser", "StreamPiece", "ToolRequest", "apply_to_params", "check_choice", "check_tool_messages",
    "check_unique", "finish_reason", "forced_schema", "function_tool", "model_parser", "parse_openai_tools",
    "prompt_ids",
]
