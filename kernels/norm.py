"""RMSNorm (PyTorch reference)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    """Normalise ``x`` over its last axis by its root mean square and scale by ``weight``.

    ``unit_offset`` selects Gemma's convention, where the learned scale is ``1 + weight``.
    The statistics are always taken in float32 so bfloat16 activations keep their accuracy.
    """
    if x.dtype == torch.float32:
        scale = weight + 1.0 if unit_offset else weight
        return F.rms_norm(x, (x.shape[-1],), scale, eps)
    if unit_offset:
        # Gemma multiplies in float32 before rounding: (x_hat * (1 + w)).to(dtype)
        out = F.rms_norm(x.float(), (x.shape[-1],), weight.float() + 1.0, eps)
        return out.to(x.dtype)
    # Llama rounds the normalised activations first, then scales: w * x_hat.to(dtype)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)
