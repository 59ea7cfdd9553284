"""Rotary position embedding, neox style (rotate-half): PyTorch reference, Triton on CUDA."""

from __future__ import annotations

import torch

from kernels.backend import backend_for

__all__ = ["apply_rotary"]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, H, D]`` by per-token angles.

    ``cos``/``sin`` are ``[T, D/2]`` (one value per frequency) or ``[T, D]`` (the HF layout,
    the half table repeated twice). The first and second halves of each head form the
    (real, imaginary) pairs, as in GPT-NeoX and HF Llama. Returns a new tensor.
    """
    if (backend_for(x) == "triton" and x.dim() == 3 and cos.dim() == 2 and cos.shape[0] == sin.shape[0] == x.shape[0]
            and cos.dtype == x.dtype == sin.dtype):
        from kernels.triton.rotary import apply_rotary as triton_rotary

        return triton_rotary(x, cos, sin)
    half = x.shape[-1] // 2
    if cos.shape[-1] != half:
        cos = cos[..., :half]
        sin = sin[..., :half]
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    x1 = x[..., :half]
    x2 = x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
