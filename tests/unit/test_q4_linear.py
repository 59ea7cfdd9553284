"""The 4-bit small-batch linear: a GGUF's Q4_0/Q4_1 blocks read exactly, repacked, and multiplied by
block-quantized activations in C++ exactly as the PyTorch reference does; the loader hands every
linear of a 4-bit GGUF its blocks (llama's q/k rows un-permuted, q/k/v and gate/up fused)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from common.models.q4_linears import packed_q4_linears
from common.models.registry import load_model
from common.weights.gguf_loader import read_q4_rows
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import PackedLinear, packed_linear_supported
from kernels.q4_pack import Q4Rows, pack_q4, q4_linear_reference, quantize_activation_blocks
from _model_helpers import make_hf_model
from test_gguf_loader import write_like_llama_cpp

Q = gguf.GGMLQuantizationType
EXT = cpu_ops_module()
needs_ext = pytest.mark.skipif(EXT is None or not packed_linear_supported(torch.bfloat16),
                               reason="needs the C++ CPU kernels and oneDNN bf16")


def _q4_rows(n: int, k: int, qtype: Q, seed: int = 0) -> tuple[Q4Rows, torch.Tensor]:
    """A random matrix quantized by gguf-py, as Q4Rows and as gguf-py's own dequantization."""
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    exact = torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(n, k).astype(np.float32))
    return Q4Rows.from_ggml(raw, qtype.name, (n, k)), exact


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_rows_hold_the_exact_ggml_weights(qtype):
    rows, exact = _q4_rows(24, 96, qtype)
    assert torch.equal(rows.dequantize(), exact)
    perm = torch.randperm(24)
    assert torch.equal(rows.select_rows(perm).dequantize(), exact[perm])
    both = Q4Rows.cat([rows, rows.select_rows(perm)])
    assert torch.equal(both.dequantize(), torch.cat([exact, exact[perm]]))


def test_pack_layout_puts_16_rows_of_4_weights_in_each_chunk():
    rows, _ = _q4_rows(20, 64, Q.Q4_1)  # 2 tiles, the second padded with 12 zero rows
    packed = pack_q4(rows)
    assert packed.shape == (2, 2, 320) and packed.dtype == torch.uint8
    q = rows.nibbles()
    t, b, c, i, j = 1, 1, 2, 3, 1
    byte = int(packed[t, b, 64 + 64 * c + 4 * i + j])
    row, col = 16 * t + i, 32 * b + 8 * c + j
    assert byte & 0x0F == int(q[row, col]) and byte >> 4 == int(q[row, col + 4])
    assert packed[t, b, :32].view(torch.float16)[i] == rows.d[row, b]
    assert packed[t, b, 32:64].view(torch.float16)[i] == rows.m[row, b]
    assert not packed[1, :, :].view(-1, 320)[:, 64:].reshape(2, 4, 16, 4)[:, :, 4:, :].any()  # padding rows


def test_reference_is_close_to_the_fp32_product():
    rows, exact = _q4_rows(32, 128, Q.Q4_1)
    x = torch.randn(3, 128)
    ref = q4_linear_reference(x, rows)
    full = x @ exact.t()
    assert (ref - full).abs().max() <= 0.02 * full.abs().max()
    xq, scale = quantize_activation_blocks(x)
    assert xq.abs().max() <= 127 and scale.shape == (3, 4)


@needs_ext
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("n,k", [(48, 64), (40, 96), (16, 32), (7, 544)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_kernel_matches_reference(qtype, n, k, m):
    rows, _ = _q4_rows(n, k, qtype, seed=n + k)
    packed = pack_q4(rows)
    bias = torch.randn(n)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, k).to(dtype)
        got = EXT.q4_linear(x, packed, n, bias).float()
        want = q4_linear_reference(x.float(), rows, bias)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert got.shape == (m, n)
        assert (got - want).abs().max() <= tol * want.abs().max() + 1e-6, (dtype, m)


@needs_ext
def test_kernel_rejects_bad_shapes():
    rows, _ = _q4_rows(32, 64, Q.Q4_1)
    packed = pack_q4(rows)
    with pytest.raises(RuntimeError, match="K must be"):
        EXT.q4_linear(torch.randn(1, 96), packed, 32, None)
    with pytest.raises(RuntimeError, match="out_features"):
        EXT.q4_linear(torch.randn(1, 64), packed, 40, None)


@needs_ext
def test_packed_linear_runs_small_batches_on_q4_and_keeps_it_in_its_state():
    rows, exact = _q4_rows(48, 64, Q.Q4_1)
    lin = nn.Linear(64, 48, bias=False).to(torch.bfloat16)
    lin.weight.data.copy_(exact.to(torch.bfloat16))
    packed = PackedLinear(lin, int8_max_rows=4, q4=pack_q4(rows))
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    want = q4_linear_reference(x.float(), rows)
    assert (packed(x).float() - want).abs().max() <= 1e-2 * want.abs().max()
    again = PackedLinear(lin, int8_max_rows=4, int8_state=packed.int8_state())
    assert torch.equal(again(x), packed(x))
    with pytest.raises(ValueError, match="4-bit weights"):
        PackedLinear(lin, int8_max_rows=4, q4=torch.zeros(2, 3, 320, dtype=torch.uint8))


@needs_ext
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
def test_loader_gives_every_linear_of_a_4bit_gguf_its_exact_blocks(qtype, tmp_path, monkeypatch):
    """A tiny llama written as llama.cpp does (permuted q/k rows): each layer's four linears get
    4-bit blocks whose product matches the fp32 model's dequantized weights."""
    monkeypatch.setenv("XLLM_INT8_GEMM", "0")  # no W8A8 calibration: the file has no tokenizer
    hf = make_hf_model("llama", seed=5, hidden_size=64, intermediate_size=128, head_dim=16,
                       num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "tiny-q4.gguf"
    write_like_llama_cpp(hf, "llama", path, qtype=qtype)
    q4 = packed_q4_linears(read_q4_rows(gguf.GGUFReader(str(path))))
    layers = hf.config.num_hidden_layers
    # qkv, o, gate_up, down per layer and the untied head (the embedding is not a linear)
    assert sorted(q4) == sorted([f"model.layers.{i}.{n}" for i in range(layers) for n in (
        "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")] + ["lm_head"])
    fp32, _ = load_model(str(path), dtype=torch.float32)
    bf16, _ = load_model(str(path), dtype=torch.bfloat16)
    x = torch.randn(1, 64)
    for i in range(layers):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            lin = bf16.get_submodule(f"model.layers.{i}.{name}")
            assert isinstance(lin, PackedLinear) and lin._q4 is not None, name
            weight = fp32.get_submodule(f"model.layers.{i}.{name}").weight
            inp = x if lin.in_features == 64 else torch.randn(1, lin.in_features)
            want = inp @ weight.t()
            got = lin(inp.to(torch.bfloat16)).float()
            assert (got - want).abs().max() <= 0.03 * want.abs().max(), name
