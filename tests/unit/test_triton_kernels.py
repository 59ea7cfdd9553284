"""Each Triton kernel against its PyTorch reference: on the CPU under ``TRITON_INTERPRET=1``
(small shapes, so the interpreter stays quick), on a CUDA GPU when there is one."""

from __future__ import annotations

from _triton_env import DEVICE, HAS_TRITON  # sets TRITON_INTERPRET first

import pytest
import torch

import kernels.attention as attention
from kernels import backend
from kernels.activation import gelu_tanh_and_mul, silu_and_mul
from kernels.attention import build_attention_metadata, paged_attention, write_kv
from kernels.backend import force_backend
from kernels.norm import add_rms_norm, rms_norm
from kernels.rotary import apply_rotary

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype: torch.dtype) -> dict:
    # bf16: one unit in the last place (2^-8 relative); the reductions sum in another order.
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)


def _assert_same_rounding(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """Close, and for the elementwise kernels rounded at the same points as the reference: almost
    every bf16 value bit-identical (a kernel that skips one of the reference's roundings differs
    in a quarter of them; a different summation order in a handful)."""
    got = got.cpu()
    torch.testing.assert_close(got, ref, **_tol(dtype))
    if dtype != torch.float32:
        assert (got != ref).float().mean().item() < 0.02


def _both(fn, *args, **kwargs):
    """``fn`` on the reference path (CPU tensors) and on the Triton path (``DEVICE`` tensors)."""
    with force_backend("reference"):
        ref = fn(*args, **kwargs)
    moved = [a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args]
    with force_backend("triton"):
        got = fn(*moved, **kwargs)
    return ref, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm(dtype, unit_offset):
    torch.manual_seed(0)
    x = (torch.randn(9, 48) * 3).to(dtype)  # 48: not a power of two, the block is masked
    w = (torch.randn(48) * 0.5 + (0 if unit_offset else 1)).to(dtype)
    ref, got = _both(rms_norm, x, w, 1e-6, unit_offset)
    assert got.dtype == dtype and got.shape == x.shape
    _assert_same_rounding(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_on_heads_inside_a_fused_qkv(dtype):
    """Qwen3's q/k norms read ``qkv[:, :H]``: rows of a 3-D view with a gap between tokens."""
    torch.manual_seed(1)
    qkv = torch.randn(3, 4 + 2 * 2, 16).to(dtype)
    w = torch.randn(16).to(dtype)
    ref, got = _both(lambda t, ww: rms_norm(t[:, :4], ww, 1e-5), qkv, w)
    _assert_same_rounding(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("with_x", [True, False])
def test_add_rms_norm_updates_the_residual_in_place(dtype, unit_offset, with_x):
    torch.manual_seed(2)
    res = torch.randn(4, 40).to(dtype)
    x = torch.randn(4, 40).to(dtype) if with_x else None
    w = torch.randn(40).to(dtype)
    expected_sum = res + x if with_x else res.clone()
    expected = rms_norm(expected_sum, w, 1e-6, unit_offset)
    res_dev = res.to(DEVICE)
    with force_backend("triton"):
        total, normed = add_rms_norm(res_dev, x.to(DEVICE) if with_x else None, w.to(DEVICE), 1e-6, unit_offset)
    assert total.data_ptr() == res_dev.data_ptr()  # in place, as the C++ add_rms_norm_
    assert torch.equal(total.cpu(), expected_sum)  # the sum is rounded once, like `res + x`
    _assert_same_rounding(normed, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_width", ["half", "full"])
def test_rotary_on_a_strided_qk_view(dtype, table_width):
    torch.manual_seed(3)
    T, H, KVH, D = 5, 4, 2, 16
    qkv = torch.randn(T, H + 2 * KVH, D).to(dtype)
    angles = torch.randn(T, D // 2)
    table = torch.cat([angles, angles], dim=-1)
    cos_full, sin_full = table.cos().to(dtype), table.sin().to(dtype)
    if table_width == "half":  # the engine's layout: views into one [T, D] row of cos | sin
        rows = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
        cos, sin = rows[:, : D // 2], rows[:, D // 2 :]
    else:
        cos, sin = cos_full, sin_full
    ref, got = _both(lambda x, c, s: apply_rotary(x[:, : H + KVH], c, s), qkv, cos, sin)
    assert got.shape == (T, H + KVH, D)
    _assert_same_rounding(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [silu_and_mul, gelu_tanh_and_mul], ids=["silu", "gelu_tanh"])
def test_gated_activations(dtype, fn):
    torch.manual_seed(4)
    x = (torch.randn(2, 3, 2 * 40) * 3).to(dtype)
    ref, got = _both(fn, x)
    assert got.shape == (2, 3, 40)
    _assert_same_rounding(got, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_store_matches_write_kv_and_skips_negative_slots(dtype):
    torch.manual_seed(5)
    KVH, D, PAGE = 2, 8, 4
    k, v = torch.randn(4, KVH, D), torch.randn(4, KVH, D)
    slots = torch.tensor([5, 0, 13, 30])
    ref = torch.zeros(2, KVH, 8, PAGE, D, dtype=dtype)
    with force_backend("reference"):
        write_kv(ref, k, v, slots)
    got = torch.zeros(2, KVH, 8, PAGE, D, dtype=dtype, device=DEVICE)
    with force_backend("triton"):
        write_kv(got, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE))
    assert torch.equal(got.cpu(), ref)  # float32 -> bf16 rounds to nearest even, as .to() does
    # Slot -1 (a CUDA-graph padding row) writes nothing.
    before = got.clone()
    with force_backend("triton"):
        write_kv(got, k.to(DEVICE) + 1, v.to(DEVICE) + 1, torch.tensor([-1, -1, -1, -1], device=DEVICE))
    assert torch.equal(got, before)


# -- paged attention ---------------------------------------------------------------------------


def _paged_case(dtype, query_lens, context_lens, heads, kv_heads, head_dim, page, seed=0):
    """A KV pool with each sequence's pages scattered (and out of order), plus queries."""
    torch.manual_seed(seed)
    pages_needed = [-(-c // page) for c in context_lens]
    perm = torch.randperm(sum(pages_needed) + 3).tolist()
    tables, at = [], 0
    for n in pages_needed:
        tables.append(perm[at : at + n])
        at += n
    cache = torch.randn(2, kv_heads, len(perm), page, head_dim).to(dtype)
    meta = build_attention_metadata(query_lens, context_lens, tables, page)
    T = sum(query_lens)
    write_kv(cache, torch.randn(T, kv_heads, head_dim), torch.randn(T, kv_heads, head_dim), meta.slot_mapping)
    q = torch.randn(T, heads, head_dim).to(dtype)
    return q, cache, (query_lens, context_lens, tables, page)


def _attention_pair(monkeypatch, q, cache, layout, window, cap):
    # The PyTorch reference, not the C++ kernel: the reference is what the Triton path must equal.
    monkeypatch.setattr(attention, "paged_decode_module", lambda: None)
    meta = build_attention_metadata(*layout)
    with force_backend("reference"):
        ref = paged_attention(q, cache, meta, 0.3, window, cap)
    meta_dev = build_attention_metadata(*layout, device=DEVICE)
    with force_backend("triton"):
        got = paged_attention(q.to(DEVICE), cache.to(DEVICE), meta_dev, 0.3, window, cap)
    return ref, got


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (None, 4.0), (20, 4.0)])
def test_paged_attention_mixed_batch(monkeypatch, dtype, window, cap):
    """A 70-token prefill (two query blocks, two key blocks), a decode at context 10, a 3-token
    chunk after 5 cached tokens, a 1-token sequence: the decode and prefill kernels together."""
    q, cache, layout = _paged_case(dtype, [70, 1, 3, 1], [70, 10, 8, 1], heads=4, kv_heads=2, head_dim=16, page=4)
    ref, got = _attention_pair(monkeypatch, q, cache, layout, window, cap)
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (2, 2)])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_attention_decode_only(monkeypatch, dtype, heads, kv_heads, window):
    """Decode batches take one launch over the per-token page tables (the CUDA-graph path);
    contexts up to 150 keys span several key blocks and many pages."""
    q, cache, layout = _paged_case(dtype, [1] * 4, [150, 9, 64, 65], heads=heads, kv_heads=kv_heads,
                                   head_dim=8, page=8, seed=1)
    ref, got = _attention_pair(monkeypatch, q, cache, layout, window, None)
    torch.testing.assert_close(got.cpu(), ref, **_tol(dtype))


def test_int8_cache_stays_on_the_reference_path(monkeypatch):
    """The Triton kernels read bf16/fp16/fp32 pages; an int8 cache keeps the dequantizing reference."""
    from kernels.kv_quant import kv_row_width

    monkeypatch.setattr(attention, "paged_decode_module", lambda: None)
    torch.manual_seed(6)
    layout = ([1, 2], [5, 6], [[0, 1], [2, 3]], 4)
    meta = build_attention_metadata(*layout)
    cache = torch.zeros(2, 1, 4, 4, kv_row_width(8, torch.int8), dtype=torch.int8)
    write_kv(cache, torch.randn(3, 1, 8), torch.randn(3, 1, 8), meta.slot_mapping)
    q = torch.randn(3, 2, 8)
    with force_backend("reference"):
        ref = paged_attention(q, cache, meta, 0.5)
    with force_backend("triton"):
        got = paged_attention(q, cache, meta, 0.5)
    assert torch.equal(got, ref)


# -- the backend choice --------------------------------------------------------------------------


def test_backend_choice_per_device():
    assert backend.backend_for(torch.zeros(1)) == "reference"  # CPU tensors: reference (and C++) ops
    with force_backend("triton"):
        assert backend.backend_for(torch.zeros(1, device=DEVICE)) == "triton"
    assert backend.backend_for(torch.zeros(1)) == "reference"  # the override is scoped
    if DEVICE == "cuda":
        assert backend.backend_for(torch.zeros(1, device="cuda")) == "triton"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        with force_backend("cuda"):
            pass


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("XLLM_KERNEL_BACKEND", "triton")
    assert backend._from_env() == "triton"
    monkeypatch.setenv("XLLM_KERNEL_BACKEND", "auto")
    assert backend._from_env() is None
    monkeypatch.setenv("XLLM_KERNEL_BACKEND", "tpu")
    with pytest.raises(ValueError, match="XLLM_KERNEL_BACKEND"):
        backend._from_env()


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    import kernels.triton._compat as compat

    monkeypatch.setattr(compat, "INTERPRETED", False)  # as if imported without TRITON_INTERPRET=1
    with force_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend.backend_for(torch.zeros(1))


def test_torch_npu_is_optional():
    # Behind an import guard: absent here, and asking for it is not an error.
    assert backend.torch_npu_module() is None or hasattr(backend.torch_npu_module(), "npu_rms_norm")


# -- the dispatch wiring, end to end -------------------------------------------------------------

MODEL_VARIANTS = {
    # q/k norms on heads inside the fused qkv (3-D rms_norm), silu, GQA
    "qwen3": ("qwen3", dict(head_dim=16)),
    # unit-offset norms, sandwich norms, sliding layers with their own rope, gelu_tanh, soft cap
    "gemma3": ("gemma3", dict(num_hidden_layers=2, head_dim=16, sliding_window=4, sliding_window_pattern=2,
                              query_pre_attn_scalar=24, final_logit_softcapping=5.0,
                              hidden_activation="gelu_pytorch_tanh")),
}


@pytest.mark.parametrize("variant", sorted(MODEL_VARIANTS))
def test_model_on_the_triton_path_matches_transformers(variant, tmp_path, monkeypatch):
    """A whole model with every op on the Triton backend (the C++ CPU ops switched off, so each
    layer goes through the dispatching functions) against transformers' own forward: a mixed
    batch of two prefills, then a decode step for both."""
    import common.models.layers as layers
    from _model_helpers import hf_logits, make_hf_model, save_hf_model
    from common.models.registry import load_model

    monkeypatch.setattr(layers, "_cpu_ext", lambda x: None)
    family, overrides = MODEL_VARIANTS[variant]
    hf = make_hf_model(family, seed=11, **overrides)
    ours, config = load_model(save_hf_model(hf, tmp_path), device=DEVICE)
    page = 4
    caches = [torch.zeros(2, config.num_key_value_heads, 16, page, config.head_dim, device=DEVICE)
              for _ in range(config.num_hidden_layers)]
    prompts = [[5, 17, 3, 99, 42, 8, 61], [7, 200, 13, 4, 4]]
    tables = [[9, 2], [14, 0]]  # scattered, out-of-order pages
    decode_tokens = [33, 71]

    def step(query_lens, context_lens, ids, positions):
        meta = build_attention_metadata(query_lens, context_lens, tables, page, device=DEVICE)
        hidden = ours(torch.tensor(ids, device=DEVICE), torch.tensor(positions, device=DEVICE), meta, caches)
        return ours.compute_logits(hidden).cpu()

    with force_backend("triton"), torch.inference_mode():
        prefill = step([7, 5], [7, 5], prompts[0] + prompts[1], [*range(7), *range(5)])
        decode = step([1, 1], [8, 6], decode_tokens, [7, 5])
    for i, (prompt, rows) in enumerate(zip(prompts, torch.split(prefill, [7, 5]))):
        ref = hf_logits(hf, prompt + [decode_tokens[i]])
        torch.testing.assert_close(rows, ref[:-1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(decode[i], ref[-1], rtol=1e-3, atol=1e-3)
