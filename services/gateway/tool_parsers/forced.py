"""Replies written under `tool_choice` "required" or a named function, which the grammar engine kept to
a JSON schema (`services.gateway.tools.forced_schema`): no wrapper tags, just JSON.

- named: the reply is the arguments object of that one function; it streams as argument pieces.
- required: the reply is `[{"name": ..., "arguments": {...}}, ...]`; it is parsed once complete.
Output that is not such JSON (no grammar engine, or cut short by max_tokens) is plain content.
"""

from __future__ import annotations

import json

from services.gateway.tool_parsers.base import StreamPiece, ToolCall, ToolCallDelta, ToolStreamer, call_from_object


def extract_named(text: str, name: str) -> tuple[str | None, list[ToolCall]]:
    try:
        args = json.loads(text)
    except ValueError:
        return text, []
    if not isinstance(args, dict):
        return text, []
    return None, [ToolCall(name, json.dumps(args, ensure_ascii=False))]


def extract_required(text: str) -> tuple[str | None, list[ToolCall]]:
    try:
        value = json.loads(text)
    except ValueError:
        return text, []
    items = value if isinstance(value, list) else [value]
    calls = [call_from_object(item) for item in items]
    if not calls or any(call is None for call in calls):
        return text, []
    return None, calls  # type: ignore[return-value]


class NamedStreamer(ToolStreamer):
    """Every text delta is a piece of the one call's arguments."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def feed(self, text: str) -> StreamPiece:
        out = StreamPiece()
        if self.num_calls == 0:
            if not text.strip():
                return out  # the call begins with its first visible character
            out.calls.append(self._begin_call(self._name, text.lstrip()))
            return out
        out.calls.append(ToolCallDelta(0, text))
        return out

    def finish(self) -> StreamPiece:
        return StreamPiece()


class RequiredStreamer(ToolStreamer):
    """Holds the JSON array until it is complete (its calls are only known then)."""

    def __init__(self) -> None:
        super().__init__()
        self._text = ""

    def feed(self, text: str) -> StreamPiece:
        self._text += text
        return StreamPiece()

    def finish(self) -> StreamPiece:
        content, calls = extract_required(self._text)
        if not calls:
            return StreamPiece(content=content or "")
        return StreamPiece(calls=[self._begin_call(call.name, call.arguments) for call in calls])
