"""Which linears of a model run on a GGUF's own 4-bit blocks, and those blocks packed for them.

The loader reads a file's Q4_0 / Q4_1 matrices undequantized (``read_q4_rows``); here they are named
and fused like the dequantized weights (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``) and
packed for the C++ kernel (``kernels.q4_pack``). A fused projection gets 4-bit blocks only when every
part of it has them (a file may store ``attn_v`` at higher precision than ``attn_q``).
"""

from __future__ import annotations

import os

import torch

from common.models.fused_projections import fused_part
from kernels.q4_pack import Q4Rows, pack_q4

__all__ = ["q4_decode_enabled", "packed_q4_linears"]


def q4_decode_enabled(dtype: torch.dtype) -> bool:
    """bf16 only (the 4-bit path stands in for the int8 one); ``XLLM_Q4_DECODE=0`` turns it off."""
    return dtype == torch.bfloat16 and os.environ.get("XLLM_Q4_DECODE", "1") != "0"


def packed_q4_linears(rows: dict[str, Q4Rows]) -> dict[str, torch.Tensor]:
    """Packed 4-bit weights by linear module name (``model.layers.0.self_attn.qkv_proj``...)."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, tuple[tuple[str, ...], dict[str, Q4Rows]]] = {}
    for name, matrix in rows.items():
        if name == "model.embed_tokens.weight":
            continue  # an embedding is looked up, not multiplied (a tied head keeps its int8 copy)
        where = fused_part(name)
        if where is None:
            out[name.removesuffix(".weight")] = pack_q4(matrix)
        else:
            groups.setdefault(where.target, (where.order, {}))[1][where.part] = matrix
    for target, (order, parts) in groups.items():
        if all(p in parts for p in order):
            out[target.removesuffix(".weight")] = pack_q4(Q4Rows.cat([parts[p] for p in order]))
    return out
