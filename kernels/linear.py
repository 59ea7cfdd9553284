"""Linear layers with weights prepacked for oneDNN (the path Inductor's ``freezing`` takes on CPU).

At batch 1 every small matmul is dispatch-bound and at large batches bf16 GEMMs are
memory-bound; a weight reordered once into oneDNN's blocked layout saves the per-call
reorder that ``F.linear`` pays, which is worth ~1.3-2x on the model's shapes. The result is
bit-identical to ``F.linear`` in the same dtype.

Optionally a layer also keeps a weight-only int8 copy (one fp32 scale per output row) for
small batches: a decode step with a few rows is a pass over every weight, bounded by memory
bandwidth, and int8 halves the bytes of bf16 (C++ kernel ``int8_linear``). Large batches are
compute-bound and stay on the bf16 oneDNN GEMM. Both copies are kept: the weights are small
next to what the speed is worth. int8 is opt-in (see ``pack_linears``), never used for fp32.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from kernels.cpu_ext import cpu_ops_module

logger = logging.getLogger(__name__)

__all__ = ["PackedLinear", "packed_linear_supported", "pack_linears", "quantize_int8_rows"]

# Up to this many rows the int8 weight pass beats the bf16 GEMM on AVX-512 CPUs (measured:
# 1-4 rows int8 is ~1.5-2x faster; from ~8 rows oneDNN's bf16 dot-product GEMM wins).
DEFAULT_INT8_MAX_ROWS = 4


def packed_linear_supported(dtype: torch.dtype) -> bool:
    """Whether oneDNN can run prepacked linears in ``dtype`` on this CPU."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ~= q * scale[:, None]``; returns (q int8, scale fp32)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows: any scale works
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class PackedLinear(nn.Module):
    """Drop-in for a bf16 ``nn.Linear`` on CPU; keeps the plain weight for code that reads it.

    With ``int8_max_rows > 0`` (and the C++ kernels built) inputs of at most that many rows run
    on an int8 copy of the weight instead of the bf16 GEMM.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, int8_max_rows: int = 0) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer(
            "bias", None if linear.bias is None else linear.bias.detach(), persistent=False
        )
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self._ext = cpu_ops_module() if int8_max_rows > 0 else None
        self.int8_max_rows = int8_max_rows if self._ext is not None else 0
        if self.int8_max_rows:
            self._q, self._scale = quantize_int8_rows(weight)
            self._bias_f32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.int8_max_rows:
            out = self._ext.int8_linear(x2, self._q, self._scale, self._bias_f32)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self.bias, "none", [], "")
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN, "
                f"int8_max_rows={self.int8_max_rows}")


def pack_linears(module: nn.Module, int8_max_rows: int = 0) -> int:
    """Replace every CPU bf16 ``nn.Linear`` under ``module`` by a :class:`PackedLinear`; returns the count.

    ``int8_max_rows > 0`` also gives each layer an int8 weight copy used up to that many rows.
    """
    if not packed_linear_supported(torch.bfloat16):
        return 0
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
            setattr(module, name, PackedLinear(child, int8_max_rows=int8_max_rows))
            count += 1
        else:
            count += pack_linears(child, int8_max_rows)
    return count
