"""Tool-call parsers, one per format, and the registry that picks one for the served model.

The format follows the model's chat template (what it was trained to write); the gateway flag
`--tool-call-parser` overrides the guess. A template that knows no tools at all gets the Hermes
format: its instructions go into the system prompt (see `services.gateway.tools`).
"""

from __future__ import annotations

from services.gateway.tool_parsers.base import (
    StreamPiece, ToolCall, ToolCallDelta, ToolParser, ToolStreamer, new_call_id,
)
from services.gateway.tool_parsers.hermes import HermesParser
from services.gateway.tool_parsers.llama3_json import Llama3JsonParser

__all__ = [
    "PARSERS", "StreamPiece", "ToolCall", "ToolCallDelta", "ToolParser", "ToolStreamer", "get_parser",
    "new_call_id", "parser_for_template",
]

PARSERS: dict[str, type[ToolParser]] = {
    HermesParser.name: HermesParser,
    Llama3JsonParser.name: Llama3JsonParser,
}


def get_parser(name: str) -> ToolParser:
    """The parser registered as `name`; ValueError naming the known ones otherwise."""
    try:
        return PARSERS[name]()
    except KeyError:
        raise ValueError(f"unknown tool call parser {name!r}; known: {sorted(PARSERS)}") from None


def parser_for_template(template: str | None, override: str | None = None) -> ToolParser:
    """The format the model behind `template` writes calls in (`override` wins when given)."""
    if override:
        return get_parser(override)
    text = template or ""
    if "<tool_call>" in text:
        return HermesParser()
    if "<|python_tag|>" in text or ("<|eot_id|>" in text and "tools" in text):
        return Llama3JsonParser()
    return HermesParser()
