"""SamplingParams: defaults, validation (every impossible value names its parameter), wire form."""

from __future__ import annotations

import math

import msgpack
import pytest

from common.engine.sampling_params import InvalidSamplingParameter, SamplingParams, validate_prompt_ids


def test_defaults_follow_openai_and_vllm() -> None:
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_p, params.top_k, params.min_p) == (1, 1.0, 1.0, 0, 0.0)
    assert params.max_tokens == 16 and params.min_tokens == 0 and params.logprobs is None
    assert params.stop == [] and params.stop_token_ids == [] and params.seed is None
    assert params.skip_special_tokens is True and params.ignore_eos is False
    params.validate()
    assert not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    # each instance owns its lists
    params.stop.append("x")
    assert SamplingParams().stop == []


def test_single_stop_string_is_normalized_to_a_list() -> None:
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]


def test_valid_edge_values_pass() -> None:
    SamplingParams(
        temperature=0, top_p=1e-9, top_k=-1, min_p=1.0, seed=-5, presence_penalty=-2, frequency_penalty=2,
        repetition_penalty=0.01, max_tokens=None, min_tokens=0, logprobs=20, stop_token_ids=[0, 7],
        stop=["END"],
    ).validate()
    SamplingParams(max_tokens=5, min_tokens=5, logprobs=0, seed=2**64 - 1).validate()


INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("n", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -1),
    ("top_p", None),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("seed", 1.0),
    ("seed", "7"),
    ("seed", 2**64),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3),
    ("frequency_penalty", -3),
    ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 10.0),
    ("min_tokens", -1),
    ("min_tokens", 17),  # > max_tokens (16)
    ("min_tokens", 1.0),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", 5),
    ("stop", [""]),
    ("stop", [3]),
    ("stop", 42),
    ("ignore_eos", 1),
    ("skip_special_tokens", "yes"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_values_raise_value_error_naming_the_parameter(name: str, value: object) -> None:
    params = SamplingParams(**{name: value})
    with pytest.raises(ValueError, match=name) as info:
        params.validate()
    assert isinstance(info.value, InvalidSamplingParameter)
    assert info.value.param == name


def test_validate_for_model_accepts_what_fits() -> None:
    params = SamplingParams(max_tokens=10, stop_token_ids=[99])
    params.validate_for_model(prompt_len=90, max_model_len=100, vocab_size=100)
    assert params.resolved_max_tokens(90, 100) == 10


def test_prompt_longer_than_context_is_rejected() -> None:
    with pytest.raises(ValueError, match="prompt") as info:
        SamplingParams(max_tokens=1).validate_for_model(prompt_len=101, max_model_len=100, vocab_size=100)
    assert "context window" in str(info.value)


def test_prompt_filling_the_context_leaves_no_room() -> None:
    with pytest.raises(ValueError, match="prompt"):
        SamplingParams(max_tokens=None).validate_for_model(prompt_len=100, max_model_len=100, vocab_size=100)


def test_max_tokens_that_cannot_fit_is_rejected() -> None:
    with pytest.raises(ValueError, match="max_tokens") as info:
        SamplingParams(max_tokens=11).validate_for_model(prompt_len=90, max_model_len=100, vocab_size=100)
    assert "at most 10" in str(info.value)


def test_max_tokens_none_takes_the_rest_of_the_context() -> None:
    params = SamplingParams(max_tokens=None)
    params.validate_for_model(prompt_len=30, max_model_len=100, vocab_size=100)
    assert params.resolved_max_tokens(30, 100) == 70


def test_min_tokens_beyond_the_room_left_is_rejected() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=None, min_tokens=20).validate_for_model(
            prompt_len=90, max_model_len=100, vocab_size=100
        )


def test_unknown_stop_token_id_is_rejected() -> None:
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[3, 100]).validate_for_model(prompt_len=1, max_model_len=100, vocab_size=100)


def test_validate_for_model_also_runs_plain_validation() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1).validate_for_model(prompt_len=1, max_model_len=100, vocab_size=100)


@pytest.mark.parametrize("ids", [[], [0, 1, 100], [-1], [1, 2.0], "abc"])
def test_validate_prompt_ids_rejects_bad_prompts(ids) -> None:
    with pytest.raises(ValueError, match="prompt"):
        validate_prompt_ids(ids, vocab_size=100)


def test_validate_prompt_ids_accepts_in_range_ids() -> None:
    validate_prompt_ids([0, 50, 99], vocab_size=100)


def test_wire_roundtrip_through_msgpack() -> None:
    params = SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=123, presence_penalty=0.5,
        frequency_penalty=-0.5, repetition_penalty=1.1, max_tokens=None, min_tokens=3, stop_token_ids=[5, 6],
        stop=["###", "\n\n"], ignore_eos=True, logprobs=5, skip_special_tokens=False,
    )
    wire = msgpack.unpackb(msgpack.packb(params.to_dict()))
    restored = SamplingParams.from_dict(wire)
    assert restored == params
    assert restored.stop is not params.stop


def test_from_dict_rejects_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ValueError, match="best_of"):
        SamplingParams.from_dict({"temperature": 0.5, "best_of": 3})
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams.from_dict({"top_p": 2.0})
    with pytest.raises(ValueError):
        SamplingParams.from_dict(["temperature", 1.0])  # type: ignore[arg-type]
    assert SamplingParams.from_dict({}) == SamplingParams()
