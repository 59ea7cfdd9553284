"""The W8A8 GEMM's weight layout (``kernels/csrc/int8_gemm.cpp``).

An int8 weight ``[N, K]`` becomes tiles of 16 output columns; inside a tile, each group of 4
input channels holds the 16 columns' 4 weights side by side: 64 bytes, one operand of AVX512-VNNI's
``vpdpbusd`` against 4 broadcast activation bytes. The bytes are stored + 128 (unsigned), because
that instruction multiplies unsigned bytes by signed ones; the kernel takes the offset back off, so
its int32 result equals ``torch._int_mm(x, w.t())`` exactly.
"""

from __future__ import annotations

import torch

__all__ = ["TILE_COLUMNS", "GROUP", "pack_int8_gemm", "unpack_int8_gemm"]

TILE_COLUMNS = 16  # output columns per tile (one int32 lane each)
GROUP = 4  # input channels per dot product (one int32 lane's 4 bytes)
_SIGN_BITS = -0x7F7F7F80  # 0x80808080 as an int32


def pack_int8_gemm(q: torch.Tensor) -> torch.Tensor:
    """``q`` int8 ``[N, K]`` (K a multiple of 4) -> uint8 ``[ceil(N / 16), K / 4, 64]``; the columns
    past N are zero weights."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.shape[1] % GROUP:
        raise ValueError(f"pack_int8_gemm wants int8 [N, K] with K a multiple of {GROUP}, got "
                         f"{q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    tiles = -(-n // TILE_COLUMNS)
    if n % TILE_COLUMNS:
        q = torch.cat([q, q.new_zeros(tiles * TILE_COLUMNS - n, k)])
    # A group's 4 bytes move together: shuffle them as int32 (4x fewer elements to move), and
    # flip each byte's sign bit (+128) in the same word.
    words = q.contiguous().view(torch.int32).view(tiles, TILE_COLUMNS, k // GROUP).transpose(1, 2).contiguous()
    words ^= _SIGN_BITS
    return words.view(torch.uint8).view(tiles, k // GROUP, TILE_COLUMNS * GROUP)


def unpack_int8_gemm(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The int8 ``[N, K]`` weight :func:`pack_int8_gemm` packed."""
    tiles, groups, _ = packed.shape
    q = (packed ^ 0x80).view(torch.int8).view(tiles, groups, TILE_COLUMNS, GROUP).permute(0, 2, 1, 3)
    return q.reshape(tiles * TILE_COLUMNS, groups * GROUP)[:n].contiguous()
