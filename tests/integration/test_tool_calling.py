"""Tool calling through the official `openai` client against a real `xllm serve` (SmolLM2-135M).

`tool_choice="required"` and a named function are enforced by the grammar engine, so even this
small model always answers with a call whose arguments parse and follow the tool's schema; the
round trip (call -> tool result -> answer) renders the call and result through the chat template.
"""

from __future__ import annotations

import json

import openai
import pytest

pytestmark = pytest.mark.timeout(600)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 8}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
MAX_TOKENS = 64


def _check_weather_args(arguments: str) -> dict:
    args = json.loads(arguments)
    assert set(args) == {"city", "unit"} and args["unit"] in ("celsius", "fahrenheit")
    assert isinstance(args["city"], str) and len(args["city"]) <= 12
    return args


def _collect_stream(stream) -> tuple[str, dict[int, dict], str | None]:
    """(content, {index: {id, name, arguments}}, finish_reason) of a streamed chat completion."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for call in delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"id": None, "name": None, "arguments": "", "pieces": 0})
                if call.id:
                    assert entry["id"] is None, "a call's id comes once"
                    entry["id"], entry["name"] = call.id, call.function.name
                    assert call.type == "function"
                entry["arguments"] += call.function.arguments or ""
                entry["pieces"] += 1
            if choice.finish_reason:
                finish = choice.finish_reason
    return content, calls, finish


def test_required_round_trip(client, model_id):
    first = client.chat.completions.create(model=model_id, messages=ASK, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=MAX_TOKENS)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].type == "function" and calls[0].id.startswith("call_")
    assert calls[0].function.name == "get_weather"
    _check_weather_args(calls[0].function.arguments)
    assert first.usage.completion_tokens > 0

    # the call and its result go back into the conversation; the model answers in text
    history = [*ASK, choice.message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": calls[0].id, "content": '{"temperature": 21, "sky": "sunny"}'}]
    second = client.chat.completions.create(model=model_id, messages=history, tools=[WEATHER], temperature=0,
                                            max_tokens=16, tool_choice="none")
    answer = second.choices[0]
    assert answer.message.tool_calls is None and answer.message.content
    assert answer.finish_reason in ("stop", "length")
    # the rendered history holds the call and the result (the prompt grew by both)
    alone = client.chat.completions.create(model=model_id, messages=ASK, tools=[WEATHER], tool_choice="none",
                                           max_tokens=1)
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 20


def test_required_streamed_matches_non_streamed(client, model_id):
    kwargs = dict(model=model_id, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", temperature=0,
                  max_tokens=MAX_TOKENS, parallel_tool_calls=False)
    whole = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = _collect_stream(client.chat.completions.create(stream=True, **kwargs))
    assert finish == "tool_calls" and content == ""
    assert list(calls) == [0] and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == whole.message.tool_calls[0].function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.message.tool_calls[0].function.arguments)


def test_named_function_streams_arguments_in_pieces(client, model_id):
    stream = client.chat.completions.create(
        model=model_id, messages=ASK, tools=[TIME, WEATHER], stream=True, temperature=0, max_tokens=MAX_TOKENS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    content, calls, finish = _collect_stream(stream)
    assert content == "" and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and calls[0]["pieces"] > 1  # arguments came in pieces
    _check_weather_args(calls[0]["arguments"])


def test_auto_reply_is_content_or_valid_calls(client, model_id):
    reply = client.chat.completions.create(model=model_id, messages=ASK, tools=[WEATHER], temperature=0,
                                           max_tokens=24)
    message = reply.choices[0].message
    if message.tool_calls:
        assert reply.choices[0].finish_reason == "tool_calls"
        json.loads(message.tool_calls[0].function.arguments)
    else:
        assert isinstance(message.content, str)


@pytest.mark.parametrize("extra", [
    {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tool_choice": "required"},
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}],
     "tool_choice": "required"},
    {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
])
def test_bad_tool_requests_are_400(client, model_id, extra):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model_id, messages=ASK, max_tokens=4, **extra)
