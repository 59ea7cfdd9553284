"""Hermes-style calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5, Qwen3, SmolLM2).

Streaming: content flows until `<tool_call>` begins (a partial tag at the end of a delta is held
back); once a call's name is readable its header goes out, then its arguments as the model writes
them (trailing `}` and blanks are held back, since the last `}` closes the call object, not the
arguments); `</tool_call>` ends the call. A call whose JSON does not parse goes out as the text it
was, as content.
"""

from __future__ import annotations

import json
import logging
import re

from services.gateway.tool_parsers.base import (
    StreamPiece, ToolCall, ToolCallDelta, ToolParser, ToolStreamer, call_args_text, call_from_object,
)

logger = logging.getLogger(__name__)

START, END = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.S)
# `{"name": "fn", "arguments": ` at the start of a call body: enough to announce the call
_HEADER_RE = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def _held_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could be the start of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class HermesParser(ToolParser):
    name = "hermes"

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if START not in text:
            return text, []
        calls = []
        for match in _CALL_RE.finditer(text):
            try:
                obj = json.loads(match.group(1).strip())
            except ValueError:
                return text, []  # malformed: the whole reply is plain content
            call = call_from_object(obj)
            if call is None:
                return text, []
            calls.append(call)
        content = text[: text.index(START)].strip()
        return content or None, calls

    def streamer(self) -> ToolStreamer:
        return HermesStreamer()

    def tools_system_prompt(self, tools: list[dict]) -> str:
        listed = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        return (
            "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{listed}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
        )

    def render_calls(self, tool_calls: list[dict]) -> str:
        parts = []
        for call in tool_calls:
            name, args = call_args_text(call)
            parts.append(f"{START}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{END}")
        return "\n".join(parts)

    def render_results(self, results: list[str]) -> str:
        return "\n".join(f"<tool_response>\n{result}\n</tool_response>" for result in results)


class HermesStreamer(ToolStreamer):
    def __init__(self) -> None:
        super().__init__()
        self._pending = ""  # text not yet sent (outside calls: a possible partial START)
        self._in_call = False
        self._body = ""  # the current call's text after START
        self._header_sent = False
        self._args_sent = 0  # characters of the current call's arguments already sent

    def feed(self, text: str) -> StreamPiece:
        out = StreamPiece()
        self._pending += text
        while True:
            if not self._in_call:
                at = self._pending.find(START)
                if at < 0:
                    keep = _held_tail(self._pending, START)
                    out.content += self._content(self._pending[: len(self._pending) - keep])
                    self._pending = self._pending[len(self._pending) - keep:]
                    return out
                out.content += self._content(self._pending[:at])
                self._pending = self._pending[at + len(START):]
                self._in_call, self._body, self._header_sent, self._args_sent = True, "", False, 0
            end = self._pending.find(END)
            if end < 0:
                keep = _held_tail(self._pending, END)
                self._body += self._pending[: len(self._pending) - keep]
                self._pending = self._pending[len(self._pending) - keep:]
                out.extend(self._progress())
                return out
            self._body += self._pending[:end]
            self._pending = self._pending[end + len(END):]
            out.extend(self._close(END))

    def finish(self) -> StreamPiece:
        out = StreamPiece()
        if self._in_call:
            self._body += self._pending
            self._pending = ""
            out.extend(self._close(""))
        out.content += self._content(self._pending)
        self._pending = ""
        return out

    def _content(self, text: str) -> str:
        # once calls began, the blank lines between and after them are not content
        return text if self.num_calls == 0 or text.strip() else ""

    def _progress(self) -> StreamPiece:
        """Header and new argument text of the open call."""
        out = StreamPiece()
        header = _HEADER_RE.match(self._body)
        if header is None:
            return out
        if not self._header_sent:
            try:
                name = json.loads(f'"{header.group(1)}"')
            except ValueError:
                return out
            out.calls.append(self._begin_call(name))
            self._header_sent = True
        # what can be sent: everything but trailing `}` / blanks (the call object's own `}` is among them)
        args = self._body[header.end():].rstrip(" \t\r\n}")
        if len(args) > self._args_sent:
            out.calls.append(self._more_args(args[self._args_sent:]))
            self._args_sent = len(args)
        return out

    def _close(self, end_tag: str) -> StreamPiece:
        out = self._progress()
        body, self._in_call = self._body, False
        try:
            call = call_from_object(json.loads(body.strip()))
        except ValueError:
            call = None
        header = _HEADER_RE.match(body)
        if not self._header_sent:
            if call is None:
                out.content += f"{START}{body}{end_tag}"  # not a call after all: the user gets the text
            else:
                out.calls.append(self._begin_call(call.name, call.arguments))
            return out
        if call is None:
            logger.info("streamed tool call %d has malformed JSON", self.num_calls - 1)
        raw = body[header.end():].rstrip() if header else ""
        final = raw[:-1].rstrip() if raw.endswith("}") else raw  # without the call object's `}`
        if len(final) > self._args_sent:
            out.calls.append(self._more_args(final[self._args_sent:]))
            self._args_sent = len(final)
        return out

    def _more_args(self, text: str) -> ToolCallDelta:
        return ToolCallDelta(self.num_calls - 1, text)
