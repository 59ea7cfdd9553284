"""The packed W8A8 GEMM (kernels/csrc/int8_gemm.cpp): its int32 sums are torch._int_mm's exactly,
its fused dequantization is dequant_rows' exactly, whatever the shape's edges; PackedLinear and the
decoder stack take it wherever it is built."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kernels.cpu_ext import cpu_ops_module
from kernels.int8_pack import pack_int8_gemm, unpack_int8_gemm
from kernels.linear import PackedLinear, packed_linear_supported, w8a8_silu_mlp

_ext = cpu_ops_module()
pytestmark = pytest.mark.skipif(_ext is None or not _ext.int8_gemm_supported(),
                                reason="needs the C++ CPU kernels built with AVX512-VNNI")


def _int8(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)


def _int_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # _int_mm wants more than 16 rows; int64 matmul is the exact reference at any size.
    return (x.long() @ w.long().t()).int()


def test_packing_round_trips_and_pads_columns():
    w = _int8(37, 24, seed=0)
    packed = pack_int8_gemm(w)
    assert packed.shape == (3, 6, 64) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int8_gemm(packed, 37), w)
    assert torch.equal(unpack_int8_gemm(packed, 48)[37:], torch.zeros(11, 24, dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_int8_gemm(_int8(16, 30, seed=1))


# Rows: every register block height and the 192-row chunk's edge; columns: whole 4-tile panels,
# a partial tile, a lone tile, and a thread's share that ends mid-panel (36 tiles over 2 threads).
@pytest.mark.parametrize("m", [1, 5, 6, 7, 64, 193])
@pytest.mark.parametrize("n,k", [(64, 32), (37, 24), (576, 128), (200, 1540)])
def test_sums_equal_the_exact_integer_product(m, n, k):
    x, w = _int8(m, k, seed=m), _int8(n, k, seed=n + k)
    x[0, :] = -127  # the extremes: the +128 weight offset must come off exactly
    w[0, :] = 127
    out = _ext.int8_gemm(x, pack_int8_gemm(w), n)
    assert out.dtype == torch.int32 and out.shape == (m, n)
    assert torch.equal(out, _int_mm(x, w))
    if m > 16:
        assert torch.equal(out, torch._int_mm(x, w.t()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_dequantization_equals_dequant_rows(dtype, bias):
    m, n, k = 45, 100, 64
    x, w = _int8(m, k, seed=3), _int8(n, k, seed=4)
    x_scale, w_scale = torch.rand(m) / 100, torch.rand(n) / 100
    b = torch.randn(n) if bias else None
    fused = _ext.int8_gemm_dequant(x, x_scale, pack_int8_gemm(w), w_scale, b, dtype)
    assert torch.equal(fused, _ext.dequant_rows(_int_mm(x, w), x_scale, w_scale, b, dtype))


def test_bad_operands_are_refused():
    packed = pack_int8_gemm(_int8(32, 64, seed=5))
    with pytest.raises(RuntimeError, match="do not fit"):
        _ext.int8_gemm(_int8(4, 60, seed=6), packed, 32)  # K differs
    with pytest.raises(RuntimeError, match="do not fit"):
        _ext.int8_gemm(_int8(4, 64, seed=6), packed, 48)  # more columns than tiles
    with pytest.raises(RuntimeError, match="int8"):
        _ext.int8_gemm(torch.zeros(4, 64), packed, 32)


@pytest.mark.skipif(not packed_linear_supported(torch.bfloat16), reason="needs oneDNN bf16 GEMMs")
def test_packed_linear_runs_the_packed_gemm_with_oneDNN_results(monkeypatch):
    """A W8A8 layer packs its GEMM weight (again after smoothing, then keeping no other copy of it)
    and gives what _int_mm would."""
    torch.manual_seed(0)
    gate_up = PackedLinear(nn.Linear(64, 192).to(torch.bfloat16), int8_max_rows=4, w8a8=True)
    down = PackedLinear(nn.Linear(96, 64).to(torch.bfloat16), int8_max_rows=4, w8a8=True)
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    down.smooth(torch.rand(96) * 4)
    for layer in (gate_up, down):
        assert layer._gemm_packed is not None and layer.gemm_weight is layer._gemm_packed
        assert torch.equal(unpack_int8_gemm(layer._gemm_packed, layer.out_features), layer._gemm_q.t())
    assert gate_up._gemm_rows is gate_up._q and down._gemm_rows is None  # the smoothed one: packed only
    state = down.int8_state()
    assert torch.equal(state["gemm_q"], down._gemm_q.t()) and not torch.equal(state["gemm_q"], state["q"])
    fused = w8a8_silu_mlp(gate_up, down, x)
    packed_out = gate_up(x)
    monkeypatch.setattr(gate_up._ext, "int8_gemm_supported", lambda: False)
    for layer in (gate_up, down):  # the same layers on oneDNN's int8 GEMM
        layer._set_gemm_weight(layer._gemm_q.t(), layer._gemm_scale)
        assert layer._gemm_packed is None and layer.gemm_weight.shape == (layer.in_features, layer.out_features)
    assert torch.equal(gate_up(x), packed_out)
    assert torch.equal(w8a8_silu_mlp(gate_up, down, x), fused)
