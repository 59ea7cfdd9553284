"""Speculative decoding on the default model (SmolLM2 GGUF): fp32 greedy output identical to plain
decoding; in bf16, where a 1 + k row verification may round differently from a 1-row decode,
any divergence from plain bf16 decoding starts at a near tie of the plain run."""

from __future__ import annotations

import pytest

from bench.spec_workload import repetitive_prompts
from common.engine import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def prompts(smol_llm) -> list[list[int]]:
    texts = repetitive_prompts(2, 500, seed=1)
    return [smol_llm.tokenizer.encode_chat([{"role": "user", "content": t}]) for t in texts]


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_fp32_greedy_identical_on_the_default_model(smollm_path, smol_llm, prompts, method):
    want = [o.token_ids for o in smol_llm.generate(prompts, GREEDY)]
    spec = LLM(smollm_path, dtype="float32", kv_cache_memory="96MiB", max_num_batched_tokens=256,
               speculative_method=method)
    got = spec.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == want
    assert all(len(o.outputs[0].logprobs) == 48 for o in got)
    stats = spec.engine.load_stats()
    assert stats["spec_accepted_tokens_total"] > 0 and stats["spec_mean_accepted_length"] > 1.0


def test_bf16_diverges_only_at_near_ties(smollm_path, prompts):
    plain = LLM(smollm_path, dtype="bfloat16", kv_cache_memory="96MiB", max_num_batched_tokens=256)
    want = plain.generate(prompts, GREEDY)
    del plain
    spec = LLM(smollm_path, dtype="bfloat16", kv_cache_memory="96MiB", max_num_batched_tokens=256,
               speculative_method="suffix")
    got = spec.generate(prompts, GREEDY)
    assert spec.engine.load_stats()["spec_accepted_tokens_total"] > 0
    for w, g in zip(want, got):
        first = next((i for i, (a, b) in enumerate(zip(w.token_ids, g.token_ids)) if a != b), None)
        if first is None:
            continue
        # The plain run's top two at the first difference: rounding flipped a near tie.
        top = w.outputs[0].logprobs[first].top
        assert g.token_ids[first] in (top[0][0], top[1][0])
        assert top[0][1] - top[1][1] < 0.25, f"diverged at {first} with margin {top[0][1] - top[1][1]}"
