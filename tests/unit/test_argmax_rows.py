"""Greedy sampling's C++ argmax (kernels/csrc/argmax.cpp) gives torch.argmax's ids: the first
maximum of each row, a NaN counting as the largest, on any row length."""

from __future__ import annotations

import pytest
import torch

from kernels.cpu_ext import cpu_ops_module
from kernels.sampling import greedy_choice

_ext = cpu_ops_module()
pytestmark = pytest.mark.skipif(_ext is None, reason="needs the C++ CPU kernels")


@pytest.mark.parametrize("shape", [(64, 49152), (3, 17), (5, 1), (2, 16), (7, 33)])
def test_random_rows(shape):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
    assert torch.equal(_ext.argmax_rows(logits), logits.argmax(1))


def test_ties_infinities_and_nans():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(0))
    logits[0] = float("-inf")  # nothing finite: index 0
    logits[1, 100] = logits[1, 900] = logits[1].max() + 1  # a tie across lanes: the first
    logits[2, 77] = logits[2, 9] = float("nan")  # NaN is the largest: the first NaN
    logits[3] = float("inf")
    logits[4, -1] = 1e30  # in the last, partial block of 16
    logits[5] = torch.randint(0, 3, (1000,)).float()  # many ties
    logits[6, 3] = logits[6, 19] = logits[6].max() + 1  # a tie in two lanes of neighbouring blocks
    assert torch.equal(_ext.argmax_rows(logits), logits.argmax(1))


def test_greedy_choice_takes_it_for_fp32_cpu_logits_only():
    logits = torch.randn(4, 300)
    assert torch.equal(greedy_choice(logits), logits.argmax(1))
    half = logits.to(torch.bfloat16)  # other dtypes keep torch's argmax
    assert torch.equal(greedy_choice(half), half.argmax(1))
    with pytest.raises(RuntimeError, match="fp32"):
        _ext.argmax_rows(half)
