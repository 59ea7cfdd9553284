"""Linear layers with weights prepacked for oneDNN (the path Inductor's ``freezing`` takes on CPU).

At batch 1 every small matmul is dispatch-bound and at large batches bf16 GEMMs are
memory-bound; a weight reordered once into oneDNN's blocked layout saves the per-call
reorder that ``F.linear`` pays, which is worth ~1.3-2x on the model's shapes. The result is
bit-identical to ``F.linear`` in the same dtype.

Optionally a layer also keeps an int8 copy of its weight (one fp32 scale per output row):

* small batches (``int8_max_rows``) run weight-only int8 (C++ kernel ``int8_linear``): a decode
  step with a few rows is a pass over every weight, bounded by memory bandwidth, and int8
  halves the bytes of bf16;
* larger batches, with ``w8a8``, quantize the activations too (per row, symmetric) and run an
  int8 GEMM: VNNI's int8 dot products do twice the work per instruction of AVX512-BF16's. The
  GEMM is ``kernels/csrc/int8_gemm.cpp`` on weights packed once (``kernels.int8_pack``), with
  the dequantization fused into its store; without AVX512-VNNI, ``torch._int_mm`` (oneDNN),
  which gives the same int32 sums. At 64 rows on SmolLM2 (every layer and the LM head, weights
  from DRAM) the packed kernel takes 10.6 ms to oneDNN's 18: oneDNN reorders the weight per call.

Per-row activation scales alone lose to the few outlier channels every LLM has (measured on
SmolLM2: KL to fp32 0.052 vs 0.0015 for bf16). :meth:`PackedLinear.smooth` applies SmoothQuant
(Xiao et al., 2023): channel ``j`` of the activations is divided by ``s_j`` and column ``j`` of
the int8 GEMM's weight multiplied by it, ``s_j = sqrt(max|x_j| / max|w_j|)`` from calibration
statistics, which moves the outliers' range into the weights (KL 0.020). The division is fused
into the activation quantization, so it costs nothing at run time.

Both copies are kept: the weights are small next to what the speed is worth. int8 is opt-in
(see ``pack_linears``), never used for fp32.

A layer loaded from a GGUF's Q4_0/Q4_1 blocks may also keep those, packed (``kernels.q4_pack``): then
its small batches run the 4-bit kernel instead of the int8 one (0.625 bytes per weight against 1,
and the file's exact weights; the activations are quantized per 32 values as llama.cpp does). The
LM head of a GGUF that stores it as Q8_0 likewise keeps those blocks (``kernels.q8_pack``): the 8-bit
kernel's integer block dots beat both the int8 weight pass and the W8A8 GEMM up to ``Q8_MAX_ROWS``.

Inside :func:`bf16_gemms` the W8A8 layers take their bf16 GEMM instead: the engine runs prompt
processing there, because a prompt's KV is read by every later token and per-row activation
scales cost it the most accuracy. Not every layer's do: teacher-forced on SmolLM2 (``xllm bench
quality``'s text, KL from fp32), bf16 prompts score 0.0014, W8A8 on every prompt GEMM 0.0158, on
``gate_up_proj`` alone 0.0041 (the 4-bit decode path's own: 0.0043), ``o_proj`` alone 0.0020, both
0.0047, ``down_proj`` (the gated product's outliers) alone +0.0076. Layers marked
:attr:`PackedLinear.w8a8_in_prompts` (:func:`mark_prompt_w8a8`, the engine's
``--prompt-w8a8-layers``) keep W8A8 inside bf16_gemms.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import nn

from kernels.cpu_ext import cpu_ops_module
from kernels.int8_pack import GROUP, pack_int8_gemm, unpack_int8_gemm
from kernels.q4_pack import BLOCK, PACKED_BLOCK_BYTES, TILE_ROWS
from kernels.q8_pack import Q8_PACKED_BLOCK_BYTES

logger = logging.getLogger(__name__)

__all__ = ["PackedLinear", "packed_linear_supported", "pack_linears", "quantize_int8_rows", "w8a8_silu_mlp",
           "bf16_gemms", "mark_prompt_w8a8"]

# Up to this many rows the int8 weight pass beats the bf16 GEMM on AVX-512 CPUs (measured:
# 1-4 rows int8 is ~1.5-2x faster; from ~8 rows oneDNN's bf16 dot-product GEMM wins).
DEFAULT_INT8_MAX_ROWS = 4
# Up to this many rows a layer with 4-bit blocks runs the 4-bit kernel (its per-row arithmetic
# does not depend on the batch, so a speculative verify of a few rows computes what plain decoding
# does); inside bf16_gemms (a batch with prompt tokens) only up to int8_max_rows, as the int8 path.
Q4_MAX_ROWS = 16
# The same for a layer with Q8_0 blocks (the LM head). Measured on SmolLM2's head (49152 x 576, 2
# threads, AVX512-VNNI): 2.3x int8_linear at 1 row, 1.8x at 4; 2.2x the W8A8 GEMM at 8 rows, 1.6x
# at 16, 1.3x at 32, 1.1x at 48, slower at 64 (the kernel is compute bound past a few rows, the
# GEMM amortizes better).
Q8_MAX_ROWS = 32
# Packed block layouts a layer may keep, by int8_state key: (bytes per tile and 32-weight block, name).
_BLOCK_LAYOUTS = {"q4": (PACKED_BLOCK_BYTES, "4-bit"), "q8": (Q8_PACKED_BLOCK_BYTES, "Q8_0")}


_w8a8_suspended = 0  # > 0 inside bf16_gemms(); one engine thread runs the model, so no lock


@contextlib.contextmanager
def bf16_gemms(active: bool = True) -> Iterator[None]:
    """While inside (and ``active``), inputs past the small-batch rows run the bf16 GEMM, not W8A8."""
    global _w8a8_suspended
    _w8a8_suspended += int(active)
    try:
        yield
    finally:
        _w8a8_suspended -= int(active)


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
    on an int8 copy of the weight instead of the bf16 GEMM; with ``w8a8`` every larger input
    runs as an int8 GEMM on per-row quantized activations.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1, int8_max_rows: int = 0, w8a8: bool = False,
                 int8_state: dict[str, torch.Tensor] | None = None, q4: torch.Tensor | None = None,
                 q8: torch.Tensor | None = None) -> None:
        """``int8_state`` (from :meth:`int8_state`, e.g. a weight cache) replaces quantizing and
        smoothing the weight again: the same tensors, so bit-identical results. ``q4``: this
        weight's 4-bit blocks packed by :func:`kernels.q4_pack.pack_q4`, for the small batches;
        ``q8``: its Q8_0 blocks packed by :func:`kernels.q8_pack.pack_q8`, likewise."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.register_buffer("weight", weight, persistent=False)
        self.register_buffer(
            "bias", None if linear.bias is None else linear.bias.detach(), persistent=False
        )
        self._packed = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self._ext = cpu_ops_module() if int8_max_rows > 0 or w8a8 else None
        self.int8_max_rows = int8_max_rows if self._ext is not None else 0
        self.w8a8 = w8a8 and self._ext is not None
        self._q4: torch.Tensor | None = None
        self._q8: torch.Tensor | None = None
        self.w8a8_in_prompts = False  # W8A8 inside bf16_gemms too (mark_prompt_w8a8)
        if self.int8_max_rows or self.w8a8:
            if q4 is not None:
                self._check_blocks(q4, "q4")
                self._q4 = q4
            if q8 is not None:
                self._check_blocks(q8, "q8")
                self._q8 = q8
            if int8_state is not None:
                self.load_int8_state(int8_state)
            else:
                self._q, self._scale = quantize_int8_rows(weight)
                # The GEMM's weight starts as the same int8 rows (a copy of its own once smoothed).
                self._set_gemm_weight(self._q, self._scale)
                self._inv_smooth: torch.Tensor | None = None
            self._bias_f32 = None if self.bias is None else self.bias.float()

    def int8_state(self) -> dict[str, torch.Tensor]:
        """The int8 copies and scales (after smoothing), for :meth:`load_int8_state`; empty when
        this layer has none. The GEMM weight is stored ``[N, K]`` (contiguous)."""
        if not (self.int8_max_rows or self.w8a8):
            return {}
        state = {"q": self._q, "scale": self._scale}
        if self._q4 is not None:
            state["q4"] = self._q4
        if self._q8 is not None:
            state["q8"] = self._q8
        if self._gemm_rows is None or self._gemm_rows.data_ptr() != self._q.data_ptr():  # smoothed: its own
            state["gemm_q"] = self._gemm_q.t().contiguous()
            state["gemm_scale"] = self._gemm_scale
        if self._inv_smooth is not None:
            state["inv_smooth"] = self._inv_smooth
        return state

    def load_int8_state(self, state: dict[str, torch.Tensor]) -> None:
        """Adopt tensors from :meth:`int8_state` (shapes checked: a mismatch is a ValueError)."""
        n, k = self.out_features, self.in_features
        expected = {"q": ((n, k), torch.int8), "scale": ((n,), torch.float32), "gemm_q": ((n, k), torch.int8),
                    "gemm_scale": ((n,), torch.float32), "inv_smooth": ((k,), torch.float32)}
        for name, tensor in state.items():
            if name in _BLOCK_LAYOUTS:
                self._check_blocks(tensor, name)
                continue
            shape, dtype = expected.get(name, (None, None))
            if shape is None or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise ValueError(f"int8 state {name!r} does not fit a {n}x{k} layer")
        if "q" not in state or "scale" not in state:
            raise ValueError("int8 state lacks 'q' or 'scale'")
        self._q, self._scale = state["q"], state["scale"]
        gemm_q = state.get("gemm_q")
        self._set_gemm_weight(self._q if gemm_q is None else gemm_q, state.get("gemm_scale", self._scale))
        self._inv_smooth = state.get("inv_smooth")
        if "q4" in state:
            self._q4 = state["q4"]
        if "q8" in state:
            self._q8 = state["q8"]

    def _set_gemm_weight(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        """The W8A8 GEMM's int8 rows ``[N, K]`` and their scales. Where the packed kernel runs they
        are packed for it, and the rows are kept only when they are the weight-only path's own
        (unsmoothed: shared storage); a smoothed copy lives packed alone (~135 MB less for SmolLM2)
        and :attr:`_gemm_q` unpacks it when asked."""
        self._gemm_scale = scale
        packable = self.w8a8 and self.in_features % GROUP == 0 and self._ext.int8_gemm_supported()
        self._gemm_packed = pack_int8_gemm(q) if packable else None
        self._gemm_rows = q if self._gemm_packed is None or q.data_ptr() == self._q.data_ptr() else None

    @property
    def _gemm_q(self) -> torch.Tensor:
        """The GEMM weight as a ``[K, N]`` int8 view: ``torch._int_mm``'s layout (:meth:`int8_state`
        stores its transpose)."""
        rows = self._gemm_rows if self._gemm_rows is not None else unpack_int8_gemm(self._gemm_packed,
                                                                                    self.out_features)
        return rows.t()

    @property
    def gemm_weight(self) -> torch.Tensor:
        """The W8A8 GEMM's weight as the kernels take it: packed (``kernels.int8_pack``) where the
        packed kernel runs, else the ``[K, N]`` int8 view ``torch._int_mm`` takes."""
        return self._gemm_q if self._gemm_packed is None else self._gemm_packed

    def _check_blocks(self, packed: torch.Tensor, kind: str) -> None:
        """A packed block layout (``kind`` "q4" or "q8"): ``[ceil(N/16), K/32, block bytes]`` uint8."""
        block_bytes, what = _BLOCK_LAYOUTS[kind]
        tiles = -(-self.out_features // TILE_ROWS)
        if (packed.dtype != torch.uint8 or packed.dim() != 3
                or tuple(packed.shape) != (tiles, self.in_features // BLOCK, block_bytes)
                or self.in_features % BLOCK):
            raise ValueError(f"{what} weights {tuple(packed.shape)} do not fit a "
                             f"{self.out_features}x{self.in_features} layer")

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``x @ W^T (+ b)`` in ``x``'s dtype, or in ``out_dtype``: the int8 and block kernels
        accumulate in fp32, so asking for fp32 (the LM head's logits) skips a bf16 rounding and a
        conversion pass over the output; the bf16 GEMM's result is converted."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        # The small-batch kernels write in their input's dtype; bf16 -> fp32 is exact, so the same activations.
        dtype = out_dtype or x2.dtype
        if self.runs_q4(rows):
            out = self._ext.q4_linear(x2.to(dtype), self._q4, self.out_features, self._bias_f32)
        elif self.runs_q8(rows):
            out = self._ext.q8_linear(x2.to(dtype), self._q8, self.out_features, self._bias_f32)
        elif rows <= self.int8_max_rows:
            out = self._ext.int8_linear(x2.to(dtype), self._q, self._scale, self._bias_f32)
        elif self.runs_w8a8(rows):
            out = self.int8_matmul(*self.quantize_input(x2), dtype)
        else:
            out = torch.ops.mkldnn._linear_pointwise(x2, self._packed, self.bias, "none", [], "").to(dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def runs_q4(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows takes the 4-bit kernel."""
        return self._q4 is not None and rows <= (self.int8_max_rows if _w8a8_suspended else Q4_MAX_ROWS)

    def runs_q8(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows takes the Q8_0 kernel (not when it takes the 4-bit one)."""
        return (self._q8 is not None and not self.runs_q4(rows)
                and rows <= (self.int8_max_rows if _w8a8_suspended else Q8_MAX_ROWS))

    def runs_w8a8(self, rows: int) -> bool:
        """Whether an input of ``rows`` rows takes the W8A8 GEMM."""
        if self.runs_q4(rows) or self.runs_q8(rows):
            return False
        return self.w8a8 and rows > self.int8_max_rows and (not _w8a8_suspended or self.w8a8_in_prompts)

    # The W8A8 GEMM in its steps (quantize, accumulate, dequantize), so a caller can fuse what
    # sits between two of them (see :func:`w8a8_silu_mlp`).
    def quantize_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row int8 activations ``[M, K]`` (smoothed) and their fp32 row scales ``[M]``."""
        return self._ext.quantize_rows_s8(x2, self._inv_smooth)

    def int8_accumulate(self, xq: torch.Tensor) -> torch.Tensor:
        """The raw int32 GEMM of already quantized (and smoothed) int8 activations ``[M, K]``."""
        if self._gemm_packed is not None:
            return self._ext.int8_gemm(xq, self._gemm_packed, self.out_features)
        return torch._int_mm(xq, self._gemm_q)

    def int8_matmul(self, xq: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """:meth:`dequantize_output` of :meth:`int8_accumulate`, fused into the GEMM's store
        where the packed kernel runs (the same arithmetic, so the same result)."""
        if self._gemm_packed is not None:
            return self._ext.int8_gemm_dequant(xq, x_scale, self._gemm_packed, self._gemm_scale, self._bias_f32, dtype)
        return self.dequantize_output(self.int8_accumulate(xq), x_scale, dtype)

    def dequantize_output(self, acc: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``acc * x_scale[:, None] * weight_scale[None, :] (+ bias)`` in ``dtype``."""
        return self._ext.dequant_rows(acc, x_scale, self._gemm_scale, self._bias_f32, dtype)

    def smooth(self, act_absmax: torch.Tensor, alpha: float = 0.5) -> None:
        """SmoothQuant the int8 GEMM from per-input-channel activation maxima ``[K]``.

        ``s = max|x|^alpha / max|w|^(1 - alpha)`` per channel; the weight-only small-batch path
        keeps its unsmoothed copy (its activations are not quantized).
        """
        if not self.w8a8:
            return
        x_max = act_absmax.detach().float().clamp(min=1e-5)
        w_max = self.weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=1e-5)
        self._set_gemm_weight(*quantize_int8_rows(self.weight.float() * s[None, :]))
        self._inv_smooth = (1.0 / s).contiguous()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN, "
                f"int8_max_rows={self.int8_max_rows}, w8a8={self.w8a8}, q4={self._q4 is not None}, "
                f"q8={self._q8 is not None}")


def pack_linears(module: nn.Module, int8_max_rows: int = 0, w8a8: bool = False,
                 int8_states: dict[str, dict[str, torch.Tensor]] | None = None, prefix: str = "",
                 q4_weights: dict[str, torch.Tensor] | None = None,
                 q8_weights: dict[str, torch.Tensor] | None = None) -> int:
    """Replace every CPU bf16 ``nn.Linear`` under ``module`` by a :class:`PackedLinear`; returns the count.

    ``int8_max_rows > 0`` also gives each layer an int8 weight copy used up to that many rows;
    ``w8a8`` runs larger inputs as int8 GEMMs (see :class:`PackedLinear`). ``int8_states`` maps a
    layer's qualified name to its saved :meth:`PackedLinear.int8_state` (skips quantizing it);
    ``q4_weights`` maps it to its packed 4-bit blocks and ``q8_weights`` to its packed Q8_0 blocks
    (both used with ``int8_max_rows``).
    """
    if not packed_linear_supported(torch.bfloat16):
        return 0
    count = 0
    for name, child in list(module.named_children()):
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Linear) and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
            state = int8_states.get(qualified) if int8_states is not None else None
            q4 = q4_weights.get(qualified) if q4_weights is not None else None
            q8 = q8_weights.get(qualified) if q8_weights is not None else None
            setattr(module, name, PackedLinear(child, int8_max_rows=int8_max_rows, w8a8=w8a8, int8_state=state,
                                               q4=q4, q8=q8))
            count += 1
        else:
            count += pack_linears(child, int8_max_rows, w8a8, int8_states, f"{qualified}.", q4_weights, q8_weights)
    return count


def mark_prompt_w8a8(module: nn.Module, names: set[str] | frozenset[str]) -> int:
    """Let the W8A8 layers under ``module`` whose own name is in ``names`` (e.g. ``o_proj``) keep
    their int8 GEMM on prompt tokens (inside :func:`bf16_gemms`); the others are unmarked. Returns
    how many are marked."""
    count = 0
    for name, child in module.named_modules():
        if isinstance(child, PackedLinear):
            child.w8a8_in_prompts = child.w8a8 and name.rpartition(".")[2] in names
            count += child.w8a8_in_prompts
    return count


def w8a8_silu_mlp(gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``down(silu(gate) * up)`` with both GEMMs in int8 and the middle in one C++ pass
    (dequantize, activation, smoothing, quantize: no bf16 tensor in between); None when the
    two layers do not both run W8A8 at this batch size."""
    rows = x.numel() // x.shape[-1]
    if not (isinstance(gate_up, PackedLinear) and isinstance(down, PackedLinear)
            and gate_up.runs_w8a8(rows) and down.runs_w8a8(rows)):
        return None
    xq, x_scale = gate_up.quantize_input(x.reshape(rows, x.shape[-1]))
    # In place of gate_up's dequantize_output and down's quantize_input:
    hq, h_scale = gate_up._ext.silu_mul_quantize_rows(gate_up.int8_accumulate(xq), x_scale, gate_up._gemm_scale,
                                                      gate_up._bias_f32, down._inv_smooth)
    out = down.int8_matmul(hq, h_scale, x.dtype)
    return out.reshape(*x.shape[:-1], down.out_features)
