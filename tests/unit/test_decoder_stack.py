"""The one-call decoder stack (common/models/decoder_stack.py): on the default 4-bit GGUF it takes
small decode batches (4-bit kernel) and larger ones (W8A8 GEMMs) and computes exactly what the
module-by-module path does, KV writes included; models or batches it does not fit keep the module
path."""

from __future__ import annotations

import pytest
import torch

from common.default_model import default_model_path
from common.models.decoder_stack import DecoderStack
from common.models import registry
from common.models.registry import load_model
from kernels.attention import build_attention_metadata
from kernels.linear import Q4_MAX_ROWS, bf16_gemms, mark_prompt_w8a8
from _model_helpers import make_hf_model, save_hf_model


@pytest.fixture(scope="module")
def smol_bf16():
    model, _ = load_model(str(default_model_path()), dtype=torch.bfloat16)
    if model._stack is None:
        pytest.skip("no C++ kernels / 4-bit weights here")
    return model


def _caches(model, pages: int, dtype) -> list[torch.Tensor]:
    c = model.config
    row = c.head_dim + (4 if dtype == torch.int8 else 0)  # an int8 row carries its fp32 scale
    return [torch.zeros((2, c.num_key_value_heads, pages, 16, row), dtype=dtype) for _ in range(c.num_hidden_layers)]


def _run(model, caches, steps: list[tuple[list[int], list[int], list[int]]]) -> list[torch.Tensor]:
    """Each step: (token ids, query lens, context lens) over sequences i with pages [8 i, 8 i + 8)."""
    outs = []
    with torch.inference_mode():
        for ids, qlens, clens in steps:
            tables = [list(range(8 * i, 8 * i + 8)) for i in range(len(qlens))]
            meta = build_attention_metadata(qlens, clens, tables, 16)
            pos = torch.tensor([p for q, c in zip(qlens, clens) for p in range(c - q, c)])
            outs.append(model(torch.tensor(ids), pos, meta, caches).clone())
    return outs


SMALL_STEPS = [(list(range(100, 104)), [4], [4])]  # a short prompt: 4 rows, also taken by the stack
SMALL_STEPS += [([7 + i, 9 + i, 11 + i], [1, 1, 1], [5 + i, 1 + i, 1 + i]) for i in range(5)]  # 3 streams
SMALL_STEPS += [([3] * 12, [4, 4, 4], [14, 10, 10])]  # a speculative-style verify: 12 rows
# 24 streams (past the 4-bit kernel's rows: the W8A8 GEMMs), then a verify of 2 rows each.
WIDE_STEPS = [([5 + i + s for s in range(24)], [1] * 24, [1 + i] * 24) for i in range(4)]
WIDE_STEPS += [([9] * 48, [2] * 24, [6] * 24)]


def _assert_stack_matches_module_path(model, steps, kv_dtype) -> None:
    fused_caches, module_caches = _caches(model, 8 * 24, kv_dtype), _caches(model, 8 * 24, kv_dtype)
    calls = []
    original = DecoderStack.forward
    DecoderStack.forward = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        fused = _run(model, fused_caches, steps)
    finally:
        DecoderStack.forward = original
    assert len(calls) == len(steps)
    stack, model._stack = model._stack, None
    try:
        plain = _run(model, module_caches, steps)
    finally:
        model._stack = stack
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)
    for a, b in zip(fused_caches, module_caches):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [SMALL_STEPS, WIDE_STEPS], ids=["4-bit", "w8a8"])
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.int8])
def test_stack_equals_module_path_bit_for_bit(smol_bf16, kv_dtype, steps):
    _assert_stack_matches_module_path(smol_bf16, steps, kv_dtype)


def test_stack_takes_decode_batches_whose_every_linear_it_runs(smol_bf16):
    caches = _caches(smol_bf16, 4, torch.bfloat16)
    stack = smol_bf16._stack
    assert stack.takes(1, caches, torch.bfloat16) and stack.takes(Q4_MAX_ROWS, caches, torch.bfloat16)
    assert stack.takes(Q4_MAX_ROWS + 1, caches, torch.bfloat16) and stack.takes(256, caches, torch.bfloat16)
    with bf16_gemms():  # a batch with prompt tokens: only the weight-only rows
        assert stack.takes(4, caches, torch.bfloat16) and not stack.takes(64, caches, torch.bfloat16)
        try:  # prompt rows with some layers kept on W8A8: a mix the stack does not run
            mark_prompt_w8a8(smol_bf16, {"o_proj"})
            assert not stack.takes(64, caches, torch.bfloat16)
        finally:
            mark_prompt_w8a8(smol_bf16, set())
    assert not stack.takes(1, _caches(smol_bf16, 4, torch.float32), torch.bfloat16)


def test_models_without_4bit_weights_stack_only_w8a8_batches(tmp_path, monkeypatch):
    path = save_hf_model(make_hf_model("llama", seed=1), tmp_path / "m")
    plain, _ = load_model(path, dtype=torch.bfloat16)
    assert plain._stack is None  # an unquantized checkpoint: neither 4-bit blocks nor int8 GEMMs
    monkeypatch.setenv("XLLM_INT8_GEMM", "1")
    monkeypatch.setenv("XLLM_INT8_DECODE", "1")
    # The tiny checkpoint has no tokenizer to calibrate with: unsmoothed W8A8 computes the same way.
    monkeypatch.setattr(registry, "calibration_token_ids", lambda path: [])
    model, _ = load_model(path, dtype=torch.bfloat16)
    caches = _caches(model, 4, torch.bfloat16)
    assert not model._stack.takes(2, caches, torch.bfloat16)  # weight-only int8 rows: the module path
    assert model._stack.takes(8, caches, torch.bfloat16)
    _assert_stack_matches_module_path(model, WIDE_STEPS, torch.bfloat16)
    fp32, _ = load_model(str(default_model_path()), dtype=torch.float32)
    assert fp32._stack is None
