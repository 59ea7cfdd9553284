"""The int8 KV cache: the row format, the C++ write and decode kernels against the dequantised
PyTorch reference, and the flash-decoding split against the unsplit kernel."""

from __future__ import annotations

import pytest
import torch

import kernels.attention as attention
from common.engine.kv_cache import allocate_kv_caches, kv_page_bytes
from kernels.attention import build_attention_metadata, paged_attention, write_kv
from kernels.cpu_ext import cpu_ops_module
from kernels.kv_quant import dequantize_kv_rows, kv_head_dim, kv_row_width, quantize_kv_rows
from kernels.rotary import apply_rotary

ext = cpu_ops_module()
needs_ext = pytest.mark.skipif(ext is None, reason="the C++ CPU kernels could not be built on this machine")


def test_rows_round_trip_within_half_a_step():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 64) * torch.rand(7, 3, 1) * 20
    x[2, 1] = 0  # an all-zero row: scale 0, values 0, no NaN
    rows = quantize_kv_rows(x)
    assert rows.dtype == torch.int8 and rows.shape == (7, 3, 68)
    back = dequantize_kv_rows(rows)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((back - x).abs() <= step * 0.5 + 1e-6).all()
    assert torch.equal(back[2, 1], torch.zeros(64))
    assert rows[..., :64].abs().max() <= 127


def test_pool_sizes_count_the_inline_scales():
    assert kv_row_width(64, torch.int8) == 68 and kv_row_width(64, torch.bfloat16) == 64
    assert kv_page_bytes(30, 3, 64, 16, "int8") == 2 * 30 * 16 * 3 * 68
    assert kv_page_bytes(30, 3, 64, 16, "int8") < 0.55 * kv_page_bytes(30, 3, 64, 16, torch.bfloat16)
    caches = allocate_kv_caches(5, 2, 3, 64, 16, "int8")
    assert caches[0].shape == (2, 3, 5, 16, 68) and caches[0].dtype == torch.int8
    assert kv_head_dim(caches[0]) == 64


def _reference(q, k_rows, v_rows, pages, lens, page_size, scale, window=None, cap=None):
    """Plain fp32 attention over the dequantised rows of each sequence."""
    k_all = dequantize_kv_rows(k_rows) if k_rows.dtype == torch.int8 else k_rows.float()
    v_all = dequantize_kv_rows(v_rows) if v_rows.dtype == torch.int8 else v_rows.float()
    B, H, D = q.shape
    KVH = k_all.shape[0]
    out = torch.empty(B, H, D)
    for b in range(B):
        n = int(lens[b])
        slots = torch.arange(n)
        k = k_all[:, pages[b, slots // page_size], slots % page_size]  # [KVH, n, D]
        v = v_all[:, pages[b, slots // page_size], slots % page_size]
        scores = torch.einsum("kgd,knd->kgn", q[b].float().view(KVH, H // KVH, D), k) * scale
        if cap:
            scores = torch.tanh(scores / cap) * cap
        if window:
            scores[..., : max(0, n - window)] = float("-inf")
        out[b] = torch.einsum("kgn,knd->kgd", scores.softmax(-1), v).reshape(H, D)
    return out


def _random_int8_cache(kvh, num_pages, page_size, head_dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes, so a wrong (shared or missing) scale shows.
    x = torch.randn(2, kvh, num_pages, page_size, head_dim, generator=gen)
    x *= torch.rand(2, kvh, num_pages, page_size, 1, generator=gen) * 4 + 0.1
    return quantize_kv_rows(x)


@needs_ext
@pytest.mark.parametrize("head_dim", [64, 128, 40])  # 40: not a multiple of 16 (the portable loop)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 30.0)])
def test_int8_decode_kernel_matches_dequantised_reference(head_dim, q_dtype, window, cap):
    torch.manual_seed(0)
    H, KVH, PAGE, N = 6, 2, 4, 24
    lens = torch.tensor([1, 9, 23])
    pages = torch.randperm(N)[:18].view(3, 6)
    cache = _random_int8_cache(KVH, N, PAGE, head_dim)
    q = torch.randn(3, H, head_dim).to(q_dtype)
    out = ext.paged_decode_attention(q, cache[0], cache[1], pages, lens, 0.125, window or -1, cap or 0.0)
    assert out.dtype == q_dtype and out.shape == q.shape
    ref = _reference(q, cache[0], cache[1], pages, lens, PAGE, 0.125, window, cap)
    tol = 1e-4 if q_dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()  # one bf16 ulp of the output
    assert (out.float() - ref).abs().max() < tol


@needs_ext
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lens", [[700], [300, 1000], [5]])
def test_split_context_equals_the_unsplit_kernel(cache_dtype, lens):
    """Batch 1-2 with long contexts: the flash-decoding split merges to the same result."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)  # the split needs more threads than (sequence, kv head) pairs / 2
    try:
        torch.manual_seed(1)
        H, KVH, D, PAGE = 9, 3, 64, 16
        per_seq = -(-max(lens) // PAGE)
        N = per_seq * len(lens)
        pages = torch.randperm(N).view(len(lens), per_seq)
        if cache_dtype == torch.int8:
            cache = _random_int8_cache(KVH, N, PAGE, D, seed=2)
        else:
            cache = torch.randn(2, KVH, N, PAGE, D).to(cache_dtype)
        q_dtype = torch.float32 if cache_dtype == torch.float32 else torch.bfloat16
        q = (torch.randn(len(lens), H, D) * 3).to(q_dtype)
        lens_t = torch.tensor(lens)
        auto = ext.paged_decode_attention(q, cache[0], cache[1], pages, lens_t, 0.125, -1, 0.0)
        unsplit = ext.paged_decode_attention(q, cache[0], cache[1], pages, lens_t, 0.125, -1, 0.0, max_splits=1)
        forced = ext.paged_decode_attention(q, cache[0], cache[1], pages, lens_t, 0.125, -1, 0.0, max_splits=3)
        ref = _reference(q, cache[0], cache[1], pages, lens_t, PAGE, 0.125)
        tol = 1e-4 if q_dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
        for got in (auto, unsplit, forced):
            assert (got.float() - ref).abs().max() < tol
        assert (auto.float() - unsplit.float()).abs().max() < tol
    finally:
        torch.set_num_threads(saved)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_write_quantizes_like_the_reference(dtype):
    torch.manual_seed(0)
    H, KVH, D, PAGE, T = 4, 2, 64, 4, 3
    meta = build_attention_metadata([1, 2], [5, 3], [[6, 2], [4]], PAGE)
    qkv = torch.randn(T, (H + 2 * KVH) * D).to(dtype)
    table = torch.randn(T, D).to(dtype)
    cos, sin = table[:, : D // 2], table[:, D // 2 :]
    view = qkv.view(T, H + 2 * KVH, D)
    ref_qk = apply_rotary(view[:, : H + KVH], cos, sin)
    ref_cache = torch.zeros(2, KVH, 8, PAGE, D + 4, dtype=torch.int8)
    write_kv(ref_cache, ref_qk[:, H:], view[:, H + KVH :], meta.slot_mapping)

    cache = torch.zeros_like(ref_cache)
    work = qkv.clone()
    ext.rotary_write_kv_(work, cos, sin, cache, meta.slot_mapping, H, KVH)
    got, ref = dequantize_kv_rows(cache), dequantize_kv_rows(ref_cache)
    step = ref.abs().amax(-1, keepdim=True) / 127
    # bf16: the C++ and the PyTorch rotary may round a rotated key one bf16 ulp apart.
    rotary_slack = 0.0 if dtype == torch.float32 else 2 ** -7 * ref.abs().max().item()
    # The same rows and scales; a value may round the other way only on a rounding boundary.
    assert ((got - ref).abs() <= step * 1.01 + rotary_slack + 1e-6).all()
    assert (cache[..., :D] != ref_cache[..., :D]).float().mean() < 0.02
    assert torch.allclose(cache[..., D:].contiguous().view(torch.float32),
                          ref_cache[..., D:].contiguous().view(torch.float32), rtol=1e-6 if rotary_slack == 0 else 1e-2)


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_reference_path_matches_the_kernel(q_dtype, monkeypatch):
    """Prefill chunks and decodes over an int8 cache: the PyTorch path (dequantising gathered pages)
    and the C++ kernel agree, and both stay close to attention over the unquantised keys/values."""
    torch.manual_seed(3)
    H, KVH, D, PAGE = 4, 2, 32, 4
    meta = build_attention_metadata([1, 5, 1], [9, 5, 3], [[7, 1, 3], [4, 5], [0]], PAGE)
    T = meta.num_tokens
    cache8 = torch.zeros(2, KVH, 8, PAGE, D + 4, dtype=torch.int8)
    cache32 = torch.zeros(2, KVH, 8, PAGE, D)
    # Earlier context, then this step's tokens.
    old_slots = torch.tensor([28, 29, 30, 31, 4, 5, 6, 7, 0, 1])
    k_old, v_old = torch.randn(len(old_slots), KVH, D), torch.randn(len(old_slots), KVH, D)
    k, v = torch.randn(T, KVH, D), torch.randn(T, KVH, D)
    q = torch.randn(T, H, D).to(q_dtype)
    for cache in (cache8, cache32):
        write_kv(cache, k_old, v_old, old_slots)
        write_kv(cache, k, v, meta.slot_mapping)
    exact = paged_attention(q.float(), cache32, meta, 0.2)
    monkeypatch.setattr(attention, "paged_decode_module", lambda: None)
    reference = paged_attention(q, cache8, meta, 0.2)
    assert reference.dtype == q_dtype
    assert (reference.float() - exact).abs().max() < 0.05
    if ext is not None:
        monkeypatch.undo()
        kernel = paged_attention(q, cache8, meta, 0.2)
        tol = 1e-4 if q_dtype == torch.float32 else 2 ** -7 * reference.float().abs().max().item()
        assert (kernel.float() - reference.float()).abs().max() < tol
