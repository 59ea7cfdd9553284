"""The int8 KV page format: symmetric int8 rows with their scale stored inline.

An int8 KV pool keeps the layout of the others, ``[2, kv_heads, num_pages, page_size, row]``,
but each row is ``head_dim`` int8 values followed by the row's fp32 scale (4 bytes, native byte
order): ``row = head_dim + 4``. One scale per (token, head) keeps the error of a row bounded by
its own range (keys have outlier channels that a per-page scale would spread over every token),
and keeping it inline means a page is still one self-describing block of bytes: everything that
moves pages (P/D hand-off, the kvstore tiers, preemption) moves the scales with them unchanged.
The decode kernel reads ``head_dim + 4`` bytes per row instead of ``2 * head_dim`` (bf16).

The quantizer here is the reference; ``rotary_write_kv_`` in ``kernels/csrc/fused_ops.cpp``
rounds the same way (scale = max|x| / 127, value = round-half-even(x / scale)).
"""

from __future__ import annotations

import torch

__all__ = ["KV_SCALE_BYTES", "kv_row_width", "kv_head_dim", "quantize_kv_rows", "dequantize_kv_rows"]

KV_SCALE_BYTES = 4  # one fp32 per row


def kv_row_width(head_dim: int, dtype: torch.dtype) -> int:
    """Elements in one stored K or V row: ``head_dim``, plus the inline scale for int8."""
    return head_dim + KV_SCALE_BYTES if dtype == torch.int8 else head_dim


def kv_head_dim(cache: torch.Tensor) -> int:
    """The model's head_dim behind a KV tensor whose last dim is the stored row."""
    return cache.shape[-1] - KV_SCALE_BYTES if cache.dtype == torch.int8 else cache.shape[-1]


def quantize_kv_rows(x: torch.Tensor) -> torch.Tensor:
    """``[..., D]`` floats -> ``[..., D + 4]`` int8 rows with their fp32 scale appended."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True) / 127.0
    q = torch.where(scale > 0, xf / scale, torch.zeros_like(xf)).round_().clamp_(-127, 127).to(torch.int8)
    return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)


def dequantize_kv_rows(rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[..., D + 4]`` int8 rows -> ``[..., D]`` values in ``dtype``."""
    if rows.dtype != torch.int8:
        raise ValueError(f"int8 KV rows expected, got {rows.dtype}")
    d = rows.shape[-1] - KV_SCALE_BYTES
    scale = rows[..., d:].contiguous().view(torch.float32)
    return (rows[..., :d].float() * scale).to(dtype)
