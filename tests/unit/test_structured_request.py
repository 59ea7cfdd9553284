"""The gateway's structured-output options: response_format / guided_* -> the two SamplingParams fields."""

from __future__ import annotations

import json

import pytest

from services.gateway.openai_schema import APIError, parse_chat_request, parse_completion_request
from services.gateway.structured import MAX_SPEC_CHARS, parse_structured

MODEL = "m"
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("body, kind, spec", [
    ({}, None, None),
    ({"response_format": {"type": "text"}}, None, None),
    ({"response_format": {"type": "json_object"}}, "json_object", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     "json_schema", json.dumps(SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_object", None),
    ({"guided_json": SCHEMA}, "json_schema", json.dumps(SCHEMA)),
    ({"guided_json": json.dumps(SCHEMA)}, "json_schema", json.dumps(SCHEMA)),
    ({"guided_regex": "[0-9]+"}, "regex", "[0-9]+"),
    ({"guided_choice": ["a", "b c"]}, "choice", '["a", "b c"]'),
    ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
])
def test_options_become_kind_and_spec(body, kind, spec):
    assert parse_structured(body) == (kind, spec)
    for parsed in (parse_chat_request(chat(**body)),
                   parse_completion_request({"model": MODEL, "prompt": "p", **body})):
        assert (parsed.params.structured_kind, parsed.params.structured_spec) == (kind, spec)


@pytest.mark.parametrize("body, param", [
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": SCHEMA}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA, "strict": "yes"}}},
     "response_format.json_schema.strict"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {"type": "string"}}}}},
     "response_format.json_schema.schema"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": [1, 2]}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_choice": "a"}, "guided_choice"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": ["a", ""]}, "guided_choice"),
    ({"guided_grammar": "start: missing"}, "guided_grammar"),
    ({"guided_grammar": ""}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"guided_regex": "a" * (MAX_SPEC_CHARS + 1)}, "guided_regex"),
])
def test_bad_options_are_400_naming_the_param(body, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(chat(**body))
    assert info.value.status == 400 and info.value.param == param
    assert len(info.value.message) > 10
