"""Attention of one query token per row over its sequence's paged KV (decode).

KV layout (``kernels/attention.py``): ``k_cache``/``v_cache`` are ``[KVH, num_pages, page_size, D]``
views of the pool. Row ``i`` attends to keys ``0 .. k_len[i] - 1`` (the last ``window`` of them
with a sliding window) found through its page table ``pages[i]``. One program covers one row and
one KV head: the ``G`` query heads that share that KV head are the rows of one ``tl.dot`` tile
(padded to 16), so each K/V block is read once per group rather than once per query head.
Scores and the online softmax are float32; probabilities are rounded to the KV dtype before
the second product, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import mma, round_to

__all__ = ["paged_decode_attention"]


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pages_ptr, k_len_ptr, rows_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kh, stride_kp, stride_ks, stride_pt,
    page_size, scale, soft_cap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_ROWS: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    if HAS_ROWS:
        row = tl.load(rows_ptr + i)
    else:
        row = i
    k_len = tl.load(k_len_ptr + i).to(tl.int32)  # loop bounds in int32; page offsets stay int64
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < HEAD_DIM
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    kv_dtype = k_ptr.dtype.element_ty
    q = q.to(kv_dtype)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(k_len - window, 0)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, k_len, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < k_len
        page = tl.load(pages_ptr + i * stride_pt + n // page_size, mask=nmask, other=0)
        offs = kvh * stride_kh + page * stride_kp + (n % page_size) * stride_ks
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PRECISION) * scale
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + mma(round_to(p, kv_dtype), v, DOT_PRECISION)
        m_i = m_new
    # k_len >= 1 always has a key in range, so l_i > 0 on the real rows.
    out = acc / l_i[:, None]
    tl.store(out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


def decode_tiles(head_dim: int) -> tuple[int, int]:
    """(keys per block, warps): the largest tile that compiles for sm_80/sm_90 without register
    spills (ptxas' resource usage, tests/unit/test_triton_compile.py; the gathered K/V pointers are
    what fills the registers)."""
    if head_dim <= 64:
        return 64, 8
    if head_dim <= 128:
        return 16, 4
    return 16, 8


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 caches keep full precision (no TF32) so they match the fp32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    k_len: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    rows: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of ``q [T, H, D]`` over paged ``k_cache``/``v_cache [KVH, P, S, D]``.

    Program ``i`` reads the page table ``pages[i]`` and context length ``k_len[i] >= 1``; it
    computes query row ``rows[i]`` (default ``i``) into the same row of ``out`` (``[T, H, D]``,
    allocated when None). Rows that no program covers are left as they were.
    """
    T, H, D = q.shape
    KVH, _, page_size, _ = k_cache.shape
    if H % KVH:
        raise ValueError(f"{H} query heads do not divide into {KVH} KV heads")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("k_cache and v_cache need the same strides and a unit last stride")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty((T, H, D), dtype=q.dtype, device=q.device)
    n = pages.shape[0]
    if n == 0:
        return out
    group = H // KVH
    block_n, warps = decode_tiles(D)
    _paged_decode_kernel[(n, KVH)](
        q, k_cache, v_cache, out, pages, k_len, rows if rows is not None else k_len,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), pages.stride(0),
        page_size, scale, soft_cap or 0.0, sliding_window or 0,
        GROUP=group, HEAD_DIM=D, BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_N=block_n,
        HAS_ROWS=rows is not None, USE_WINDOW=sliding_window is not None, USE_SOFT_CAP=soft_cap is not None,
        DOT_PRECISION=dot_precision(k_cache.dtype), num_warps=warps,
    )
    return out
