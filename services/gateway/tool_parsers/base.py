"""What every tool-call parser produces, and the interface each format implements.

A parser turns a model's text into OpenAI tool calls: all at once for a finished reply
(`extract`), or piece by piece while it streams (`streamer()` -> `ToolStreamer`). Output that does
not follow the format is plain content: a parser never raises on what a model wrote.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    """OpenAI-style tool call id (`call_` + 24 hex digits)."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(slots=True)
class ToolCall:
    """One complete call: `arguments` is JSON text of an object."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(slots=True)
class ToolCallDelta:
    """A streamed piece of call `index`: its first piece carries id and name, later ones only arguments."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = "function"
            out["function"] = {"name": self.name, "arguments": self.arguments}
        else:
            out["function"] = {"arguments": self.arguments}
        return out


@dataclass(slots=True)
class StreamPiece:
    """What one stretch of streamed text turned into: content for the user and/or call pieces."""

    content: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.calls)

    def extend(self, other: StreamPiece) -> None:
        self.content += other.content
        self.calls.extend(other.calls)


class ToolStreamer(ABC):
    """Parses one choice's streamed text; `feed` per text delta, `finish` once at the end."""

    def __init__(self) -> None:
        self.num_calls = 0  # calls begun so far (the next call's index)

    @abstractmethod
    def feed(self, text: str) -> StreamPiece: ...

    @abstractmethod
    def finish(self) -> StreamPiece: ...

    def _begin_call(self, name: str, arguments: str = "") -> ToolCallDelta:
        delta = ToolCallDelta(self.num_calls, arguments, new_call_id(), name)
        self.num_calls += 1
        return delta


def call_from_object(obj: Any, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ToolCall | None:
    """`{"name": str, "arguments": {...}}` (or `parameters`) -> a call; anything else -> None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class ToolParser(ABC):
    """One tool-call format: parse replies, and write calls/results back for templates that cannot."""

    name: str = ""

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; text not in the format is all content, no calls."""

    @abstractmethod
    def streamer(self) -> ToolStreamer: ...

    # ---- prompts for chat templates that know nothing of tools --------------------------------

    @abstractmethod
    def tools_system_prompt(self, tools: list[dict]) -> str:
        """Instructions that tell the model the tools and how to call them in this format."""

    @abstractmethod
    def render_calls(self, tool_calls: list[dict]) -> str:
        """An assistant message's OpenAI `tool_calls`, as the text the model would have written."""

    @abstractmethod
    def render_results(self, results: list[str]) -> str:
        """Consecutive tool results, as the text of one user turn."""


def call_args_text(call: dict) -> tuple[str, Any]:
    """(name, arguments as an object) of an OpenAI `tool_calls` entry (arguments may be JSON text)."""
    function = call.get("function") if isinstance(call.get("function"), dict) else call
    name = function.get("name") if isinstance(function.get("name"), str) else ""
    args = function.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            pass  # shown to the model as written
    return name, args
