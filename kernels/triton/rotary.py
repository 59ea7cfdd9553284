"""Neox-style (rotate-half) rotary embedding of ``x [T, H, D]`` by per-token ``cos``/``sin``.

Rounding follows ``kernels/rotary.py``: each product and the sum are rounded to the activation
dtype, as the PyTorch expression ``x1 * cos - x2 * sin`` does in bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import round_to

__all__ = ["apply_rotary"]


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, half, stride_xt, stride_xh, stride_ct, stride_st,
                   BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    cmask = cols < half
    mask = (heads[:, None] < n_heads) & cmask[None, :]
    c = tl.load(cos_ptr + t * stride_ct + cols, mask=cmask, other=0.0)
    s = tl.load(sin_ptr + t * stride_st + cols, mask=cmask, other=0.0)
    dtype = c.dtype
    c = c.to(tl.float32)[None, :]
    s = s.to(tl.float32)[None, :]
    src = x_ptr + t * stride_xt + heads[:, None] * stride_xh + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + half, mask=mask, other=0.0).to(tl.float32)
    # Round each product, then the sum, to the dtype: the reference's three bf16 ops.
    o1 = round_to(round_to(x1 * c, dtype).to(tl.float32) - round_to(x2 * s, dtype).to(tl.float32), dtype)
    o2 = round_to(round_to(x2 * c, dtype).to(tl.float32) + round_to(x1 * s, dtype).to(tl.float32), dtype)
    dst = out_ptr + t * n_heads * 2 * half + heads[:, None] * 2 * half + cols[None, :]
    tl.store(dst, o1, mask=mask)
    tl.store(dst + half, o2, mask=mask)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` (any strides with a unit last stride) by ``cos``/``sin`` ``[T, D/2]``
    or ``[T, D]`` (only the first half is read) in ``x``'s dtype; returns a new contiguous tensor."""
    T, H, D = x.shape
    half = D // 2
    if cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"apply_rotary: cos/sin dtype {cos.dtype} must match x {x.dtype}")
    if x.stride(2) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    out = torch.empty((T, H, D), dtype=x.dtype, device=x.device)
    if T == 0 or H == 0:
        return out
    block_h = min(triton.next_power_of_2(H), 16)
    _rotary_kernel[(T, triton.cdiv(H, block_h))](
        x, cos, sin, out, H, half, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4,
    )
    return out
