"""The Anthropic Messages API (`/v1/messages`) through the official `anthropic` client, on a real
`xllm serve` (SmolLM2-135M).

The request is translated onto the chat path, so greedy text must equal what
`/v1/chat/completions` gives for the same conversation; tool use with `tool_choice={"type": "any"}`
is enforced by the grammar engine, so the call always comes back as a `tool_use` block.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import anthropic
import pytest

pytestmark = pytest.mark.timeout(600)

HELLO = [{"role": "user", "content": "Name three colors of the rainbow."}]
GREEDY = {"temperature": 0}  # this client version no longer has sampling keywords: they go in the body
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city",
           "input_schema": {"type": "object",
                            "properties": {"city": {"type": "string", "maxLength": 12},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                            "required": ["city", "unit"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.base_url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _openai_text(server, model_id: str, messages: list[dict], max_tokens: int) -> str:
    status, body = _post(server, "/v1/chat/completions", {"model": model_id, "messages": messages,
                                                          "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def test_message_matches_chat_completions(client, server, model_id):
    message = client.messages.create(model=model_id, max_tokens=10, messages=HELLO, extra_body=GREEDY,
                                     metadata={"user_id": "tester"})
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.stop_reason in ("end_turn", "max_tokens") and message.stop_sequence is None
    assert message.content[0].text == _openai_text(server, model_id, HELLO, 10)
    assert message.usage.input_tokens > 0 and 0 < message.usage.output_tokens <= 10
    counted = client.messages.count_tokens(model=model_id, messages=HELLO)
    assert counted.input_tokens == message.usage.input_tokens


def test_stream_text_equals_non_stream(client, model_id):
    whole = client.messages.create(model=model_id, max_tokens=12, messages=HELLO, extra_body=GREEDY)
    with client.messages.stream(model=model_id, max_tokens=12, messages=HELLO, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_system_prompt_string_and_blocks(client, server, model_id):
    system = "You are a pirate. Answer like one."
    expected = _openai_text(server, model_id, [{"role": "system", "content": system}, *HELLO], 10)
    as_string = client.messages.create(model=model_id, max_tokens=10, system=system, messages=HELLO,
                                       extra_body=GREEDY)
    as_blocks = client.messages.create(model=model_id, max_tokens=10, messages=HELLO, extra_body=GREEDY,
                                       system=[{"type": "text", "text": system}])
    assert as_string.content[0].text == as_blocks.content[0].text == expected


def test_stop_sequences(client, model_id):
    free = client.messages.create(model=model_id, max_tokens=16, messages=HELLO, extra_body=GREEDY)
    text = free.content[0].text
    words = [w for w in text.split() if len(w) > 2]
    assert len(words) >= 2, text
    stop = words[1]
    cut = client.messages.create(model=model_id, max_tokens=16, messages=HELLO, extra_body=GREEDY,
                                 stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == text[: text.index(stop)]


def test_tool_use_round_trip(client, model_id):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = client.messages.create(model=model_id, max_tokens=64, messages=ask, tools=[WEATHER],
                                     tool_choice={"type": "any"}, extra_body=GREEDY)
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) >= 1 and uses[0].name == "get_weather" and uses[0].id.startswith("toolu_")
    assert set(uses[0].input) == {"city", "unit"} and uses[0].input["unit"] in ("celsius", "fahrenheit")

    blocks = [block.model_dump(exclude_none=True) for block in message.content]
    history = [*ask, {"role": "assistant", "content": blocks},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                             "content": "sunny, 21 degrees"}]}]
    answer = client.messages.create(model=model_id, max_tokens=12, messages=history, tools=[WEATHER],
                                    extra_body=GREEDY, tool_choice={"type": "none"})
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text" and answer.content[0].text
    # the call and its result were rendered into the prompt (tool_choice none leaves the tools out)
    assert answer.usage.input_tokens > client.messages.count_tokens(model=model_id, messages=ask).input_tokens + 20


def test_tool_use_streamed(client, model_id):
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    kwargs = dict(model=model_id, max_tokens=64, messages=ask, tools=[WEATHER], extra_body=GREEDY,
                  tool_choice={"type": "tool", "name": "get_weather"})
    whole = client.messages.create(**kwargs)
    events = []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert events[0] == "message_start" and "content_block_start" in events and events[-1] == "message_stop"
    assert final.stop_reason == "tool_use"
    streamed = [b for b in final.content if b.type == "tool_use"]
    expected = [b for b in whole.content if b.type == "tool_use"]
    assert [(b.name, b.input) for b in streamed] == [(b.name, b.input) for b in expected]


def test_bad_requests(client, server, model_id):
    with pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model=model_id, max_tokens=8, messages=HELLO, extra_body={"temperature": 9})
    assert info.value.body["type"] == "error" and info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=model_id, max_tokens=8, messages=[{"role": "system", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError):
        client.messages.create(model=model_id, max_tokens=8, messages=HELLO, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "missing"})
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    status, body = _post(server, "/v1/messages", {"model": model_id, "messages": HELLO})  # no max_tokens
    assert status == 400 and body["type"] == "error" and "max_tokens" in body["error"]["message"]
    status, body = _post(server, "/v1/messages", {"model": model_id, "max_tokens": 4, "messages": [
        {"role": "user", "content": [{"type": "image", "source": {}}]}]})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    # the server still serves after all of them
    assert client.messages.create(model=model_id, max_tokens=2, messages=HELLO).content
