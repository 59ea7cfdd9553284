"""Anthropic Messages bodies -> the chat path's messages, tools and sampling (pure; no server)."""

from __future__ import annotations

import json

import pytest

from services.gateway.anthropic_schema import error_body, parse_messages_request
from services.gateway.json_fields import APIError

TOOL = {"name": "get_weather", "description": "Weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def body(**extra):
    return {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **extra}


def test_translation_of_system_blocks_tool_use_and_results():
    req = parse_messages_request(body(
        system=[{"type": "text", "text": "be brief"}],
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "checking"},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                                         {"type": "text", "text": "thanks"}]},
        ],
        tools=[TOOL], tool_choice={"type": "any", "disable_parallel_tool_use": True},
        stop_sequences=["END"], temperature=0.5, top_k=5, metadata={"user_id": "u"}))
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert req.messages[1] == {"role": "user", "content": "weather?"}
    call = req.messages[2]["tool_calls"][0]
    assert req.messages[2]["content"] == "checking" and call["id"] == "toolu_1"
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    assert req.messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "cold"}
    assert req.messages[4] == {"role": "user", "content": "thanks"}
    assert (req.tools.mode, req.tools.parallel) == ("required", False)
    assert req.params.stop == ["END"] and req.params.top_k == 5 and req.params.max_tokens == 8


def test_tool_choice_kinds():
    assert parse_messages_request(body(tools=[TOOL])).tools.mode == "auto"
    named = parse_messages_request(body(tools=[TOOL], tool_choice={"type": "tool", "name": "get_weather"})).tools
    assert (named.mode, named.named) == ("named", "get_weather")
    assert parse_messages_request(body(tools=[TOOL], tool_choice={"type": "none"})).tools.mode == "none"


@pytest.mark.parametrize("bad", [
    {"max_tokens": None}, {"max_tokens": 0}, {"messages": []}, {"model": ""},
    {"messages": [{"role": "system", "content": "x"}]},
    {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
    {"messages": [{"role": "user", "content": 5}]},
    {"system": 3}, {"temperature": 1.5}, {"top_p": 0}, {"stop_sequences": "x"},
    {"tools": [{"name": "x"}]}, {"tools": [TOOL, TOOL]}, {"tool_choice": {"type": "any"}},
    {"tools": [TOOL], "tool_choice": {"type": "tool", "name": "other"}},
    {"tools": [TOOL], "tool_choice": {"type": "sometimes"}}, {"metadata": "x"},
])
def test_bad_bodies_are_400(bad):
    with pytest.raises(APIError) as info:
        parse_messages_request(body(**bad))
    assert info.value.status == 400
    shaped = error_body(info.value)
    assert shaped["type"] == "error" and shaped["error"]["type"] == "invalid_request_error"
    assert shaped["error"]["message"]
