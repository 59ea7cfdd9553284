"""OpenAI request parsing and validation of the gateway: pure functions, no processes."""

from __future__ import annotations

import pytest

from services.gateway.logprobs import CompletionLogprobs, chat_entries, unpack
from services.gateway.openai_schema import (
    MAX_N,
    APIError,
    check_prompts_for_model,
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_json_body,
    parse_tokenize_request,
)

MODEL = "m"
MSGS = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"model": MODEL, "messages": MSGS, **fields}


def completion(**fields):
    return {"model": MODEL, "prompt": "hello", **fields}


# ----------------------------------------------------------------------------------- good input


def test_chat_request_maps_every_sampling_field():
    req = parse_chat_request(chat(
        n=2, temperature=0.5, top_p=0.9, top_k=40, min_p=0.05, seed=7, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, max_completion_tokens=12, max_tokens=99, min_tokens=2,
        stop="END", ignore_eos=True, skip_special_tokens=False, logprobs=True, top_logprobs=3, stream=True,
        stream_options={"include_usage": True}, stop_token_ids=[5],
    ))
    p = req.params
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (2, 0.5, 0.9, 40, 0.05, 7)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.max_tokens == 12  # max_completion_tokens wins over the deprecated max_tokens
    assert (p.min_tokens, p.stop, p.ignore_eos, p.skip_special_tokens, p.logprobs) == (2, ["END"], True, False, 3)
    assert p.stop_token_ids == [5]
    assert req.stream and req.include_usage and req.top_logprobs == 3 and req.kind == "chat"


def test_chat_defaults_and_developer_role():
    req = parse_chat_request(chat(messages=[{"role": "developer", "content": "be brief"},
                                            {"role": "user", "content": [{"type": "text", "text": "hi"}]}]))
    assert req.params.max_tokens is None  # chat: up to the context window
    assert req.params.temperature == 1.0 and req.top_logprobs is None and not req.stream
    assert req.messages[0]["role"] == "system"
    # logprobs without top_logprobs: chosen token only
    assert parse_chat_request(chat(logprobs=True)).top_logprobs == 0


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("text", ["text"]),
        ([1, 2, 3], [[1, 2, 3]]),
        (["one"], ["one"]),
        (["a", "b"], ["a", "b"]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
)
def test_completion_prompt_forms(prompt, expected):
    req = parse_completion_request(completion(prompt=prompt))
    assert req.prompts == expected
    assert req.params.max_tokens == 16  # the OpenAI completions default


def test_integral_float_is_an_integer_and_stop_list():
    req = parse_completion_request(completion(max_tokens=8.0, n=2.0, stop=["a", "", "b"], logprobs=2))
    assert req.params.max_tokens == 8 and req.params.n == 2
    assert req.params.stop == ["a", "b"]  # empty stop strings are ignored, as OpenAI does
    assert req.top_logprobs == 2 and req.params.logprobs == 2


def test_tokenize_and_detokenize_requests():
    assert parse_tokenize_request({"prompt": "x"}).prompts == ["x"]
    assert parse_tokenize_request({"messages": MSGS}).messages == MSGS
    assert parse_detokenize_request({"tokens": [1, 2]}, vocab_size=10) == [1, 2]


# ------------------------------------------------------------------------------------ bad input

BAD_CHAT = [
    ({"messages": MSGS}, "model"),
    (chat(model=5), "model"),
    ({"model": MODEL}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages="hi"), "messages"),
    (chat(messages=["hi"]), "messages[0]"),
    (chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (chat(messages=[{"content": "x"}]), "messages[0].role"),
    (chat(messages=[{"role": "user"}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
    (chat(messages=[{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x"}}]}]),
     "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]), "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": ""}}]}]),
     "messages[0].content[0]"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x", "detail": "max"}}]}]),
     "messages[0].content[0]"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=-5), "max_tokens"),
    (chat(max_completion_tokens="10"), "max_completion_tokens"),
    (chat(n=0), "n"),
    (chat(n=MAX_N + 1), "n"),
    (chat(n=True), "n"),
    (chat(temperature=-1), "temperature"),
    (chat(temperature="hot"), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(top_p=1.5), "top_p"),
    (chat(top_k=-2), "top_k"),
    (chat(min_p=2), "min_p"),
    (chat(presence_penalty=3), "presence_penalty"),
    (chat(frequency_penalty=-2.5), "frequency_penalty"),
    (chat(repetition_penalty=0), "repetition_penalty"),
    (chat(seed="x"), "seed"),
    (chat(seed=2**70), "seed"),
    (chat(stop=5), "stop"),
    (chat(stop=["ok", 3]), "stop"),
    (chat(stream="yes"), "stream"),
    (chat(stream_options={"include_usage": True}), "stream_options"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (chat(top_logprobs=2), "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    (chat(logprobs=1), "logprobs"),
    (chat(min_tokens=5, max_tokens=2), "min_tokens"),
    (chat(ignore_eos="no"), "ignore_eos"),
    (chat(response_format={"type": "yaml"}), "response_format.type"),
    (chat(logit_bias={"5": 10}), "logit_bias"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(stop_token_ids=["a"]), "stop_token_ids"),
]


@pytest.mark.parametrize("body, param", BAD_CHAT)
def test_bad_chat_bodies_are_400_naming_the_param(body, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    error = info.value
    assert error.status == 400
    assert error.param == param
    assert error.type == "invalid_request_error"
    assert error.message and len(error.message) > 10


BAD_COMPLETION = [
    ({"model": MODEL}, "prompt"),
    (completion(prompt=5), "prompt"),
    (completion(prompt=[]), "prompt"),
    (completion(prompt=[1, "a"]), "prompt"),
    (completion(prompt=["a", [1]]), "prompt"),
    (completion(prompt=[[1], []]), "prompt"),
    (completion(prompt=[True, False]), "prompt"),
    (completion(prompt=["p"] * 65), "prompt"),
    (completion(prompt=["p"] * 8, n=16), "n"),
    (completion(echo=True, logprobs=1), "echo"),
    (completion(suffix="x"), "suffix"),
    (completion(logprobs=21), "logprobs"),
    (completion(logprobs=True), "logprobs"),
    (completion(best_of=3, stream=True), "best_of"),
    (completion(best_of=2, n=3), "best_of"),
    (completion(best_of=17), "best_of"),
    (completion(prompt=["p"] * 8, best_of=16), "best_of"),
    (completion(max_tokens=-1), "max_tokens"),
    (completion(max_tokens=1.5), "max_tokens"),
]


@pytest.mark.parametrize("body, param", BAD_COMPLETION)
def test_bad_completion_bodies_are_400_naming_the_param(body, param):
    with pytest.raises(APIError) as info:
        parse_completion_request(body)
    assert info.value.status == 400
    assert info.value.param == param


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{not json", "not valid JSON"),
        (b'{"a": 1', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, got array"),
        (b'"text"', "got string"),
        (b"null", "got null"),
        (b'{"a": NaN}', "not valid JSON"),
        (b'{"a": Infinity}', "not valid JSON"),
        (b'{"a": "\xff\xfe"}', "not valid UTF-8"),
    ],
)
def test_bad_bodies(raw, fragment):
    with pytest.raises(APIError) as info:
        parse_json_body(raw)
    assert info.value.status == 400
    assert fragment in info.value.message
    body = info.value.body()
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_good_body():
    assert parse_json_body('{"é": [1, 2.5, null]}'.encode()) == {"é": [1, 2.5, None]}


def test_detokenize_rejects_bad_tokens():
    for body, fragment in (({}, "required"), ({"tokens": "1"}, "array of integers"),
                           ({"tokens": [1, 99]}, "outside the vocabulary")):
        with pytest.raises(APIError) as info:
            parse_detokenize_request(body, vocab_size=10)
        assert info.value.status == 400 and fragment in info.value.message


def test_tokenize_needs_prompt_or_messages():
    with pytest.raises(APIError) as info:
        parse_tokenize_request({"text": "x"})
    assert info.value.status == 400 and info.value.param == "prompt"


# -------------------------------------------------------------------------------- model limits


def test_prompt_past_the_context_window_names_the_counts():
    params = parse_chat_request(chat(max_tokens=10)).params
    with pytest.raises(APIError) as info:
        check_prompts_for_model(params, [[1] * 120], max_model_len=100, vocab_size=50, param="messages")
    assert info.value.status == 400 and info.value.param == "messages"
    assert "120" in info.value.message and "100" in info.value.message
    assert info.value.code == "context_length_exceeded"


def test_prompt_plus_max_tokens_past_the_window():
    params = parse_completion_request(completion(max_tokens=50)).params
    with pytest.raises(APIError) as info:
        check_prompts_for_model(params, [[1] * 60], max_model_len=100, vocab_size=50)
    assert info.value.param == "max_tokens"
    assert "60" in info.value.message and "50" in info.value.message and "40" in info.value.message


def test_token_ids_outside_the_vocabulary_and_empty_prompts():
    params = parse_completion_request(completion()).params
    with pytest.raises(APIError) as info:
        check_prompts_for_model(params, [[1, 50]], max_model_len=100, vocab_size=50)
    assert "outside the vocabulary" in info.value.message
    with pytest.raises(APIError) as info:
        check_prompts_for_model(params, [[]], max_model_len=100, vocab_size=50)
    assert "empty" in info.value.message


def test_fits_and_no_max_tokens_means_the_rest_of_the_window():
    params = parse_chat_request(chat()).params
    check_prompts_for_model(params, [[1] * 99], max_model_len=100, vocab_size=50)
    assert params.resolved_max_tokens(99, 100) == 1


def test_total_work_is_bounded():
    params = parse_chat_request(chat(n=16)).params
    with pytest.raises(APIError) as info:
        check_prompts_for_model(params, [[1]], max_model_len=1_000_000, vocab_size=50)
    assert info.value.param == "n" and "limit" in info.value.message


# ------------------------------------------------------------------------------------- logprobs


class _FakeTexts:
    def get(self, token_id):
        text = f"t{token_id}"
        return text, list(text.encode())


def test_logprob_wire_forms():
    as_dict = {"token_id": 3, "logprob": -0.5, "rank": 1, "top": [[3, -0.5], [4, -1.0]]}
    as_list = [3, -0.5, 1, [[3, -0.5], [4, -1.0]]]
    assert unpack(as_dict) == unpack(as_list) == (3, -0.5, [(3, -0.5), (4, -1.0)])
    assert unpack({"token_id": 1, "logprob": float("-inf"), "top": []})[1] == -9999.0


def test_chat_and_completion_logprob_shapes():
    entries = [{"token_id": 3, "logprob": -0.5, "rank": 1, "top": [[3, -0.5], [4, -1.0]]},
               {"token_id": 12, "logprob": -2.0, "rank": 2, "top": [[4, -0.1], [12, -2.0]]}]
    content = chat_entries(_FakeTexts(), entries, top_n=1)
    assert [c["token"] for c in content] == ["t3", "t12"]
    assert content[0]["bytes"] == list(b"t3") and content[1]["logprob"] == -2.0
    assert [len(c["top_logprobs"]) for c in content] == [1, 1]
    assert content[1]["top_logprobs"][0] == {"token": "t4", "logprob": -0.1, "bytes": list(b"t4")}
    builder = CompletionLogprobs(_FakeTexts(), top_n=1)
    first, second = builder.block(entries[:1]), builder.block(entries[1:])
    assert first["tokens"] == ["t3"] and first["text_offset"] == [0]
    assert second["text_offset"] == [2]  # offsets continue across stream chunks
    assert second["top_logprobs"] == [{"t4": -0.1, "t12": -2.0}]  # the sampled token is always listed


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, "online"),
        ({"priority": "offline"}, "offline"),
        ({"priority": "online", "service_tier": "flex"}, "online"),  # the explicit field wins
        ({"service_tier": "flex"}, "offline"),
        ({"service_tier": "default"}, "online"),
    ],
)
def test_priority_from_priority_or_service_tier(fields, expected):
    assert parse_chat_request(chat(**fields)).priority == expected
    assert parse_completion_request(completion(**fields)).priority == expected


@pytest.mark.parametrize("fields, param", [({"priority": "urgent"}, "priority"), ({"priority": 1}, "priority"),
                                           ({"service_tier": "turbo"}, "service_tier")])
def test_bad_priority_is_400(fields, param):
    with pytest.raises(APIError) as info:
        parse_chat_request(chat(**fields))
    assert info.value.status == 400 and info.value.param == param
