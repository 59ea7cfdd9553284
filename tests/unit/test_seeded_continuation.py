"""Counter-based seeded sampling: the noise is a pure function of (seed, sequence position), so a
sequence continued from its tokens so far (a migrated stream: prompt + streamed tokens) draws
exactly what the original would have."""

from __future__ import annotations

import torch

from common.engine.sampler import SeededGenerator, make_generator
from common.engine.sampling_params import SamplingParams


def test_seek_is_a_pure_function_of_seed_and_position() -> None:
    a, b = make_generator(42), make_generator(42)
    assert isinstance(a, SeededGenerator)
    a.seek(7)
    first = torch.rand(5, generator=a)
    torch.rand(100, generator=b)  # whatever b drew before, the position decides
    b.seek(7)
    assert torch.equal(first, torch.rand(5, generator=b))
    b.seek(8)
    assert not torch.equal(first, torch.rand(5, generator=b))
    c = make_generator(43)
    c.seek(7)
    assert not torch.equal(first, torch.rand(5, generator=c))
    make_generator(-1).seek(2**40)  # any 64-bit seed and position


def test_continuation_from_streamed_tokens_draws_the_same(smol_llm) -> None:
    prompt = smol_llm.tokenizer.encode("Once upon a time")
    full = smol_llm.generate(prompt, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=12,
                                                    ignore_eos=True))[0].token_ids
    head = full[:5]
    rest = smol_llm.generate(prompt + head, SamplingParams(temperature=1.0, top_p=0.95, seed=99, max_tokens=7,
                                                           ignore_eos=True))[0].token_ids
    assert head + rest == full


def test_choice_i_continues_as_seed_plus_i(smol_llm) -> None:
    """The engine gives choice i of a seeded n-choice request the seed `seed + i`: a choice
    migrated alone (n=1) continues with that seed."""
    prompt = smol_llm.tokenizer.encode("The weather")
    both = smol_llm.generate(prompt, SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=8, ignore_eos=True))[0]
    second = both.outputs[1].token_ids
    rest = smol_llm.generate(prompt + second[:3], SamplingParams(temperature=1.0, seed=6, max_tokens=5,
                                                                 ignore_eos=True))[0].token_ids
    assert second[:3] + rest == second
