"""The C++ CPU kernels (kernels/csrc) against their PyTorch references."""

import pytest
import torch

from kernels.activation import silu_and_mul
from kernels.attention import build_attention_metadata, write_kv
from kernels.cpu_ext import cpu_ops_module
from kernels.norm import rms_norm
from kernels.rotary import apply_rotary

ext = cpu_ops_module()
pytestmark = pytest.mark.skipif(ext is None, reason="the C++ CPU kernels could not be built on this machine (no compiler); the PyTorch path is tested elsewhere")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 40), (3, 576), (5, 1536), (7, 100)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_matches_dequantized(dtype, shape, with_bias):
    torch.manual_seed(0)
    m, k = shape
    n = 37  # not a multiple of the kernel's row block
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scale = torch.rand(n) / 100
    bias = torch.randn(n) if with_bias else None
    x = torch.randn(m, k).to(dtype)
    expected = x.float() @ (q.float() * scale[:, None]).T
    if bias is not None:
        expected += bias
    out = ext.int8_linear(x, q, scale, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("add", [False, True])
def test_add_rms_norm_matches_reference(dtype, unit_offset, add):
    torch.manual_seed(0)
    h = torch.randn(5, 96).to(dtype)
    x = torch.randn(5, 96).to(dtype) if add else None
    w = torch.randn(96).to(dtype)
    ref_h = h + x if add else h.clone()
    ref = rms_norm(ref_h, w, 1e-6, unit_offset)
    res = h.clone()
    out = ext.add_rms_norm_(res, x, w, 1e-6, unit_offset)
    assert torch.equal(res, ref_h)
    # bf16: one ulp where the fp32 statistics round differently
    atol = 1e-5 if dtype == torch.float32 else 2 ** -7 * ref.float().abs().max().item()
    assert (out.float() - ref.float()).abs().max() <= atol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_reference(dtype):
    torch.manual_seed(0)
    x = (torch.randn(3, 2 * 80) * 4).to(dtype)
    ref = silu_and_mul(x).float()
    out = ext.silu_and_mul(x).float()
    assert (out - ref).abs().max() <= (1e-5 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_write_kv_matches_reference(dtype):
    torch.manual_seed(0)
    H, KVH, D, PAGE, T = 4, 2, 64, 4, 3
    meta = build_attention_metadata([1, 2], [5, 3], [[6, 2], [4]], PAGE)
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)
    table = torch.randn(T, D).to(dtype)  # [cos | sin] rows, as the rotary lookup returns them
    cos, sin = table[:, : D // 2], table[:, D // 2 :]
    view = qkv.view(T, H + 2 * KVH, D)
    ref_qk = apply_rotary(view[:, : H + KVH], cos, sin)
    ref_cache = torch.zeros(2, KVH, 8, PAGE, D, dtype=dtype)
    write_kv(ref_cache, ref_qk[:, H:], view[:, H + KVH :], meta.slot_mapping)

    cache = torch.zeros_like(ref_cache)
    work = qkv.clone()
    ext.rotary_write_kv_(work, cos, sin, cache, meta.slot_mapping, H, KVH)
    got = work.view(T, H + 2 * KVH, D)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -6 * ref_qk.float().abs().max().item()
    assert (got[:, : H + KVH].float() - ref_qk.float()).abs().max() <= tol
    assert (cache.float() - ref_cache.float()).abs().max() <= tol
    assert torch.equal(got[:, H + KVH :], view[:, H + KVH :])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_bf16_decode_attention_matches_fp32(head_dim, window, cap):
    """The AVX-512 BF16 path (bf16 q and cache, head_dim % 32 == 0) against fp32 math."""
    torch.manual_seed(0)
    H, KVH, PAGE, N = 6, 2, 4, 24
    lens = torch.tensor([1, 9, 23])
    pages = torch.randperm(N)[:18].view(3, 6)
    k_cache = torch.randn(KVH, N, PAGE, head_dim).bfloat16()
    v_cache = torch.randn(KVH, N, PAGE, head_dim).bfloat16()
    q = torch.randn(3, H, head_dim).bfloat16()
    out = ext.paged_decode_attention(q, k_cache, v_cache, pages, lens, 0.125, window or -1, cap or 0.0)
    assert out.dtype == torch.bfloat16
    for b in range(3):
        n = int(lens[b])
        slots = torch.arange(n)
        k = k_cache[:, pages[b, slots // PAGE], slots % PAGE].float()  # [KVH, n, D]
        v = v_cache[:, pages[b, slots // PAGE], slots % PAGE].float()
        qb = q[b].float().view(KVH, H // KVH, head_dim)
        scores = torch.einsum("kgd,knd->kgn", qb, k) * 0.125
        if cap:
            scores = torch.tanh(scores / cap) * cap
        if window:
            scores[..., : max(0, n - window)] = float("-inf")
        ref = torch.einsum("kgn,knd->kgd", scores.softmax(-1), v).reshape(H, head_dim)
        assert (out[b].float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [16, 40, 576])
@pytest.mark.parametrize("channel_scaled", [False, True])
def test_quantize_rows_s8_matches_reference(dtype, k, channel_scaled):
    torch.manual_seed(0)
    x = (torch.randn(9, k) * torch.rand(9, 1) * 10).to(dtype)
    x[3] = 0  # an all-zero row gets scale 1 and zeros
    c = torch.rand(k) + 0.5 if channel_scaled else None
    q, s = ext.quantize_rows_s8(x, c)
    xf = x.float() * (c if c is not None else 1.0)
    ref_s = xf.abs().amax(dim=1) / 127
    ref_s[3] = 1.0
    assert q.dtype == torch.int8 and q.shape == x.shape and s.shape == (9,)
    assert torch.allclose(s, ref_s, rtol=1e-6)
    # round(x / s): off by one only where x / s sits on a rounding boundary (1/s vs division).
    assert (q.float() - torch.round(xf / ref_s[:, None])).abs().max() <= 1
    assert q.abs().max() <= 127 and (q[3] == 0).all()
    assert (q.float() * s[:, None] - xf).abs().max() <= s.max() * 0.51 + 1e-6


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_dequant_rows_matches_reference(out_dtype, with_bias):
    torch.manual_seed(0)
    acc = torch.randint(-50000, 50000, (5, 37), dtype=torch.int32)
    xs, ws = torch.rand(5), torch.rand(37) / 100
    bias = torch.randn(37) if with_bias else None
    out = ext.dequant_rows(acc, xs, ws, bias, out_dtype)
    expected = acc.float() * xs[:, None] * ws[None, :] + (bias if bias is not None else 0.0)
    assert out.dtype == out_dtype and out.shape == (5, 37)
    # bf16: exactly torch's round-to-nearest-even cast of the fp32 result.
    assert torch.equal(out, expected.to(out_dtype)) or torch.allclose(out.float(), expected, rtol=1e-6)


def test_w8a8_ops_reject_bad_inputs():
    with pytest.raises(RuntimeError, match="must be"):
        ext.quantize_rows_s8(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="channel_scale"):
        ext.quantize_rows_s8(torch.randn(2, 8), torch.ones(4))
    with pytest.raises(RuntimeError, match="x_scale"):
        ext.dequant_rows(torch.zeros(2, 3, dtype=torch.int32), torch.ones(3), torch.ones(3), None, torch.float32)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("channel_scaled", [False, True])
def test_silu_mul_quantize_rows_matches_reference(with_bias, channel_scaled):
    torch.manual_seed(0)
    m, i = 6, 40  # I not a multiple of 16: masked tails
    acc = torch.randint(-30000, 30000, (m, 2 * i), dtype=torch.int32)
    xs, ws = torch.rand(m) / 100, torch.rand(2 * i) / 100
    bias = torch.randn(2 * i) if with_bias else None
    c = torch.rand(i) + 0.5 if channel_scaled else None
    q, s = ext.silu_mul_quantize_rows(acc, xs, ws, bias, c)
    y = acc.float() * xs[:, None] * ws[None, :] + (bias if bias is not None else 0.0)
    h = torch.nn.functional.silu(y[:, :i]) * y[:, i:] * (c if c is not None else 1.0)
    ref_s = h.abs().amax(dim=1) / 127
    assert q.dtype == torch.int8 and q.shape == (m, i)
    assert torch.allclose(s, ref_s, rtol=1e-4)
    assert (q.float() - torch.round(h / ref_s[:, None])).abs().max() <= 1
