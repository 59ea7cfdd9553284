"""Prepacked linears: the bf16 oneDNN path, weight-only int8 for small batches, W8A8 GEMMs
for larger ones, and SmoothQuant calibration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.models.config import ModelConfig
from common.models.int8_calibration import calibrate_int8_gemms
from common.models.llama import LlamaForCausalLM
from common.models.registry import int8_decode_rows, int8_gemm_enabled
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import (PackedLinear, bf16_gemms, mark_prompt_w8a8, pack_linears, packed_linear_supported,
                            w8a8_silu_mlp)
from _model_helpers import TINY, PagedDriver

pytestmark = pytest.mark.skipif(
    cpu_ops_module() is None or not packed_linear_supported(torch.bfloat16),
    reason="needs the C++ CPU kernels and oneDNN bf16 GEMMs (AVX512-BF16 or AMX)",
)


def _linear(n: int = 96, k: int = 128, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    return lin.to(torch.bfloat16)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def test_bf16_path_is_bit_identical_to_f_linear():
    lin = _linear()
    packed = PackedLinear(lin, int8_max_rows=0, w8a8=False)
    x = torch.randn(16, 128, dtype=torch.bfloat16)
    assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))


def test_bf16_gemms_suspends_w8a8_but_not_the_small_batch_path():
    lin = _linear()
    packed = PackedLinear(lin, int8_max_rows=4, w8a8=True)
    x, small = torch.randn(32, 128, dtype=torch.bfloat16), torch.randn(2, 128, dtype=torch.bfloat16)
    w8a8_out, int8_small = packed(x), packed(small)
    with bf16_gemms():
        assert not packed.runs_w8a8(32)
        assert torch.equal(packed(x), F.linear(x, lin.weight, lin.bias))  # the bf16 GEMM exactly
        assert torch.equal(packed(small), int8_small)  # decode rows keep their int8 weights
        assert w8a8_silu_mlp(packed, packed, x) is None
    with bf16_gemms(active=False):
        assert torch.equal(packed(x), w8a8_out)
    assert packed.runs_w8a8(32) and torch.equal(packed(x), w8a8_out)


def test_marked_layers_keep_w8a8_on_prompts():
    """mark_prompt_w8a8 picks layers by their own name; inside bf16_gemms only those stay int8."""
    block = nn.Module()
    block.o_proj, block.down_proj = _linear(seed=1), _linear(seed=2)
    pack_linears(block, int8_max_rows=4, w8a8=True)
    x = torch.randn(32, 128, dtype=torch.bfloat16)
    w8a8_o, w8a8_down = block.o_proj(x), block.down_proj(x)
    assert mark_prompt_w8a8(block, {"o_proj"}) == 1
    with bf16_gemms():
        assert block.o_proj.runs_w8a8(32) and not block.down_proj.runs_w8a8(32)
        assert torch.equal(block.o_proj(x), w8a8_o)
        assert torch.equal(block.down_proj(x), F.linear(x, block.down_proj.weight, block.down_proj.bias))
        assert w8a8_silu_mlp(block.o_proj, block.down_proj, x) is None  # both halves must be int8
    assert mark_prompt_w8a8(block, set()) == 0
    with bf16_gemms():
        assert not block.o_proj.runs_w8a8(32)


def test_logits_in_fp32_skip_the_bf16_rounding():
    """out_dtype=fp32: the int8 paths write their fp32 accumulators, the bf16 GEMM converts."""
    lin = _linear(n=64)
    packed = PackedLinear(lin, int8_max_rows=4, w8a8=True)
    for rows in (2, 32):
        x = torch.randn(rows, 128, dtype=torch.bfloat16)
        out = packed(x, out_dtype=torch.float32)
        assert out.dtype == torch.float32
        assert torch.equal(out.to(torch.bfloat16), packed(x))  # the bf16 result is its rounding
    plain = PackedLinear(lin)
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    assert torch.equal(plain(x, out_dtype=torch.float32), plain(x).float())


@pytest.mark.parametrize("rows", [1, 4, 5, 64])
def test_int8_paths_by_batch_size_stay_close_to_float(rows):
    lin = _linear()
    packed = PackedLinear(lin, int8_max_rows=4, w8a8=True)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    out = packed(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 96)
    assert _rel_err(out, ref) < 0.02
    # 3-D inputs keep their leading shape
    assert packed(x.view(1, rows, 128)).shape == (1, rows, 96)


def test_smoothing_tames_an_outlier_channel():
    lin = _linear(bias=False)
    x = torch.randn(64, 128)
    x[:, 7] *= 80.0  # one channel far larger than the rest, as in real LLM activations
    x = x.to(torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float())
    plain = PackedLinear(lin, w8a8=True)
    smoothed = PackedLinear(lin, w8a8=True)
    smoothed.smooth(x.float().abs().amax(dim=0))
    err_plain, err_smooth = _rel_err(plain(x), ref), _rel_err(smoothed(x), ref)
    assert err_smooth < 0.5 * err_plain
    assert err_smooth < 0.02


def test_calibration_smooths_every_int8_gemm_of_a_model():
    config = ModelConfig.from_hf_dict({**TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                       "rms_norm_eps": 1e-5, "tie_word_embeddings": True})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ref_driver = PagedDriver(model, dtype=torch.bfloat16)
    tokens = list(range(3, 40))
    ref = ref_driver.step([(0, tokens)])[0]
    assert model.pack_linears(int8_max_rows=4, w8a8=True) == 3 * 4 + 1  # 4 per layer + the tied head
    count = calibrate_int8_gemms(model, tokens)
    assert count == 13
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert all(m._inv_smooth is not None and m._inv_smooth.shape == (m.in_features,) for m in linears)
    out = PagedDriver(model, dtype=torch.bfloat16).step([(0, tokens)])[0]
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert _rel_err(out, ref.float()) < 0.05


def test_int8_switches_follow_dtype_source_and_environment(tmp_path, monkeypatch, smollm_path):
    gguf = Path(smollm_path)  # Q4_1/Q8_0: quantized already
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    monkeypatch.delenv("XLLM_INT8_GEMM", raising=False)
    monkeypatch.delenv("XLLM_INT8_DECODE", raising=False)
    assert int8_gemm_enabled(gguf, torch.bfloat16) and int8_decode_rows(gguf, torch.bfloat16) == 4
    assert not int8_gemm_enabled(gguf, torch.float32) and int8_decode_rows(gguf, torch.float32) == 0
    assert not int8_gemm_enabled(hf_dir, torch.bfloat16)
    monkeypatch.setenv("XLLM_INT8_GEMM", "0")
    assert not int8_gemm_enabled(gguf, torch.bfloat16) and int8_decode_rows(gguf, torch.bfloat16) == 4
    monkeypatch.setenv("XLLM_INT8_GEMM", "1")
    assert int8_gemm_enabled(hf_dir, torch.bfloat16)


@pytest.mark.parametrize("rows", [3, 64])
def test_fused_w8a8_mlp_matches_the_unfused_layers(rows):
    torch.manual_seed(0)
    gate_up, down = PackedLinear(_linear(256, 128), int8_max_rows=4, w8a8=True), \
        PackedLinear(_linear(128, 128), int8_max_rows=4, w8a8=True)
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    fused = w8a8_silu_mlp(gate_up, down, x)
    if rows <= 4:  # small batches stay on the weight-only path
        assert fused is None
        return
    g, u = gate_up(x).float().chunk(2, dim=-1)
    unfused = down((F.silu(g) * u).to(torch.bfloat16))
    ref = F.linear(F.silu(F.linear(x.float(), gate_up.weight.float()[:128], gate_up.bias.float()[:128]))
                   * F.linear(x.float(), gate_up.weight.float()[128:], gate_up.bias.float()[128:]),
                   down.weight.float(), down.bias.float())
    assert fused.shape == (rows, 128) and fused.dtype == torch.bfloat16
    assert _rel_err(fused, ref) < 0.03
    assert _rel_err(fused, unfused.float()) < 0.03
