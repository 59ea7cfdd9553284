"""Structured outputs over real HTTP with the official `openai` client (`xllm serve`, default model):
response_format json_schema / json_object, vLLM's guided_regex / guided_choice / guided_grammar,
streaming and not, greedy and seeded; bad specs get a 400 naming the parameter; and the JSON is
still valid after a P/D hand-off (the decode worker rebuilds the matcher from the outputs)."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

pytestmark = pytest.mark.timeout(900)

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "founded": {"type": "integer", "minimum": 0, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "minItems": 1, "maxItems": 2},
    },
    "required": ["city", "founded", "tags"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
CHAT = [{"role": "user", "content": "Describe Paris as JSON with its name, founding year and two tags."}]
MAX_TOKENS = 64


def make_client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return make_client(server)


def check_json(text: str, finish_reason: str) -> None:
    # A max_tokens cut-off leaves incomplete JSON (as OpenAI does); a grammar end is "stop".
    if finish_reason == "length":
        assert text.startswith("{")
        return
    assert finish_reason == "stop", (finish_reason, text)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_json_schema_greedy_and_seeded(client, model_id):
    greedy = client.chat.completions.create(model=model_id, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS,
                                            response_format=RESPONSE_FORMAT)
    choice = greedy.choices[0]
    assert choice.finish_reason == "stop"
    check_json(choice.message.content, choice.finish_reason)
    seeded = client.chat.completions.create(model=model_id, messages=CHAT, temperature=1.0, seed=5, n=2,
                                            max_tokens=MAX_TOKENS, response_format=RESPONSE_FORMAT)
    for choice in seeded.choices:
        check_json(choice.message.content, choice.finish_reason)


def test_json_schema_streaming(client, model_id):
    stream = client.chat.completions.create(model=model_id, messages=CHAT, temperature=0.7, seed=3,
                                            max_tokens=MAX_TOKENS, response_format=RESPONSE_FORMAT, stream=True)
    parts, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    check_json("".join(parts), finish)


def test_json_object_and_guided_json_on_completions(client, model_id):
    chat = client.chat.completions.create(model=model_id, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS,
                                          response_format={"type": "json_object"})
    if chat.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(chat.choices[0].message.content), dict)
    completion = client.completions.create(model=model_id, prompt="A city as JSON:", temperature=0,
                                           max_tokens=MAX_TOKENS, extra_body={"guided_json": SCHEMA})
    check_json(completion.choices[0].text, completion.choices[0].finish_reason)


def test_regex_choice_and_grammar(client, model_id):
    pattern = r"[0-9]{3}-[0-9]{4}"
    out = client.completions.create(model=model_id, prompt="My phone number is", temperature=0.8, seed=1,
                                    max_tokens=20, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, out.choices[0].text) and out.choices[0].finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    out = client.chat.completions.create(
        model=model_id, temperature=0, max_tokens=10, extra_body={"guided_choice": choices},
        messages=[{"role": "user", "content": "Sentiment of 'I love it'?"}])
    assert out.choices[0].message.content in choices and out.choices[0].finish_reason == "stop"
    out = client.completions.create(model=model_id, prompt="Answer yes or no:", temperature=0, max_tokens=10,
                                    extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert out.choices[0].text in ("yes", "no")


@pytest.mark.parametrize("extra, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "integer", "minimum": 5, "maximum": 1}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_choice": ["a", 3]}, "guided_choice"),
    ({"guided_choice": "a"}, "guided_choice"),
    ({"guided_grammar": "start: nowhere"}, "guided_grammar"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
])
def test_bad_specs_are_400_naming_the_param(client, model_id, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_id, messages=CHAT, max_tokens=4, extra_body=extra)
    error = info.value.response.json()["error"]
    assert error["param"] == param and len(error["message"]) > 10


def test_json_stays_valid_after_the_pd_handoff(xllm_server_factory, server):
    server.stop()  # one xllm server at a time on this machine
    pd = xllm_server_factory(extra_args=("--prefill-workers", "1", "--decode-workers", "1"))
    pd.wait_until(lambda: len(pd.status()["instances"]) == 2, 60, "both workers to register")
    client = make_client(pd)
    model_id = client.models.list().data[0].id
    out = client.chat.completions.create(model=model_id, messages=CHAT, temperature=0, max_tokens=MAX_TOKENS,
                                         response_format=RESPONSE_FORMAT)
    assert out.usage.completion_tokens > 1  # the decode worker produced tokens after the hand-off
    check_json(out.choices[0].message.content, out.choices[0].finish_reason)
    # The request went prefill -> decode over the kv socket (stats arrive with heartbeats).
    stats = pd.wait_until(
        lambda: (s := {i["id"]: i["stats"] for i in pd.status()["instances"]})
        and s["decode-0"]["kv_received_ok"] >= 1 and s, 10, "the transfer in the stats")
    assert stats["prefill-0"]["kv_transfer_fallbacks"] == 0
