"""Which HF projections this engine fuses into one linear: q/k/v into ``qkv_proj``, gate/up into
``gate_up_proj`` (one table for the dequantized weights and for a GGUF's 4-bit blocks)."""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["FusedPart", "fused_part"]

_FUSED_ATTN = re.compile(r"^(model\.layers\.\d+\.self_attn)\.(q|k|v)_proj\.(weight|bias)$")
_FUSED_MLP = re.compile(r"^(model\.layers\.\d+\.mlp)\.(gate|up)_proj\.(weight|bias)$")


class FusedPart(NamedTuple):
    target: str  # the fused tensor's name, e.g. model.layers.0.self_attn.qkv_proj.weight
    part: str  # q, k, v, gate or up
    order: tuple[str, ...]  # the parts in the fused tensor's row order


def fused_part(name: str) -> FusedPart | None:
    """Where HF tensor ``name`` goes in a fused projection; None when it is not fused."""
    m = _FUSED_ATTN.match(name) or _FUSED_MLP.match(name)
    if m is None:
        return None
    prefix, part, kind = m.groups()
    if part in ("q", "k", "v"):
        return FusedPart(f"{prefix}.qkv_proj.{kind}", part, ("q", "k", "v"))
    return FusedPart(f"{prefix}.gate_up_proj.{kind}", part, ("gate", "up"))
