"""RMSNorm: the PyTorch reference, dispatched to Triton on CUDA and torch_npu on Ascend."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import backend_for, torch_npu_module

__all__ = ["rms_norm", "add_rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Normalise ``x`` over its last axis by its root mean square and scale by ``weight``.

    ``unit_offset`` selects Gemma's convention, where the learned scale is ``1 + weight``.
    The statistics are always taken in float32 so bfloat16 activations keep their accuracy.
    """
    backend = backend_for(x)
    if backend == "triton" and weight.dtype == x.dtype:
        from kernels.triton.rms_norm import rms_norm as triton_rms_norm

        return triton_rms_norm(x, weight, eps, unit_offset)
    if backend == "npu" and weight.dtype == x.dtype:
        gamma = weight + 1.0 if unit_offset else weight
        return torch_npu_module().npu_rms_norm(x, gamma, epsilon=eps)[0]
    if x.dtype == torch.float32:
        scale = weight + 1.0 if unit_offset else weight
        return F.rms_norm(x, (x.shape[-1],), scale, eps)
    if unit_offset:
        # Gemma multiplies in float32 before rounding: (x_hat * (1 + w)).to(dtype)
        out = F.rms_norm(x.float(), (x.shape[-1],), weight.float() + 1.0, eps)
        return out.to(x.dtype)
    # Llama rounds the normalised activations first, then scales: w * x_hat.to(dtype)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 unit_offset: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + x, rms_norm(residual + x))``; ``x`` None normalises ``residual`` alone.

    The Triton kernel does both in one pass and updates a contiguous ``residual`` in place, as
    ``add_rms_norm_`` in ``kernels/csrc/fused_ops.cpp`` does on the CPU: callers must not read
    the old residual afterwards.
    """
    if backend_for(residual) == "triton" and residual.is_contiguous() and weight.dtype == residual.dtype:
        from kernels.triton.rms_norm import add_rms_norm_

        return residual, add_rms_norm_(residual, x, weight, eps, unit_offset)
    if x is not None:
        residual = residual + x
    return residual, rms_norm(residual, weight, eps, unit_offset)
