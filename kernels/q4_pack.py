"""4-bit weights straight from a GGUF's Q4_0 / Q4_1 blocks, for the small-batch linear.

A GGUF's 4-bit blocks are the model's exact weights: every 32 weights of a row share an fp16
scale ``d`` and offset ``m``, and ``w = d * q + m`` with ``q`` in 0..15 (Q4_0 stores no offset and
centres ``q`` on 8: ``m = -8 d``). Decoding at batch 1 streams every weight once per token, so
reading these 0.625 bytes per weight instead of an int8 copy's 1 byte is the single-stream
speed-up; and since they are the source's own values, nothing is rounded again.

:class:`Q4Rows` holds a matrix in ggml's block layout, split into its three arrays, so the
loader can permute and concatenate rows exactly as it does the dequantized weights (llama.cpp's
q/k row permutation, q/k/v and gate/up fusion). :func:`pack_q4` repacks it into the C++ kernel's
layout (``kernels/csrc/q4_linear.cpp`` explains it); :func:`q4_linear_reference` is the PyTorch
reference of the kernel's arithmetic, activation quantization included.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Q4Rows", "pack_q4", "q4_linear_reference", "quantize_activation_blocks", "TILE_ROWS", "BLOCK",
           "PACKED_BLOCK_BYTES"]

TILE_ROWS = 16  # output rows per tile of the packed layout (one int32 lane each)
BLOCK = 32  # weights per block: one scale and offset each
PACKED_BLOCK_BYTES = 2 * TILE_ROWS * 2 + TILE_ROWS * BLOCK // 2  # a tile's block: fp16 d and m, nibbles (320)
_BLOCK = BLOCK
_Q4_0, _Q4_1 = "Q4_0", "Q4_1"
_BLOCK_BYTES = {_Q4_0: 18, _Q4_1: 20}


@dataclass
class Q4Rows:
    """An ``[N, K]`` 4-bit matrix as ggml stores it: ``qs [N, K/2]`` uint8 (per block, byte j holds
    weight j in its low nibble and j + 16 in its high one), ``d`` and ``m`` ``[N, K/32]`` fp16."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.qs.shape[1] * 2

    @classmethod
    def from_ggml(cls, raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> Q4Rows:
        """From a tensor's raw bytes (``type_name`` Q4_0 or Q4_1, ``shape`` ``[N, K]``)."""
        n, k = shape
        if type_name not in _BLOCK_BYTES or k % _BLOCK:
            raise ValueError(f"not a Q4_0/Q4_1 matrix with K % 32 == 0: {type_name} {shape}")
        blocks = np.ascontiguousarray(raw).reshape(-1).view(np.uint8).reshape(n, k // _BLOCK, _BLOCK_BYTES[type_name])
        d = torch.from_numpy(blocks[:, :, 0:2].copy().view(np.float16).reshape(n, -1))
        if type_name == _Q4_1:
            m = torch.from_numpy(blocks[:, :, 2:4].copy().view(np.float16).reshape(n, -1))
            qs = blocks[:, :, 4:]
        else:
            m = d * -8.0  # exact in fp16: a power-of-two scaling
            qs = blocks[:, :, 2:]
        return cls(torch.from_numpy(qs.copy().reshape(n, k // 2)), d.contiguous(), m.contiguous())

    def select_rows(self, index: torch.Tensor | np.ndarray) -> Q4Rows:
        index = torch.as_tensor(index, dtype=torch.long)
        return Q4Rows(self.qs[index].contiguous(), self.d[index].contiguous(), self.m[index].contiguous())

    @staticmethod
    def cat(parts: list[Q4Rows]) -> Q4Rows:
        return Q4Rows(torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), torch.cat([p.m for p in parts]))

    def nibbles(self) -> torch.Tensor:
        """``[N, K]`` uint8 values 0..15 in weight order."""
        n, k = self.shape
        qs = self.qs.view(n, k // _BLOCK, 16)
        return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, k)

    def dequantize(self) -> torch.Tensor:
        """``[N, K]`` float32: ``d * q + m`` per block."""
        n, k = self.shape
        q = self.nibbles().view(n, k // _BLOCK, _BLOCK).float()
        return (q * self.d.float()[..., None] + self.m.float()[..., None]).reshape(n, k)


def pack_q4(rows: Q4Rows) -> torch.Tensor:
    """The C++ kernel's layout: ``[ceil(N/16), K/32, 320]`` uint8; per tile and block, 16 fp16
    scales, 16 fp16 offsets, then 4 chunks of 64 bytes where byte ``4 i + j`` of chunk ``c`` holds row
    ``i``'s weight ``8 c + j`` (low nibble) and ``8 c + 4 + j`` (high nibble). Rows past N are zero."""
    n, k = rows.shape
    tiles, blocks = -(-n // TILE_ROWS), k // _BLOCK
    pad = tiles * TILE_ROWS - n
    q, d, m = rows.nibbles(), rows.d, rows.m
    if pad:
        q = torch.cat([q, q.new_zeros(pad, k)])
        d = torch.cat([d, d.new_zeros(pad, blocks)])
        m = torch.cat([m, m.new_zeros(pad, blocks)])
    # k = 32 b + 8 c + 4 h + j; rows i of tile t
    q = q.view(tiles, TILE_ROWS, blocks, 4, 2, 4)
    nib = (q[:, :, :, :, 0, :] | (q[:, :, :, :, 1, :] << 4)).permute(0, 2, 3, 1, 4)  # [t, b, c, i, j]
    scales = d.view(tiles, TILE_ROWS, blocks).permute(0, 2, 1).contiguous().view(torch.uint8)
    offsets = m.view(tiles, TILE_ROWS, blocks).permute(0, 2, 1).contiguous().view(torch.uint8)
    return torch.cat([scales, offsets, nib.reshape(tiles, blocks, 256)], dim=2).contiguous()


def quantize_activation_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per 32 values (llama.cpp's Q8 activations): ``(q [M, K] float, scale [M, K/32])``."""
    m, k = x.shape
    xb = x.float().view(m, k // _BLOCK, _BLOCK)
    scale = xb.abs().amax(dim=2) / 127.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.round(xb * inv[..., None]).view(m, k), scale


def q4_linear_reference(x: torch.Tensor, rows: Q4Rows, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What the kernel computes, in PyTorch: int8 block activations against the exact 4-bit weights."""
    n, k = rows.shape
    xq, xs = quantize_activation_blocks(x)
    blocks = k // _BLOCK
    q = rows.nibbles().view(n, blocks, _BLOCK).float()
    # per block: d_w * d_x * (q_w . q_x) + m_w * d_x * sum(q_x)
    dots = torch.einsum("nbj,mbj->mnb", q, xq.view(-1, blocks, _BLOCK))
    sums = xq.view(-1, blocks, _BLOCK).sum(dim=2) * xs  # [M, B]
    out = (dots * rows.d.float()[None] * xs[:, None, :]).sum(-1) + sums @ rows.m.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
