"""A batch's token masks as a bitmask, and applying it to the logits in one vectorised pass.

Torch only (the sampler imports it; the grammar engine that fills the bitmask lives in
:mod:`common.engine.grammar_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenMask", "apply_token_mask"]


@dataclass
class TokenMask:
    """Allowed tokens of some rows of a sampling batch: bit ``t`` of ``bitmask[i]`` allows token t in ``rows[i]``."""

    rows: list[int]
    bitmask: torch.Tensor  # int32 [len(rows), ceil(V / 32)], on CPU


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def _shifts(device: torch.device) -> torch.Tensor:
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(8, dtype=torch.uint8, device=device)
    return shifts


def apply_token_mask(logits: torch.Tensor, mask: TokenMask) -> None:
    """Set every disallowed token of the masked rows to -inf, in place, in one pass over the batch."""
    if not mask.rows:
        return
    batch, vocab = logits.shape
    device = logits.device
    # The int32 words as little-endian bytes: bit k of byte j is token 8*j + k, as in the words.
    # Unpacking bytes moves a quarter of the memory that unpacking int32 words would.
    packed = mask.bitmask.contiguous().view(torch.uint8).to(device, non_blocking=True)
    banned = ((packed.unsqueeze(-1) >> _shifts(device)) & 1).flatten(1) == 0  # [R, W*32]
    width = banned.shape[1]
    if width < vocab:  # tokens past the grammar's vocabulary are never allowed
        banned = torch.nn.functional.pad(banned, (0, vocab - width), value=True)
    elif width > vocab:
        banned = banned[:, :vocab]
    if len(mask.rows) == batch and mask.rows == list(range(batch)):
        logits.masked_fill_(banned, float("-inf"))  # every row is masked: no gather/scatter
        return
    index = torch.as_tensor(mask.rows, device=device)
    rows = logits.index_select(0, index)
    rows.masked_fill_(banned, float("-inf"))
    logits.index_copy_(0, index, rows)
