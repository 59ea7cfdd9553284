"""Decode batches through the whole decoder stack in one C++ call.

A decode step at batch 1 runs ~9 kernels per layer, each a few microseconds; driven from Python,
every one also pays a module call and a pybind crossing, a sizeable share of the step for a small
model. :class:`DecoderStack` hands the whole stack to ``kernels/csrc/decoder_stack.cpp``, which
runs the same kernels in the same order (so the same numbers, bit for bit) without the
interpreter between them.

It applies to the plain pre-norm decoder (Llama, SmolLM2, Mistral, Qwen2): on batches the 4-bit
kernel takes when every linear has a GGUF's 4-bit blocks (``kernels.q4_pack``), and on batches every
linear runs on the W8A8 GEMMs (64 decode rows: the Python path spent ~5 ms of a ~45 ms step between
kernels); anything else (Gemma's norms, q/k norms, MoE, soft caps, fp32, a batch with prompt
tokens) keeps the module-by-module path, as does everything with ``XLLM_DECODER_STACK=0``.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from kernels.attention import AttentionMetadata
from kernels.cpu_ext import cpu_ops_module
from kernels.linear import PackedLinear

logger = logging.getLogger(__name__)

__all__ = ["DecoderStack"]


class DecoderStack:
    """The fused path of one model (see the module docstring); build with :meth:`for_model`."""

    def __init__(self, model: nn.Module, ext) -> None:
        config, layers = model.config, model.model.layers
        self._ext = ext
        self._norms = [t for layer in layers for t in (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)]
        self._final_norm = model.model.norm.weight
        self._linears: list[PackedLinear] = [m for layer in layers for m in (
            layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]
        self._first = self._linears[0]
        self._q4 = all(m._q4 is not None for m in self._linears)
        self._w8a8 = all(m.w8a8 for m in self._linears)
        empty = torch.empty(0)
        self._empty = empty
        self._biases = [m._bias_f32 if m._bias_f32 is not None else empty for m in self._linears]
        self._windows = [layer.self_attn.sliding_window or -1 for layer in layers]
        attn = layers[0].self_attn
        self._shape = (attn.num_heads, attn.num_kv_heads, attn.head_dim, config.intermediate_size)
        self._eps, self._scale = float(config.rms_norm_eps), float(attn.scale)

    @classmethod
    def for_model(cls, model: nn.Module) -> DecoderStack | None:
        """The fused path for ``model``, or None when some layer does not fit it."""
        if os.environ.get("XLLM_DECODER_STACK") == "0":
            return None
        ext = cpu_ops_module()
        spec = getattr(model, "spec", None)
        if ext is None or not hasattr(ext, "decoder_stack_forward") or spec is None:
            return None
        if (spec.qk_norm or spec.sandwich_norms or spec.norm_unit_offset or spec.attn_soft_cap is not None
                or spec.final_soft_cap is not None or spec.local_rope or spec.mlp_factory is not None
                or spec.embed_scale is not None or model.config.hidden_act not in ("silu", "swish")):
            return None
        dtype = model.model.embed_tokens.weight.dtype
        q4 = w8a8 = True
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.qkv_proj, attn.o_proj, getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)):
                if not isinstance(lin, PackedLinear):
                    return None
                q4, w8a8 = q4 and lin._q4 is not None, w8a8 and lin.w8a8
            if layer.input_layernorm.weight.dtype != dtype or layer.post_attention_layernorm.weight.dtype != dtype:
                return None
        if not (q4 or w8a8):
            return None
        logger.info("decoder stack: decode batches on %s run all %d layers in one C++ call",
                    " and ".join(k for k, on in (("4-bit weights", q4), ("W8A8 GEMMs", w8a8)) if on),
                    len(model.model.layers))
        return cls(model, ext)

    def takes(self, rows: int, kv_caches: list[torch.Tensor], dtype: torch.dtype) -> bool:
        """Whether a batch of ``rows`` tokens runs here: the rows the 4-bit kernel takes (fewer
        inside ``bf16_gemms``), or rows every linear runs W8A8 (none inside ``bf16_gemms`` but for
        marked layers: such a batch keeps the module path), and KV pages the C++ kernels read (the
        model's dtype or int8)."""
        cache = kv_caches[0]
        if not (cache.device.type == "cpu" and cache.is_contiguous() and cache.dtype in (dtype, torch.int8)):
            return False
        return self._runs_q4(rows) or self._runs_w8a8(rows)

    def _runs_q4(self, rows: int) -> bool:
        return self._q4 and self._first.runs_q4(rows)

    def _runs_w8a8(self, rows: int) -> bool:
        return self._w8a8 and all(m.runs_w8a8(rows) for m in self._linears)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """The final norm's output ``[T, hidden]`` (``h`` becomes the residual stream)."""
        heads, kv_heads, head_dim, intermediate = self._shape
        h, cos, sin = h.contiguous(), cos.contiguous(), sin.contiguous()
        if self._runs_q4(h.shape[0]):
            return self._ext.decoder_stack_forward(
                h, self._norms, self._final_norm, [m._q4 for m in self._linears], self._biases, kv_caches,
                self._windows, cos, sin, meta.slot_mapping, meta.token_pages, meta.token_k_len,
                heads, kv_heads, head_dim, intermediate, self._eps, self._scale)
        # Read at every call: calibration (PackedLinear.smooth) replaces a layer's GEMM weights after load.
        linears, empty = self._linears, self._empty
        return self._ext.decoder_stack_w8a8_forward(
            h, self._norms, self._final_norm, [m.gemm_weight for m in linears], [m._gemm_scale for m in linears],
            [empty if m._inv_smooth is None else m._inv_smooth for m in linears], self._biases, kv_caches,
            self._windows, cos, sin, meta.slot_mapping, meta.token_pages, meta.token_k_len,
            heads, kv_heads, head_dim, self._eps, self._scale)
