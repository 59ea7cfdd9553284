"""Llama 3.1/3.2 JSON calls: the reply is `{"name": ..., "parameters": {...}}` (maybe after `<|python_tag|>`,
several joined by `;`).

A reply is a call only when all of it is; so when streaming, a reply that starts with `{` (or the
python tag) is held until it ends, and any other reply streams as content at once.
"""

from __future__ import annotations

import json

from services.gateway.tool_parsers.base import (
    StreamPiece, ToolCall, ToolParser, ToolStreamer, call_args_text, call_from_object,
)

PYTHON_TAG = "<|python_tag|>"


def _split_objects(text: str) -> list[object] | None:
    """The JSON objects of `{...}; {...}` (or `{...}{...}`), or None if anything else is there."""
    decoder = json.JSONDecoder()
    objects, pos = [], 0
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos >= len(text):
            return objects
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return None
        objects.append(obj)


class Llama3JsonParser(ToolParser):
    name = "llama3_json"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(PYTHON_TAG):
            body = body[len(PYTHON_TAG):].strip()
        if not body.startswith("{"):
            return text, []
        objects = _split_objects(body)
        if not objects:
            return text, []
        calls = [call_from_object(obj, ("parameters", "arguments")) for obj in objects]
        if any(call is None for call in calls):
            return text, []
        return None, calls  # type: ignore[return-value]

    def streamer(self) -> ToolStreamer:
        return _Llama3Streamer(self)

    def tools_system_prompt(self, tools: list[dict]) -> str:
        listed = "\n\n".join(json.dumps(tool, indent=4, ensure_ascii=False) for tool in tools)
        return (
            "Given the following functions, please respond with a JSON for a function call with its proper "
            "arguments that best answers the given prompt.\n\n"
            'Respond in the format {"name": function name, "parameters": dictionary of argument name and its '
            "value}. Do not use variables.\n\n" + listed
        )

    def render_calls(self, tool_calls: list[dict]) -> str:
        return "; ".join(
            json.dumps({"name": name, "parameters": args}, ensure_ascii=False)
            for name, args in (call_args_text(call) for call in tool_calls)
        )

    def render_results(self, results: list[str]) -> str:
        return "\n".join(results)


class _Llama3Streamer(ToolStreamer):
    def __init__(self, parser: Llama3JsonParser) -> None:
        super().__init__()
        self._parser = parser
        self._text = ""
        self._holding: bool | None = None  # None until the first non-blank text decides

    def feed(self, text: str) -> StreamPiece:
        if self._holding is False:
            return StreamPiece(content=text)
        self._text += text
        head = self._text.lstrip()
        if not head:
            return StreamPiece()
        if head.startswith("{") or head.startswith(PYTHON_TAG):
            self._holding = True
            return StreamPiece()
        if PYTHON_TAG.startswith(head):
            return StreamPiece()  # maybe the tag, still arriving
        self._holding = False
        out, self._text = self._text, ""
        return StreamPiece(content=out)

    def finish(self) -> StreamPiece:
        text, self._text = self._text, ""
        if not text:
            return StreamPiece()
        content, calls = self._parser.extract(text)
        if not calls:
            return StreamPiece(content=content or "")
        return StreamPiece(calls=[self._begin_call(call.name, call.arguments) for call in calls])
