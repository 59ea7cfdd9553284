"""Engine behaviour on the default model: batching, chunking, preemption, prefix cache, aborts."""

import pytest

from common.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def prompts(llm) -> list[list[int]]:
    texts = [
        "The quick brown fox",
        "In 1969, the first humans landed on the Moon. The mission was called",
        "def fibonacci(n):\n    ",
        "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy. "
        "Madrid is the capital of",
    ]
    return [llm.tokenizer.encode(t) for t in texts]


@pytest.fixture(scope="module")
def alone(smol_llm):
    return [smol_llm.generate(p, GREEDY)[0].token_ids for p in prompts(smol_llm)]


def test_batched_equals_alone(smol_llm, alone):
    outs = smol_llm.generate(prompts(smol_llm), GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert all(o.finish_reason == "length" and len(o.token_ids) == 12 for o in outs)
    assert smol_llm.engine.block_manager.num_used_pages == 0
    smol_llm.engine.check_integrity()


def test_chunked_prefill_and_preemption_keep_outputs(smollm_path, smol_llm, alone):
    # 8-token steps force chunked prefill; 12 pages of 4 tokens cannot hold all four sequences.
    small = LLM(smollm_path, dtype="float32", kv_cache_memory=12 * 4 * 30 * 2 * 3 * 64 * 4, page_size=4,
                max_num_batched_tokens=8)
    assert small.engine.num_pages == 12
    outs = small.generate(prompts(smol_llm), GREEDY)
    assert [o.token_ids for o in outs] == alone
    assert small.engine.stats.preemptions > 0
    assert small.engine.block_manager.num_used_pages == 0
    small.engine.check_integrity()


def test_prefix_cache_hit_gives_same_output(smol_llm):
    system = smol_llm.tokenizer.encode("You are a helpful assistant who answers briefly. " * 4)
    first = smol_llm.generate(system + [100, 200, 300], GREEDY)[0]
    second = smol_llm.generate(system + [100, 200, 300], GREEDY)[0]
    assert second.num_cached_tokens >= smol_llm.engine.page_size
    assert second.token_ids == first.token_ids


def test_abort_frees_pages(smol_llm):
    engine = smol_llm.engine
    engine.add_request("to-abort", list(range(200, 300)), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.block_manager.num_used_pages > 0
    assert engine.abort_request("to-abort")
    assert engine.block_manager.num_used_pages == 0
    assert not engine.has_unfinished()
    engine.check_integrity()


def test_seed_gives_same_output_whatever_the_batch(smol_llm):
    p = prompts(smol_llm)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    other = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True)
    a = smol_llm.generate(p[0], seeded)[0].token_ids
    b = smol_llm.generate([p[1], p[0], p[2]], [other, seeded, other])[1].token_ids
    assert a == b


def test_n_stop_strings_and_logprobs(smol_llm):
    ids = smol_llm.tokenizer.encode("Count: one, two, three, four,")
    out = smol_llm.generate(ids, SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=8, logprobs=3))[0]
    assert len(out.outputs) == 2
    for choice in out.outputs:
        assert len(choice.logprobs) == len(choice.token_ids)
        assert all(len(lp.top) == 3 for lp in choice.logprobs)
    greedy = smol_llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))[0]
    stop = greedy.text[3:6]
    cut = smol_llm.generate(ids, SamplingParams(temperature=0.0, max_tokens=16, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == greedy.text[: greedy.text.index(stop)]
    assert smol_llm.engine.block_manager.num_used_pages == 0


@pytest.mark.parametrize(
    "params, prompt, match",
    [
        (SamplingParams(temperature=-1.0), [1, 2, 3], "temperature"),
        (SamplingParams(top_p=0.0), [1, 2, 3], "top_p"),
        (SamplingParams(top_p=1.5), [1, 2, 3], "top_p"),
        (SamplingParams(max_tokens=0), [1, 2, 3], "max_tokens"),
        (SamplingParams(max_tokens=10_000), [1, 2, 3], "max_tokens"),
        (SamplingParams(), [1, 2, 10**9], "token"),
        (SamplingParams(), list(range(100, 100 + 9000)), "context"),
        (SamplingParams(stop_token_ids=[10**9]), [1, 2, 3], "stop_token_ids"),
    ],
)
def test_bad_requests_are_rejected_before_the_batch(smol_llm, params, prompt, match):
    with pytest.raises(ValueError, match=match):
        smol_llm.engine.add_request("bad", prompt, params)
    assert not smol_llm.engine.has_unfinished()
