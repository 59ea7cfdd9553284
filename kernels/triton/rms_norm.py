"""RMSNorm and fused residual-add + RMSNorm, one program per row.

Rounding follows ``kernels/norm.py`` and ``add_rms_norm_`` in ``kernels/csrc/fused_ops.cpp``:
statistics in float32; Llama rounds the normalised value to the activation dtype and then
scales (the product rounded again), Gemma (``unit_offset``) scales by ``1 + w`` in float32; the
fused add rounds ``residual + x`` first and normalises that rounded sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import round_to

__all__ = ["rms_norm", "add_rms_norm_"]


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, inner, stride_outer, stride_inner, stride_res, n_cols, eps,
                     HAS_RES: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    # x may be a [T, H, C] view with a gap between rows (q/k heads inside a fused qkv output).
    x_row = x_ptr + (row // inner) * stride_outer + (row % inner) * stride_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_row + cols, mask=mask, other=0.0)
    dtype = x.dtype
    v = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        summed = round_to(r.to(tl.float32) + v, dtype)
        tl.store(res_ptr + row * stride_res + cols, summed, mask=mask)
        v = summed.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if UNIT_OFFSET:
        y = v * inv * (1.0 + w)
    else:
        y = w * round_to(v * inv, dtype).to(tl.float32)
    tl.store(out_ptr + row * n_cols + cols, round_to(y, dtype), mask=mask)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``x`` as rows of its last axis: (tensor, rows per outer index, outer stride, inner stride)."""
    if x.dim() == 3 and x.stride(2) == 1:
        return x, x.shape[1], x.stride(0), x.stride(1)
    x = x.reshape(-1, x.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x, 1, x.stride(0), 0


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
            unit_offset: bool) -> torch.Tensor:
    C = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rows_x, inner, s_outer, s_inner = _rows(x)
    n_rows = x.numel() // C
    if n_rows == 0:
        return out
    _rms_norm_kernel[(n_rows,)](
        rows_x, residual if residual is not None else rows_x, weight.contiguous(), out, inner, s_outer, s_inner,
        residual.stride(0) if residual is not None else 0, C, eps,
        HAS_RES=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=triton.next_power_of_2(C), num_warps=4 if C <= 4096 else 8,
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """``rms_norm`` of ``x [..., C]`` (same semantics as ``kernels.norm.rms_norm``); a new tensor."""
    return _launch(x, None, weight, eps, unit_offset)


def add_rms_norm_(residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, eps: float,
                  unit_offset: bool = False) -> torch.Tensor:
    """``residual += x`` in place (rounded to its dtype) and return the norm of the sum.

    ``residual`` must be a contiguous ``[T, C]``; ``x`` None just normalises ``residual``.
    """
    if not residual.is_contiguous():
        raise ValueError("add_rms_norm_: residual must be contiguous (it is updated in place)")
    if x is None:
        return _launch(residual, None, weight, eps, unit_offset)
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm_: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    return _launch(x.to(residual.dtype), residual.view(-1, residual.shape[-1]), weight, eps, unit_offset)
