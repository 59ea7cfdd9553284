"""Chat templates: render OpenAI-style messages with the model's jinja2 template.

Rendered in a sandbox set up like transformers' (``raise_exception``, ``strftime_now``, a
non-escaping ``tojson``, ``namespace``), so our prompts equal ``apply_chat_template``'s.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["render_chat"]

# A template that loops over a message's content handles OpenAI-style content parts itself.
_CONTENT_LOOP_RE = re.compile(r"for\s+\w+\s+in\s+\w+(\[['\"]content['\"]\]|\.content)")


def render_chat(
    template: str,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    tools: list[dict] | None = None,
    context: dict[str, Any] | None = None,
) -> str:
    """Render ``messages`` with ``template``; a template error or rejection is a ``ValueError``."""
    normalized = _normalize_messages(messages, keep_parts=bool(_CONTENT_LOOP_RE.search(template)))
    try:
        return _compiled(template).render(
            messages=normalized, tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **(context or {}),
        )
    except jinja2.TemplateError as exc:
        # raise_exception() in a template signals a conversation the model cannot take
        raise ValueError(f"chat template rejected the conversation: {exc}") from exc


@lru_cache(maxsize=32)
def _compiled(template: str) -> jinja2.Template:
    try:
        return _template_environment().from_string(template)
    except jinja2.TemplateError as exc:
        raise ValueError(f"the model's chat template does not compile: {exc}") from exc


def _normalize_messages(messages: list[dict], keep_parts: bool) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{index}].role must be a string")
        # transformers drops None-valued keys: templates handle a missing key, not a literal None
        clean = {key: value for key, value in message.items() if value is not None}
        content = clean.get("content")
        if isinstance(content, list) and not keep_parts:
            clean["content"] = _parts_to_text(content, index)
        elif content is not None and not isinstance(content, (str, list)):
            raise ValueError(f"messages[{index}].content must be a string or a list of content parts")
        if isinstance(clean.get("tool_calls"), list):
            clean["tool_calls"] = [_call_with_object_arguments(call) for call in clean["tool_calls"]]
        normalized.append(clean)
    return normalized


def _call_with_object_arguments(call: Any) -> Any:
    """OpenAI sends a call's arguments as JSON text; templates (Qwen, Llama 3.1) write them with
    ``tojson`` and expect the object, as vLLM hands it to them."""
    if not isinstance(call, dict):
        return call
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except ValueError:
        return call  # shown to the model as written
    return {**call, "function": {**function, "arguments": arguments}}


def _parts_to_text(parts: list, message_index: int) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(
                f"messages[{message_index}].content has a part of type {kind!r}; this model takes text only"
            )
    # vLLM's "string" content format joins text parts with newlines
    return "\n".join(texts)


@lru_cache(maxsize=1)
def _template_environment() -> ImmutableSandboxedEnvironment:
    """The sandbox transformers renders chat templates in (same options, filters and globals)."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        # jinja's own tojson HTML-escapes, which corrupts JSON shown to the model
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    class _Namespace(jinja2.utils.Namespace):
        # underscore attributes are how sandbox escapes reach CPython internals
        def __init__(*args: Any, **kwargs: Any) -> None:
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for key in attrs:
                _Namespace._check(key)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set attribute {name!r}")

    class _TemplateDict:
        # dict() for templates, without exposing the dict type itself to attribute games
        def __call__(self, *args: Any, **kwargs: Any) -> dict:
            return dict(*args, **kwargs)

        def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
            return dict.fromkeys(*args, **kwargs)

    class _GenerationTag(jinja2.ext.Extension):
        # {% generation %} marks assistant spans for training masks; rendering just passes the body through
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["namespace"] = _Namespace
    env.globals["dict"] = _TemplateDict()
    return env
