"""Causal attention of prefill chunks (several query tokens per sequence) over paged KV.

The batch is the prefill group of ``kernels.attention.AttentionMetadata``: sequence ``b`` has
query slots ``token_index[b, :]`` (valid where ``query_valid``) at absolute positions
``q_pos[b, :]`` and a context of ``k_len[b]`` keys behind its page table ``pages[b]``. One program
covers ``BLOCK_M`` consecutive queries of one sequence and one query head, and reads keys only
up to its last query's position (causal block skipping) and, with a sliding window, only from
its first query's window start. Results are scattered straight to the queries' flat rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import mma, round_to

from kernels.triton.paged_decode_attention import dot_precision

__all__ = ["paged_prefill_attention"]


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, pages_ptr, k_len_ptr, token_index_ptr, valid_ptr, q_pos_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_kh, stride_kp, stride_ks, stride_pt, stride_qb,
    q_max, page_size, scale, soft_cap, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, USE_SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(2)
    kvh = h // GROUP
    in_range = m < q_max
    valid = tl.load(valid_ptr + b * stride_qb + m, mask=in_range, other=0) != 0
    tok = tl.load(token_index_ptr + b * stride_qb + m, mask=valid, other=0)
    qpos = tl.load(q_pos_ptr + b * stride_qb + m, mask=valid, other=0).to(tl.int32)
    k_len = tl.load(k_len_ptr + b).to(tl.int32)  # loop bounds in int32; page offsets stay int64
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    kv_dtype = k_ptr.dtype.element_ty
    q = tl.load(q_ptr + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=valid[:, None] & dmask[None, :], other=0.0).to(kv_dtype)
    # Keys past the block's last query are masked for every row of it: skip them.
    end = tl.minimum(tl.max(tl.where(valid, qpos, 0), axis=0) + 1, k_len)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(tl.min(tl.where(valid, qpos, k_len), axis=0) - window + 1, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < end
        page = tl.load(pages_ptr + b * stride_pt + n // page_size, mask=nmask, other=0)
        offs = kvh * stride_kh + page * stride_kp + (n % page_size) * stride_ks
        kvmask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=kvmask, other=0.0)
        s = mma(q, tl.trans(k), DOT_PRECISION) * scale
        if USE_SOFT_CAP:
            s = soft_cap * _tanh(s / soft_cap)
        allowed = nmask[None, :] & (n[None, :] <= qpos[:, None])
        if USE_WINDOW:
            allowed = allowed & (qpos[:, None] - n[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row with nothing allowed yet keeps m = -inf: shift by 0 instead (no inf - inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + mma(round_to(p, kv_dtype), v, DOT_PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=valid[:, None] & dmask[None, :])


def prefill_tiles(head_dim: int, q_max: int) -> tuple[int, int, int]:
    """(queries per block, keys per block, warps): without register spills on sm_80/sm_90 up to
    head_dim 128 (ptxas' resource usage, tests/unit/test_triton_compile.py); 256 spills a little
    at the smallest tile that still feeds the MMA."""
    if q_max <= 16:
        return 16, 32, 4
    if head_dim <= 64:
        return 64, 32, 8
    return 32, 32, 8


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    token_index: torch.Tensor,
    query_valid: torch.Tensor,
    q_pos: torch.Tensor,
    k_len: torch.Tensor,
    pages: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention for a prefill group (see the module docstring) of ``q [T, H, D]``.

    Writes the valid queries' rows of ``out`` (``[T, H, D]``, allocated when None); the KV of
    every query must already be in the cache.
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
    B, q_max = token_index.shape
    if B == 0:
        return out
    token_index, query_valid, q_pos = token_index.contiguous(), query_valid.contiguous(), q_pos.contiguous()
    block_m, block_n, warps = prefill_tiles(D, q_max)
    _paged_prefill_kernel[(B, triton.cdiv(q_max, block_m), H)](
        q, k_cache, v_cache, out, pages, k_len, token_index, query_valid.to(torch.int8), q_pos,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), pages.stride(0), token_index.stride(0),
        q_max, page_size, scale, soft_cap or 0.0, sliding_window or 0,
        GROUP=H // KVH, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_D=max(16, triton.next_power_of_2(D)),
        BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        USE_SOFT_CAP=soft_cap is not None, DOT_PRECISION=dot_precision(k_cache.dtype), num_warps=warps,
    )
    return out
