"""8-bit weights straight from a GGUF's Q8_0 blocks, for the small-batch linear (the LM head).

A GGUF's Q8_0 blocks are the model's exact weights: every 32 weights of a row share an fp16 scale
``d`` and ``w = d * q`` with ``q`` int8. Small models store their token embedding, the tied LM
head, this way (SmolLM2-135M: 49152 x 576, the largest matrix of the model). Multiplying these
blocks by activations quantized per 32 values (llama.cpp's Q8_0 x Q8_0 dot) reads the file's own
values, where the int8 copy with one scale per row rounds them once more.

:class:`Q8Rows` holds a matrix in ggml's block layout, split into its two arrays, so the loader can
select rows as it does for the 4-bit blocks (``kernels.q4_pack``). :func:`pack_q8` repacks it into
the C++ kernel's layout (``kernels/csrc/q8_linear.cpp`` explains it); :func:`q8_linear_reference`
is the PyTorch reference of the kernel's arithmetic, activation quantization included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.q4_pack import BLOCK, TILE_ROWS, quantize_activation_blocks

__all__ = ["Q8Rows", "pack_q8", "unpack_q8", "q8_linear_reference", "Q8_PACKED_BLOCK_BYTES"]

_GGML_BLOCK_BYTES = 2 + BLOCK  # Q8_0: fp16 d, then 32 int8
_CHUNK = 4  # consecutive weights of one row per int32 lane (dpbusd's operand)
Q8_PACKED_BLOCK_BYTES = TILE_ROWS * 2 + TILE_ROWS * BLOCK  # a tile's block: 16 fp16 d, 512 weights (544)


@dataclass
class Q8Rows:
    """An ``[N, K]`` Q8_0 matrix as ggml stores it: ``qs [N, K]`` int8 and ``d [N, K/32]`` fp16."""

    qs: torch.Tensor
    d: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1]

    @classmethod
    def from_ggml(cls, raw: np.ndarray, shape: tuple[int, int]) -> Q8Rows:
        """From a Q8_0 tensor's raw bytes (``shape`` ``[N, K]``, 34-byte blocks: fp16 d, 32 int8)."""
        n, k = shape
        if k % BLOCK:
            raise ValueError(f"not a Q8_0 matrix with K % 32 == 0: {shape}")
        flat = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        if flat.size != n * (k // BLOCK) * _GGML_BLOCK_BYTES:
            raise ValueError(f"{flat.size} bytes are not a Q8_0 matrix of shape {shape}")
        blocks = flat.reshape(n, k // BLOCK, _GGML_BLOCK_BYTES)
        d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(n, -1))
        qs = torch.from_numpy(blocks[:, :, 2:].copy().view(np.int8).reshape(n, k))
        return cls(qs, d.contiguous())

    def select_rows(self, index: torch.Tensor | np.ndarray) -> Q8Rows:
        index = torch.as_tensor(index, dtype=torch.long)
        return Q8Rows(self.qs[index].contiguous(), self.d[index].contiguous())

    def dequantize(self) -> torch.Tensor:
        """``[N, K]`` float32: ``d * q`` per block."""
        n, k = self.shape
        q = self.qs.view(n, k // BLOCK, BLOCK).float()
        return (q * self.d.float()[..., None]).reshape(n, k)


def pack_q8(rows: Q8Rows) -> torch.Tensor:
    """The C++ kernel's layout: ``[ceil(N/16), K/32, 544]`` uint8; per tile and block, 16 fp16
    scales, then 8 chunks of 64 bytes where byte ``4 i + j`` of chunk ``c`` is row ``i``'s weight
    ``4 c + j`` plus 128 (dpbusd multiplies unsigned by signed bytes). Rows past N are zero
    (weights 128, scales 0)."""
    n, k = rows.shape
    tiles, blocks = -(-n // TILE_ROWS), k // BLOCK
    pad = tiles * TILE_ROWS - n
    q, d = rows.qs, rows.d
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d = torch.cat([d, d.new_zeros(pad, blocks)])
    unsigned = (q.to(torch.int16) + 128).to(torch.uint8)
    # k = 32 b + 4 c + j; rows i of tile t -> [t, b, c, i, j]
    weights = unsigned.view(tiles, TILE_ROWS, blocks, BLOCK // _CHUNK, _CHUNK).permute(0, 2, 3, 1, 4)
    scales = d.view(tiles, TILE_ROWS, blocks).permute(0, 2, 1).contiguous().view(torch.uint8)
    return torch.cat([scales, weights.reshape(tiles, blocks, TILE_ROWS * BLOCK)], dim=2).contiguous()


def unpack_q8(packed: torch.Tensor, n: int) -> Q8Rows:
    """The inverse of :func:`pack_q8` for the first ``n`` rows (tests and inspection)."""
    tiles, blocks, width = packed.shape
    if width != Q8_PACKED_BLOCK_BYTES or not 0 < n <= tiles * TILE_ROWS:
        raise ValueError(f"packed Q8 weights {tuple(packed.shape)} do not hold {n} rows")
    scales = packed[:, :, : 2 * TILE_ROWS].contiguous().view(torch.float16)  # [t, b, i]
    d = scales.permute(0, 2, 1).reshape(tiles * TILE_ROWS, blocks)
    weights = packed[:, :, 2 * TILE_ROWS:].reshape(tiles, blocks, BLOCK // _CHUNK, TILE_ROWS, _CHUNK)
    q = (weights.permute(0, 3, 1, 2, 4).reshape(tiles * TILE_ROWS, blocks * BLOCK).to(torch.int16) - 128)
    return Q8Rows(q.to(torch.int8)[:n].contiguous(), d[:n].contiguous())


def q8_linear_reference(x: torch.Tensor, rows: Q8Rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch: int8 block activations against the exact Q8_0 weights,
    ``sum over blocks of d_w * d_x * (q_w . q_x)`` (+ bias), in ``x``'s dtype."""
    n, k = rows.shape
    blocks = k // BLOCK
    xq, xs = quantize_activation_blocks(x)
    # Integer dots are exact in fp64 (|q_w . q_x| <= 32 * 128 * 127), as the kernel's int32 ones.
    dots = torch.einsum("nbj,mbj->mnb", rows.qs.view(n, blocks, BLOCK).double(), xq.view(-1, blocks, BLOCK).double())
    out = (dots.float() * rows.d.float()[None] * xs[:, None, :]).sum(-1)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
