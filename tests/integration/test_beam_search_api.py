"""Beam search through the real services with the official `openai` client: `use_beam_search` with `n` as
the beam width on `/v1/completions` and `/v1/chat/completions` returns the n beams of the offline
`LLM.beam_search` (same model, fp32), best first; `allowed_token_ids` restricts them; impossible
combinations get clear 400s."""

from __future__ import annotations

import openai
import pytest

from common.engine import SamplingParams

PROMPT = "The three primary colors are"
pytestmark = pytest.mark.timeout(900)


def test_completions_beam_search_equals_offline(client, model_id, smol_llm):
    res = client.completions.create(model=model_id, prompt=PROMPT, n=3, max_tokens=8,
                                    extra_body={"use_beam_search": True, "length_penalty": 0.8})
    offline = smol_llm.beam_search(PROMPT, beam_width=3, max_tokens=8, length_penalty=0.8)[0]
    assert [c.index for c in res.choices] == [0, 1, 2]
    assert [c.text for c in res.choices] == [beam.text for beam in offline]
    assert len({c.text for c in res.choices}) == 3
    assert res.usage.completion_tokens == sum(len(beam.token_ids) for beam in offline)


def test_chat_beam_search_equals_offline(client, model_id, smol_llm):
    messages = [{"role": "user", "content": "Name a fruit."}]
    res = client.chat.completions.create(model=model_id, messages=messages, n=2, max_tokens=6,
                                         extra_body={"use_beam_search": True, "early_stopping": True})
    ids = smol_llm.tokenizer.encode_chat(messages, add_generation_prompt=True)
    offline = smol_llm.beam_search(ids, beam_width=2, max_tokens=6, early_stopping=True)[0]
    assert [c.message.content for c in res.choices] == [beam.text for beam in offline]


def test_allowed_token_ids_restrict_the_beams(client, model_id, smol_llm):
    allowed = smol_llm.tokenizer.encode(" red green blue yellow orange purple")
    res = client.completions.create(model=model_id, prompt=PROMPT, n=2, max_tokens=4,
                                    extra_body={"use_beam_search": True, "allowed_token_ids": allowed,
                                                "ignore_eos": True})
    offline = smol_llm.beam_search(PROMPT, beam_width=2, max_tokens=4, allowed_token_ids=allowed, ignore_eos=True)[0]
    assert [c.text for c in res.choices] == [beam.text for beam in offline]
    assert all(set(beam.token_ids) <= set(allowed) and len(beam.token_ids) == 4 for beam in offline)
    # Plain decoding honours it too (vLLM's sampling parameter).
    greedy = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=5, temperature=0,
                                       extra_body={"allowed_token_ids": allowed, "ignore_eos": True})
    expected = smol_llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                        allowed_token_ids=allowed))[0]
    assert set(expected.token_ids) <= set(allowed) and greedy.choices[0].text == expected.text


@pytest.mark.parametrize("extra, fields, param", [
    ({"use_beam_search": True}, {"stream": True}, "use_beam_search"),
    ({"use_beam_search": True}, {"temperature": 0.7}, "temperature"),
    ({"use_beam_search": True, "early_stopping": "sometimes"}, {}, "early_stopping"),
    ({"use_beam_search": True}, {"n": 0}, "n"),
    ({"use_beam_search": True, "allowed_token_ids": [5]}, {"n": 2}, "allowed_token_ids"),
    ({"use_beam_search": True}, {"logprobs": 1}, "logprobs"),
    ({"use_beam_search": True}, {"best_of": 4, "n": 2}, "best_of"),
    ({"allowed_token_ids": [10**9]}, {}, "allowed_token_ids"),
])
def test_bad_combinations_get_clear_400s(client, model_id, extra, fields, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_id, prompt=PROMPT, max_tokens=4, extra_body=extra, **fields)
    assert info.value.body["param"] == param, info.value.body
