"""Gated activations on a fused ``[T, 2I]`` gate/up projection (PyTorch reference;
Triton on CUDA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import backend_for

__all__ = ["silu_and_mul", "gelu_tanh_and_mul", "act_and_mul"]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` where ``x = [gate | up]`` along the last axis."""
    if backend_for(x) == "triton":
        from kernels.triton.activation import silu_and_mul as triton_silu_and_mul

        return triton_silu_and_mul(x)
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` where ``x = [gate | up]`` along the last axis."""
    if backend_for(x) == "triton":
        from kernels.triton.activation import gelu_tanh_and_mul as triton_gelu_tanh_and_mul

        return triton_gelu_tanh_and_mul(x)
    half = x.shape[-1] // 2
    return F.gelu(x[..., :half], approximate="tanh") * x[..., half:]


_GATED = {
    "silu": silu_and_mul,
    "swish": silu_and_mul,
    "gelu_pytorch_tanh": gelu_tanh_and_mul,
    "gelu_tanh": gelu_tanh_and_mul,
}


def act_and_mul(name: str):
    """The gated activation for an HF ``hidden_act`` name."""
    try:
        return _GATED[name]
    except KeyError:
        raise ValueError(f"unsupported hidden activation {name!r}; known: {sorted(_GATED)}") from None
