"""Tool-call parsers (Hermes, Llama 3 JSON, forced JSON), the registry, and tools in chat prompts.

Every parser is checked whole and streamed (at every split of the text, and token-sized pieces):
the streamed pieces must add up to the same calls, and malformed model output must come back as
plain content, never as an exception. No Qwen tokenizer is on disk offline, so the Qwen template
path is checked by rendering a Qwen2.5-style template string here.
"""

from __future__ import annotations

import json

import pytest

from common.chat_template import render_chat
from services.gateway.json_fields import APIError
from services.gateway.tool_parsers import PARSERS, get_parser, parser_for_template
from services.gateway.tool_parsers.forced import NamedStreamer, RequiredStreamer, extract_named, extract_required
from services.gateway.tool_parsers.hermes import HermesParser
from services.gateway.tool_parsers.llama3_json import Llama3JsonParser
from services.gateway.tools import ReplyParser, ToolRequest, forced_schema, parse_openai_tools

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def stream(streamer, pieces):
    """(content, [(id, name, arguments)]) from feeding `pieces` then finish()."""
    content, calls = "", []
    for piece in [*(streamer.feed(p) for p in pieces), streamer.finish()]:
        content += piece.content
        for delta in piece.calls:
            if delta.id is not None:
                assert delta.index == len(calls)
                calls.append([delta.id, delta.name, delta.arguments])
            else:
                assert delta.index == len(calls) - 1  # pieces only go to the open call
                calls[-1][2] += delta.arguments
    return content, calls


def splits(text):
    """Every two-piece split, plus one-character pieces."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


# ----------------------------------------------------------------------------------- hermes

HERMES_ONE = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": {"x": 1}}}'
              '\n</tool_call>')
HERMES_TWO = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
              '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_hermes_extracts_calls_and_content():
    content, calls = HermesParser().extract(HERMES_ONE)
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris", "n": {"x": 1}})]
    assert calls[0].id.startswith("call_") and calls[0].to_openai()["type"] == "function"
    content, calls = HermesParser().extract(HERMES_TWO)
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]


@pytest.mark.parametrize("text", [
    "just an answer", "<tool_call>{not json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', "<tool_call>", "a < b <tool_ and </tool_call>",
])
def test_hermes_malformed_is_plain_content(text):
    assert HermesParser().extract(text) == (text, [])
    for pieces in splits(text):
        assert stream(HermesParser().streamer(), pieces) == (text, [])


def test_hermes_unterminated_call_still_parses():
    _, calls = HermesParser().extract('<tool_call>{"name": "get_time", "arguments": {}}')
    assert [c.name for c in calls] == ["get_time"]


@pytest.mark.parametrize("text", [HERMES_ONE, HERMES_TWO])
def test_hermes_streamed_equals_whole(text):
    content, whole = HermesParser().extract(text)
    for pieces in splits(text):
        got_content, got = stream(HermesParser().streamer(), pieces)
        assert got_content.strip() == (content or "")
        assert [(n, json.loads(a)) for _, n, a in got] == [(c.name, json.loads(c.arguments)) for c in whole]


def test_hermes_streams_content_then_arguments_in_pieces():
    streamer = HermesParser().streamer()
    assert streamer.feed("Hi <tool").content == "Hi "  # a partial tag is held back
    piece = streamer.feed('_call>{"name": "get_weather", "arguments": {"city": "Pa')
    assert piece.content == "" and piece.calls[0].name == "get_weather" and piece.calls[0].id.startswith("call_")
    assert "".join(d.arguments for d in piece.calls) == '{"city": "Pa'
    piece = streamer.feed('ris"}}</tool_call>')
    assert "".join(d.arguments for d in piece.calls) == 'ris"}'
    assert not streamer.finish()


# ------------------------------------------------------------------------------- llama3 json


def test_llama3_json_extract_and_stream():
    text = ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
            '{"name": "get_time", "parameters": {}}')
    content, calls = Llama3JsonParser().extract(text)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {})]
    for pieces in splits(text):
        got_content, got = stream(Llama3JsonParser().streamer(), pieces)
        assert got_content == "" and [n for _, n, _ in got] == ["get_weather", "get_time"]


@pytest.mark.parametrize("text", ["The weather is fine.", '{"name": "f", "parameters": {}} trailing', "{oops"])
def test_llama3_json_plain_text(text):
    assert Llama3JsonParser().extract(text) == (text, [])
    for pieces in splits(text):
        assert stream(Llama3JsonParser().streamer(), pieces) == (text, [])


# ---------------------------------------------------------------------------------- forced


def test_forced_named_and_required():
    assert extract_named("not json", "f") == ("not json", [])
    _, calls = extract_named('{"city": "Rome"}', "get_weather")
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome"}
    content, got = stream(NamedStreamer("get_weather"), [" ", '{"city"', ': "Rome"}'])
    assert content == "" and got[0][1] == "get_weather" and json.loads(got[0][2]) == {"city": "Rome"}
    text = '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}]'
    assert [c.name for c in extract_required(text)[1]] == ["get_time", "get_weather"]
    assert [n for _, n, _ in stream(RequiredStreamer(), list(text))[1]] == ["get_time", "get_weather"]
    assert stream(RequiredStreamer(), ["[{", "cut"]) == ("[{cut", [])


def test_forced_schema_shapes():
    request = ToolRequest(tools=[WEATHER, TIME], mode="required", parallel=False)
    schema = forced_schema(request)
    assert schema["type"] == "array" and schema["maxItems"] == 1 and len(schema["items"]["anyOf"]) == 2
    named = ToolRequest(tools=[WEATHER, TIME], mode="named", named="get_weather")
    assert forced_schema(named) == WEATHER["function"]["parameters"]
    assert forced_schema(ToolRequest(tools=[WEATHER], mode="auto")) is None


# -------------------------------------------------------------------------------- registry


def test_registry_picks_by_template_and_flag():
    assert set(PARSERS) == {"hermes", "llama3_json"}
    assert parser_for_template("... <tool_call> ...").name == "hermes"
    assert parser_for_template("{{ '<|python_tag|>' }} <|eot_id|>").name == "llama3_json"
    assert parser_for_template(None).name == "hermes"
    assert parser_for_template("<tool_call>", "llama3_json").name == "llama3_json"
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_parser("nope")


# ------------------------------------------------------------------------ request validation


@pytest.mark.parametrize("body, param", [
    ({"tools": "x"}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_requests_are_400(body, param):
    with pytest.raises(APIError) as info:
        parse_openai_tools(body)
    assert info.value.status == 400 and info.value.param == param


def test_tool_request_modes():
    assert parse_openai_tools({}).mode == "none"
    assert parse_openai_tools({"tools": [WEATHER]}).mode == "auto"
    named = parse_openai_tools({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                                   "function": {"name": "get_weather"}}})
    assert (named.mode, named.named) == ("named", "get_weather")
    assert ReplyParser(parse_openai_tools({"tools": [WEATHER], "tool_choice": "none"}),
                       HermesParser()).extract(HERMES_TWO) == (HERMES_TWO, [])


# ----------------------------------------------------------------------- templates and tools

QWEN25_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}"
    "{{- messages[0]['content'] }}{%- else %}{{- 'You are Qwen.' }}{%- endif %}"
    "{{- \"\\n\\n# Tools\\n\\n<tools>\" }}{%- for tool in tools %}{{- \"\\n\" }}{{- tool | tojson }}{%- endfor %}"
    "{{- \"\\n</tools><|im_end|>\\n\" }}{%- else %}{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
ROUND_TRIP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
]


def test_qwen_template_renders_tools_calls_and_results():
    text = render_chat(QWEN25_TEMPLATE, ROUND_TRIP, tools=[WEATHER])
    assert '"name": "get_weather"' in text.split("</tools>")[0]  # the tools, as JSON
    # the call's arguments are rendered as an object (not a JSON string inside a string)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # what the model is taught to write is what the registry parses
    assert parser_for_template(QWEN25_TEMPLATE).name == "hermes"


class _FakeTokenizer:
    """Just enough of common.tokenizer.Tokenizer for tools.prompt_ids: renders, 'encodes' as chars."""

    def __init__(self, template):
        self.chat_template = template
        self.rendered = None

    def encode_chat(self, messages, add_generation_prompt=True, tools=None):
        self.rendered = render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    tools=tools)
        return [ord(c) for c in self.rendered]


def test_template_without_tools_gets_hermes_prompt_and_history():
    from common.tokenizer import default_model_path, load_tokenizer
    from services.gateway.tools import prompt_ids

    template = load_tokenizer(default_model_path()).chat_template  # SmolLM2's: knows no tools
    tok = _FakeTokenizer(template)
    prompt_ids(tok, ROUND_TRIP, parse_openai_tools({"tools": [WEATHER]}), HermesParser())
    text = tok.rendered
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_weather"' in text
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert "<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>" in text
    tok2 = _FakeTokenizer(QWEN25_TEMPLATE)  # a template that knows tools renders them itself
    prompt_ids(tok2, ROUND_TRIP, parse_openai_tools({"tools": [WEATHER]}), HermesParser())
    assert tok2.rendered == render_chat(QWEN25_TEMPLATE, ROUND_TRIP, tools=[WEATHER])


def test_hf_dir_with_qwen_template_matches_transformers(tmp_path):
    """A real Tokenizer loaded from an HF directory whose template is Qwen2.5-style: the prompt the
    gateway builds equals transformers' apply_chat_template(tools=...) on the same history."""
    from transformers import AutoTokenizer

    from common.tokenizer import default_model_path, load_tokenizer
    from services.gateway.tools import prompt_ids

    load_tokenizer(default_model_path()).hf.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    tokenizer = load_tokenizer(str(tmp_path))
    parser = parser_for_template(tokenizer.chat_template)
    assert parser.name == "hermes"
    ids = prompt_ids(tokenizer, ROUND_TRIP, parse_openai_tools({"tools": [WEATHER]}), parser)
    reference = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    # transformers takes the call's arguments as an object; OpenAI clients send JSON text
    history = json.loads(json.dumps(ROUND_TRIP))
    history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris"}
    expected = reference.apply_chat_template(history, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids, skip_special_tokens=False) == expected


def test_hermes_call_broken_after_its_header_never_raises():
    # The header went out before the JSON broke: the call ends with what the model wrote.
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": oops}</tool_call> after'
    for pieces in splits(text):
        content, calls = stream(HermesParser().streamer(), pieces)
        assert [name for _, name, _ in calls] == ["get_weather"] and content.strip() == "after"
    assert HermesParser().extract(text) == (text, [])  # whole: nothing half-parsed, all content


def test_auto_without_parallel_keeps_the_first_call_and_flag_overrides():
    from services.gateway.tools import model_parser

    request = parse_openai_tools({"tools": [WEATHER, TIME], "parallel_tool_calls": False})
    _, calls = ReplyParser(request, HermesParser()).extract(HERMES_TWO)
    assert [c.name for c in calls] == ["get_weather"]
    assert model_parser(_FakeTokenizer(QWEN25_TEMPLATE)).name == "hermes"
    assert model_parser(_FakeTokenizer(QWEN25_TEMPLATE), "llama3_json").name == "llama3_json"
