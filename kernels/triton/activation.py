"""Gated activations on a fused ``[..., 2I]`` gate/up projection: ``act(gate) * up``.

Rounding follows ``kernels/activation.py``: the activation is rounded to the dtype, then the
product. ``silu`` and ``gelu_tanh`` share one kernel (a constexpr picks the activation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import round_to

__all__ = ["silu_and_mul", "gelu_tanh_and_mul"]

_SILU, _GELU_TANH = 0, 1


@triton.jit
def _act_and_mul_kernel(x_ptr, out_ptr, inter, stride_x, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0)
    dtype = g.dtype
    gf = g.to(tl.float32)
    if ACT == 0:
        a = gf / (1.0 + tl.exp(-gf))
    else:
        # gelu(x, tanh) = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), spelled as PyTorch computes it
        # (1 + tanh, which is 0 far out on the negative side) rather than the exact 2 sigmoid(2z).
        # Clamped: tanh is already -1 in float32 there, and exp(-2z) stays finite.
        z = tl.maximum(0.7978845608028654 * (gf + 0.044715 * gf * gf * gf), -40.0)
        a = 0.5 * gf * (1.0 + (2.0 * tl.sigmoid(2.0 * z) - 1.0))
    out = round_to(a, dtype).to(tl.float32) * u.to(tl.float32)
    tl.store(out_ptr + row * inter + cols, round_to(out, dtype), mask=mask)


def _act_and_mul(x: torch.Tensor, act: int) -> torch.Tensor:
    inter = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * inter)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty((*x.shape[:-1], inter), dtype=x.dtype, device=x.device)
    if rows.shape[0] == 0 or inter == 0:
        return out
    block = min(triton.next_power_of_2(inter), 1024)
    _act_and_mul_kernel[(rows.shape[0], triton.cdiv(inter, block))](
        rows, out, inter, rows.stride(0), ACT=act, BLOCK=block, num_warps=4,
    )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` along the last axis."""
    return _act_and_mul(x, _SILU)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` where ``x = [gate | up]`` along the last axis."""
    return _act_and_mul(x, _GELU_TANH)
