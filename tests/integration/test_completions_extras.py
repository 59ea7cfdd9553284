"""`/v1/completions` extras through the real services with the official `openai` client: `echo`
(plain, streamed, token-id and batch prompts), `best_of` (the n most likely of best_of candidates,
all of them billed), and clear 400s for `suffix`, `echo` + `logprobs` and `best_of` + `stream`."""

from __future__ import annotations

import pytest

PROMPT = "The three primary colors are"
MAX_TOKENS = 6
BEST_OF_TOKENS = 3

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def plain(client, model_id) -> str:
    res = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    return res.choices[0].text


def test_echo_prepends_the_prompt(client, model_id, plain):
    res = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, echo=True)
    assert res.choices[0].text == PROMPT + plain
    assert res.usage.completion_tokens == MAX_TOKENS  # the echoed prompt is not billed as output


def test_echo_streamed(client, model_id, plain):
    stream = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                                       echo=True, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == PROMPT + plain


def test_echo_token_ids_and_batches(server, client, model_id, plain):
    status, tokenized = server.request("POST", "/tokenize", {"model": model_id, "prompt": PROMPT})
    assert status == 200, tokenized
    ids = tokenized["tokens"]
    status, detokenized = server.request("POST", "/detokenize", {"model": model_id, "tokens": ids})
    assert status == 200, detokenized
    res = client.completions.create(model=model_id, prompt=ids, max_tokens=MAX_TOKENS, temperature=0, echo=True)
    assert res.choices[0].text == detokenized["prompt"] + plain
    prompts = [PROMPT, "Hello"]
    res = client.completions.create(model=model_id, prompt=prompts, max_tokens=2, n=2, temperature=0.8, seed=3,
                                    echo=True)
    assert len(res.choices) == 4
    for choice in res.choices:
        assert choice.text.startswith(prompts[choice.index // 2])


def test_best_of_returns_the_most_likely_candidates(client, model_id):
    common = dict(model=model_id, prompt=PROMPT, max_tokens=BEST_OF_TOKENS, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True})
    # The same seed gives the same candidates (choice i samples with seed + i) as n=4 does.
    every = client.completions.create(n=4, logprobs=0, **common)
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in every.choices}
    top = sorted((sum(c.logprobs.token_logprobs) for c in every.choices), reverse=True)
    ranked = sorted(scores, key=scores.get, reverse=True)
    best = client.completions.create(n=2, best_of=4, **common)
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.text in scores for c in best.choices)
    assert [scores[c.text] for c in best.choices] == pytest.approx(top[:2], abs=1e-4)
    assert best.choices[0].logprobs is None  # not asked for
    assert best.usage.completion_tokens == 4 * BEST_OF_TOKENS  # every candidate is billed
    # With logprobs asked for, the chosen ones carry theirs.
    with_lp = client.completions.create(n=1, best_of=4, logprobs=2, **common)
    choice = with_lp.choices[0]
    assert choice.text == ranked[0] and len(choice.logprobs.tokens) == BEST_OF_TOKENS
    assert abs(sum(choice.logprobs.token_logprobs) - scores[ranked[0]]) < 1e-3


def test_best_of_equal_to_n_is_plain(client, model_id, plain):
    res = client.completions.create(model=model_id, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, best_of=1)
    assert res.choices[0].text == plain


@pytest.mark.parametrize("extra, param", [
    ({"suffix": " and that is all."}, "suffix"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"best_of": 3, "stream": True}, "best_of"),
    ({"best_of": 1, "n": 2}, "best_of"),
    ({"best_of": 99}, "best_of"),
])
def test_refused_combinations_are_400(server, model_id, extra, param):
    status, reply = server.request("POST", "/v1/completions",
                                   {"model": model_id, "prompt": PROMPT, "max_tokens": 2, **extra})
    assert status == 400, reply
    assert reply["error"]["param"] == param and reply["error"]["message"]
