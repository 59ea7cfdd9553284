"""Batched sampler and its tensor ops."""

from __future__ import annotations

import math

import pytest
import torch

from common.engine.sampler import Sampler, make_generator
from common.engine.sampling_params import SamplingParams
from kernels import sampling as ops

VOCAB = 64
EOS = 3


@pytest.fixture()
def sampler() -> Sampler:
    return Sampler(eos_token_ids={EOS})


def run(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], prompts=None, outputs=None,
        generators=None):
    batch = logits.shape[0]
    return sampler(
        logits,
        params,
        prompts if prompts is not None else [[] for _ in range(batch)],
        outputs if outputs is not None else [[] for _ in range(batch)],
        generators if generators is not None else [None] * batch,
    )


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


# ---- choice --------------------------------------------------------------------------------


def test_greedy_is_argmax(sampler: Sampler) -> None:
    logits = random_logits(8)
    out = run(sampler, logits, [SamplingParams(temperature=0)] * 8)
    assert out.token_ids == logits.argmax(dim=1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_is_argmax_on_the_full_path_too(sampler: Sampler) -> None:
    logits = random_logits(4)
    out = run(sampler, logits, [SamplingParams(temperature=0, logprobs=0)] * 4)
    assert out.token_ids == logits.argmax(dim=1).tolist()


def test_top_k_one_is_argmax(sampler: Sampler) -> None:
    logits = random_logits(16, seed=1)
    torch.manual_seed(0)
    for _ in range(5):
        out = run(sampler, logits, [SamplingParams(temperature=1.5, top_k=1)] * 16)
        assert out.token_ids == logits.argmax(dim=1).tolist()


def test_tiny_top_p_is_argmax(sampler: Sampler) -> None:
    logits = random_logits(16, seed=2, scale=0.5)
    torch.manual_seed(0)
    for _ in range(5):
        out = run(sampler, logits, [SamplingParams(temperature=2.0, top_p=1e-6)] * 16)
        assert out.token_ids == logits.argmax(dim=1).tolist()


def test_min_p_keeps_only_likely_tokens(sampler: Sampler) -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    logits = probs.log().repeat(2000, 1)
    torch.manual_seed(0)
    out = run(sampler, logits, [SamplingParams(min_p=0.2)] * 2000)
    # threshold 0.2 * 0.5 = 0.1: tokens 3 and 4 are filtered, 0..2 all occur
    assert set(out.token_ids) == {0, 1, 2}


def test_sampling_matches_the_distribution(sampler: Sampler) -> None:
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draws = 8000
    torch.manual_seed(1234)
    out = run(sampler, probs.log().repeat(draws, 1), [SamplingParams()] * draws)
    counts = torch.bincount(torch.tensor(out.token_ids), minlength=4).float() / draws
    assert torch.allclose(counts, probs, atol=0.02), counts


def test_temperature_sharpens_the_distribution(sampler: Sampler) -> None:
    probs = torch.tensor([0.2, 0.8])
    draws = 8000
    torch.manual_seed(99)
    out = run(sampler, probs.log().repeat(draws, 1), [SamplingParams(temperature=0.5)] * draws)
    expected = probs**2 / (probs**2).sum()  # T = 0.5 squares the probabilities
    frequency = sum(out.token_ids) / draws
    assert abs(frequency - expected[1].item()) < 0.02


def test_seeded_row_is_identical_alone_and_in_any_batch(sampler: Sampler) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.95, seed=42)
    others = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=5, seed=7),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.0, min_p=0.1, repetition_penalty=1.3),
    ]

    def generate(batch_params: list[SamplingParams], row: int, steps: int = 12) -> list[int]:
        generators = [make_generator(p.seed) if p.seed is not None else None for p in batch_params]
        outputs: list[list[int]] = [[] for _ in batch_params]
        for step in range(steps):
            logits = random_logits(len(batch_params), seed=1000 + step, scale=1.0)
            logits[row] = random_logits(1, seed=step, scale=1.0)[0]  # the seeded row sees the same logits
            out = run(sampler, logits, batch_params, outputs=outputs, generators=generators)
            for i, token in enumerate(out.token_ids):
                outputs[i].append(token)
        return outputs[row]

    torch.manual_seed(0)
    alone = generate([seeded], 0)
    torch.manual_seed(1)
    in_batch = generate(others[:2] + [seeded] + others[2:], 2)
    torch.manual_seed(2)
    in_other_batch = generate([seeded] + others[::-1], 0)
    assert alone == in_batch == in_other_batch
    # the generator really drives it: a different seed gives a different sequence
    assert generate([SamplingParams(temperature=1.0, top_p=0.95, seed=43)], 0) != alone


def test_make_generator_is_deterministic_and_accepts_negative_seeds() -> None:
    a = torch.rand(5, generator=make_generator(-17))
    b = torch.rand(5, generator=make_generator(-17))
    c = torch.rand(5, generator=make_generator(17))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_greedy_rows_ignore_random_rows_in_the_same_batch(sampler: Sampler) -> None:
    logits = random_logits(6, seed=5)
    params = [SamplingParams(temperature=0) if i % 2 == 0 else SamplingParams(temperature=1.0) for i in range(6)]
    out = run(sampler, logits, params)
    argmax = logits.argmax(dim=1).tolist()
    assert [out.token_ids[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]


# ---- penalties and min_tokens ----------------------------------------------------------------


def test_penalty_op_changes_exactly_the_right_logits() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, -1.0]])
    prompt = ops.token_counts([[0, 1]], 5)
    output = ops.token_counts([[3, 3, 4]], 5)
    ops.apply_penalties(
        logits, prompt, output, torch.tensor([2.0]), torch.tensor([0.25]), torch.tensor([0.5])
    )
    expected = torch.tensor([[
        1.0,  # prompt token, positive: divided by 2
        -4.0,  # prompt token, negative: multiplied by 2
        1.0,  # unseen: untouched
        0.25 - 2 * 0.25 - 0.5,  # output x2: repetition, then frequency * 2 and presence
        -2.0 - 0.25 - 0.5,  # output x1
    ]])
    assert torch.allclose(logits, expected)


def test_token_counts_is_a_batched_bincount() -> None:
    counts = ops.token_counts([[1, 1, 4], [], [0, 4, 4, 4]], 5)
    assert counts.tolist() == [[0, 2, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 3]]


def test_repetition_penalty_changes_greedy_choice(sampler: Sampler) -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=0, repetition_penalty=2.0)]
    assert run(sampler, logits, params, prompts=[[1]]).token_ids == [0]
    assert run(sampler, logits, params, prompts=[[0]]).token_ids == [1]  # 5/2 < 4
    # the caller's logits are not modified
    assert logits.tolist() == [[5.0, 4.0, 0.0, 0.0]]


def test_frequency_and_presence_use_output_only(sampler: Sampler) -> None:
    logits = torch.tensor([[5.0, 4.5, 0.0, 0.0]])
    frequency = [SamplingParams(temperature=0, frequency_penalty=1.0)]
    assert run(sampler, logits, frequency, prompts=[[0, 0, 0]]).token_ids == [0]
    assert run(sampler, logits, frequency, outputs=[[0]]).token_ids == [1]
    presence = [SamplingParams(temperature=0, presence_penalty=0.4)]
    assert run(sampler, logits, presence, outputs=[[0]]).token_ids == [0]  # 4.6 > 4.5
    assert run(sampler, logits, presence, outputs=[[0, 0, 0]]).token_ids == [0]  # presence does not scale


def test_min_tokens_masks_eos_and_stop_tokens(sampler: Sampler) -> None:
    logits = torch.zeros(1, 8)
    logits[0, EOS] = 10.0
    logits[0, 5] = 9.0
    logits[0, 6] = 8.0
    params = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5])]
    assert run(sampler, logits, params, outputs=[[1]]).token_ids == [6]
    assert run(sampler, logits, params, outputs=[[1, 2]]).token_ids == [EOS]  # reached: no masking
    ignore = [SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[5], ignore_eos=True)]
    assert run(sampler, logits, ignore, outputs=[[1]]).token_ids == [EOS]


# ---- logprobs ------------------------------------------------------------------------------


def test_logprobs_are_the_model_distribution(sampler: Sampler) -> None:
    logits = random_logits(3, seed=11)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=1.5, top_k=3),
        SamplingParams(temperature=0, logprobs=0),
        SamplingParams(temperature=0),
    ]
    out = run(sampler, logits, params, prompts=[[1, 2, 3]] * 3)
    reference = torch.log_softmax(logits, dim=1)
    first = out.logprobs[0]
    assert first is not None and first.token_id == out.token_ids[0]
    assert len(first.top) == 5
    top_values = [value for _, value in first.top]
    assert top_values == sorted(top_values, reverse=True)
    expected_top = reference[0].topk(5)
    assert [token for token, _ in first.top] == expected_top.indices.tolist()
    assert torch.allclose(torch.tensor(top_values), expected_top.values)
    assert math.isclose(first.logprob, reference[0, first.token_id].item(), rel_tol=1e-5)
    assert first.rank == int((reference[0] > reference[0, first.token_id]).sum()) + 1
    second = out.logprobs[1]
    assert second is not None and second.top == [] and second.rank == 1
    assert second.token_id == logits[1].argmax().item()
    assert out.logprobs[2] is None


# ---- kernels against naive references --------------------------------------------------------


def naive_top_p_keep(logits: torch.Tensor, p: float) -> set[int]:
    probs = logits.softmax(dim=0)
    order = probs.argsort(descending=True, stable=True).tolist()
    kept, mass = set(), 0.0
    for token in order:
        if mass >= p:
            break
        kept.add(token)
        mass += probs[token].item()
    return kept


@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])  # flat rows exercise the full-sort fallback
def test_top_p_matches_naive_reference(scale: float) -> None:
    logits = random_logits(6, vocab=4096, seed=3, scale=scale).double()
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99, 1.0, 0.75], dtype=torch.float64)
    filtered = ops.apply_top_p(logits.clone(), top_p)
    for row in range(6):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        if top_p[row] >= 1.0:
            assert len(kept) == 4096
        else:
            assert kept == naive_top_p_keep(logits[row], top_p[row].item())


def test_top_k_keeps_k_largest_per_row() -> None:
    logits = random_logits(3, seed=4)
    filtered = ops.apply_top_k(logits.clone(), torch.tensor([1, 5, VOCAB]))
    for row, k in enumerate([1, 5, VOCAB]):
        kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
        assert kept == set(logits[row].topk(k).indices.tolist())


def test_min_p_op_threshold() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03], [0.5, 0.3, 0.12, 0.05, 0.03]])
    filtered = ops.apply_min_p(probs.log(), torch.tensor([0.2, 0.0]))
    assert torch.isfinite(filtered[0]).tolist() == [True, True, True, False, False]
    assert torch.isfinite(filtered[1]).all()


def test_exponential_race_never_picks_masked_tokens() -> None:
    probs = torch.tensor([[0.0, 1.0, 0.0]]).repeat(500, 1)
    noise = torch.zeros(500, 3)  # the worst case: noise that would divide by zero
    noise[:, 1] = 5.0
    assert ops.exponential_race_choice(probs, noise).tolist() == [1] * 500


def test_mismatched_inputs_are_rejected(sampler: Sampler) -> None:
    with pytest.raises(ValueError, match="disagree"):
        sampler(torch.zeros(2, VOCAB), [SamplingParams()], [[]], [[]], [None])
