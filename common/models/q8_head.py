"""The LM head on a GGUF's own Q8_0 blocks, packed for the small-batch 8-bit kernel.

Small models store their token embedding (the tied LM head) or their ``output.weight`` as Q8_0:
exact values the int8 copy with one scale per row would round again. The loader reads the head's
blocks undequantized (``read_q8_rows``); here they are named for the ``lm_head`` module and packed
for ``kernels/csrc/q8_linear.cpp`` (``kernels.q8_pack``). Decoder linears stored as Q8_0 are left to
the int8 path: the head is the matrix that mattered (a quarter of a SmolLM2 decode step).
"""

from __future__ import annotations

import os

import torch

from kernels.q8_pack import Q8Rows, pack_q8

__all__ = ["q8_head_enabled", "head_source", "packed_q8_head"]

_HEAD = "lm_head"


def q8_head_enabled(dtype: torch.dtype) -> bool:
    """bf16 only (the 8-bit path stands in for the int8 one); ``XLLM_Q8_HEAD=0`` turns it off."""
    return dtype == torch.bfloat16 and os.environ.get("XLLM_Q8_HEAD", "1") != "0"


def head_source(tied: bool) -> str:
    """The HF name of the matrix the LM head multiplies by (a tied head is the embedding)."""
    return "model.embed_tokens.weight" if tied else "lm_head.weight"


def packed_q8_head(rows: dict[str, Q8Rows], tied: bool) -> dict[str, torch.Tensor]:
    """``{"lm_head": packed}`` when the head's matrix is among ``rows`` (by HF name), else empty."""
    matrix = rows.get(head_source(tied))
    return {} if matrix is None else {_HEAD: pack_q8(matrix)}
