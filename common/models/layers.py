"""Building blocks shared by every decoder-only model of the engine.

A model is a stack of :class:`DecoderLayer` over a flat batch of tokens ``[T, hidden]``:
sequences are concatenated, attention reads each sequence's context back from its paged KV
cache (see ``kernels.attention``). Projections are fused (q/k/v in one ``Linear``, gate/up in
one ``Linear``) so a layer is a handful of large matmuls plus few small ops, which is what
keeps CPU decoding cheap. What differs between families is a :class:`DecoderSpec`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.models.config import ModelConfig
from common.models.decoder_stack import DecoderStack
from common.models.rope import RotaryEmbedding
from kernels.activation import act_and_mul
from kernels.attention import AttentionMetadata, build_attention_metadata, paged_attention, write_kv
from kernels.cpu_ext import cpu_ops_module
from kernels.kv_quant import kv_row_width
from kernels.linear import PackedLinear, pack_linears, packed_linear_supported, w8a8_silu_mlp
from kernels.norm import add_rms_norm, rms_norm
from kernels.rotary import apply_rotary

logger = logging.getLogger(__name__)

__all__ = [
    "RMSNorm",
    "Attention",
    "GatedMLP",
    "DecoderLayer",
    "DecoderSpec",
    "DecoderForCausalLM",
]


class RMSNorm(nn.Module):
    """RMSNorm; ``unit_offset`` is Gemma's ``(1 + weight)`` variant (weight stored as in HF)."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.unit_offset)

    def add_forward(self, residual: torch.Tensor, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual + x`` (or ``residual`` when x is None) and its norm, as ``(sum, normed)``.

        On CPU one C++ call does both, updating ``residual`` in place: between the layers of a
        decode step the residual stream has no other reader.
        """
        ext = _cpu_ext(residual)
        if ext is not None and residual.is_contiguous() and self.weight.dtype == residual.dtype:
            return residual, ext.add_rms_norm_(residual, x, self.weight, self.eps, self.unit_offset)
        return add_rms_norm(residual, x, self.weight, self.eps, self.unit_offset)  # one Triton pass on CUDA


def _cpu_ext(x: torch.Tensor):
    """The C++ kernel module for tensors on the CPU (None elsewhere or when it is not built)."""
    return cpu_ops_module() if x.device.type == "cpu" else None


class Attention(nn.Module):
    """Fused-QKV attention over the paged KV cache."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        norm_unit_offset: bool,
        scale: float,
        sliding_window: int | None,
        soft_cap: float | None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, qkv_out, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, norm_unit_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        T = x.shape[0]
        H, KVH = self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        ext = _cpu_ext(qkv)
        if (ext is not None and self.q_norm is None and qkv.is_contiguous()
                and kv_cache.dtype in (qkv.dtype, torch.int8)
                and cos.dtype == qkv.dtype):
            # One C++ call rotates q/k in place and stores k/v in their pages (no temporaries).
            ext.rotary_write_kv_(qkv, cos, sin, kv_cache, meta.slot_mapping, H, KVH)
            q = qkv.view(T, H + 2 * KVH, self.head_dim)[:, :H]
            out = paged_attention(q, kv_cache, meta, self.scale, self.sliding_window, self.soft_cap)
            return self.o_proj(out.reshape(T, H * self.head_dim))
        qkv = qkv.view(T, H + 2 * KVH, self.head_dim)
        v = qkv[:, H + KVH :]
        if self.q_norm is None:
            # q and k are adjacent heads: one rotary call covers both
            qk = apply_rotary(qkv[:, : H + KVH], cos, sin)
            q, k = qk[:, :H], qk[:, H:]
        else:
            q = apply_rotary(self.q_norm(qkv[:, :H]), cos, sin)
            k = apply_rotary(self.k_norm(qkv[:, H : H + KVH]), cos, sin)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        out = paged_attention(q, kv_cache, meta, self.scale, self.sliding_window, self.soft_cap)
        return self.o_proj(out.reshape(T, H * self.head_dim).to(x.dtype))


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_and_mul = act_and_mul(hidden_act)
        self._silu = hidden_act in ("silu", "swish")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._silu and (out := w8a8_silu_mlp(self.gate_up_proj, self.down_proj, x)) is not None:
            return out
        gate_up = self.gate_up_proj(x)
        ext = _cpu_ext(gate_up)
        if self._silu and ext is not None:
            return self.down_proj(ext.silu_and_mul(gate_up))
        return self.down_proj(self.act_and_mul(gate_up))


@dataclass(frozen=True)
class DecoderSpec:
    """What one model family changes in the shared decoder."""

    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_unit_offset: bool = False  # Gemma: norms scale by (1 + weight)
    sandwich_norms: bool = False  # Gemma 3: extra norms after attention and after the MLP
    embed_scale: float | None = None  # Gemma: embeddings multiplied by sqrt(hidden)
    attn_scale: float | None = None  # None: head_dim ** -0.5
    attn_soft_cap: float | None = None
    final_soft_cap: float | None = None
    local_rope: bool = False  # Gemma 3: sliding layers use their own rope theta
    # MoE models: builds layer i's feed-forward block (None: the dense GatedMLP everywhere)
    mlp_factory: Callable[[ModelConfig, int], nn.Module] | None = None


class DecoderLayer(nn.Module):
    """Pre-norm residual block: attention then gated MLP (optionally Gemma 3's sandwich norms)."""

    def __init__(self, config: ModelConfig, spec: DecoderSpec, layer_idx: int) -> None:
        super().__init__()
        eps, offset = config.rms_norm_eps, spec.norm_unit_offset
        sliding = config.layer_sliding[layer_idx]
        self.self_attn = Attention(
            config,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            qk_norm=spec.qk_norm,
            norm_unit_offset=offset,
            scale=spec.attn_scale if spec.attn_scale is not None else config.head_dim**-0.5,
            sliding_window=config.sliding_window if sliding else None,
            soft_cap=spec.attn_soft_cap,
        )
        if spec.mlp_factory is not None:
            self.mlp = spec.mlp_factory(config, layer_idx)
        else:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, spec.mlp_bias)
        self.input_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, offset)
        self.sandwich_norms = spec.sandwich_norms
        if spec.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps, offset)

    def forward(
        self,
        x: torch.Tensor | None,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """One block on the residual stream, vLLM style: the hidden state is ``residual + x``
        (``x`` None: just ``residual``), and the block returns its own ``(x, residual)`` pair so
        each residual add fuses with the norm that follows it."""
        if self.sandwich_norms:
            h = residual if x is None else residual + x
            a = self.self_attn(self.input_layernorm(h), cos, sin, meta, kv_cache)
            h = h + self.post_attention_layernorm(a)
            return self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h))), h
        residual, normed = self.input_layernorm.add_forward(residual, x)
        a = self.self_attn(normed, cos, sin, meta, kv_cache)
        residual, normed = self.post_attention_layernorm.add_forward(residual, a)
        return self.mlp(normed), residual


class DecoderModel(nn.Module):
    """Embedding, layers and final norm (HF's ``model.*`` submodule)."""

    def __init__(self, config: ModelConfig, spec: DecoderSpec) -> None:
        super().__init__()
        weight = None
        if torch.get_default_device().type == "meta":
            # Built to be loaded (see registry.load_model): skip the random init, whose normal_ on
            # meta tensors imports torch._dynamo (seconds of every worker start).
            weight = torch.empty(config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, spec, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, spec.norm_unit_offset)


class DecoderForCausalLM(nn.Module):
    """A decoder-only LM over a flat token batch and paged KV caches.

    Subclasses only provide :meth:`spec_for` (and rarely override more). The lm head is kept
    out of :meth:`forward`: the engine computes logits only for the rows it samples.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.spec = self.spec_for(config)
        self.model = DecoderModel(config, self.spec)
        self.lm_head = None
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.rope_freq_factors)
        self.local_rotary = None
        if self.spec.local_rope:
            self.local_rotary = RotaryEmbedding(config.head_dim, config.rope_local_base_freq,
                                                config.rope_local_scaling)
        self._layer_uses_local = [self.spec.local_rope and s for s in config.layer_sliding]
        self._embed_scales: dict[torch.dtype, float] = {}
        self._stack: DecoderStack | None = None  # set by pack_linears when every layer fits it

    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        raise NotImplementedError

    def reserve_positions(self, num_positions: int) -> None:
        """Precompute rotary tables for ``num_positions`` (e.g. max_model_len) on the model's
        device and dtype; afterwards :meth:`forward` does no host sync (CUDA-graph safe)."""
        weight = self.model.embed_tokens.weight
        for rotary in (self.rotary, self.local_rotary):
            if rotary is not None:
                rotary.reserve(num_positions, weight.device, weight.dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.spec.embed_scale is not None:
            scale = self._embed_scales.get(h.dtype)
            if scale is None:
                # HF rounds the scale to the weight dtype before multiplying (matters in bf16)
                scale = self._embed_scales[h.dtype] = torch.tensor(self.spec.embed_scale, dtype=h.dtype).item()
            h = h * scale
        return h

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` after the final norm for a flat batch of new tokens."""
        h = self.embed(input_ids)
        cos, sin = self.rotary.lookup(positions, h.dtype)
        local_cos = local_sin = None
        if self.local_rotary is not None:
            local_cos, local_sin = self.local_rotary.lookup(positions, h.dtype)
        return self.run_layers(h, cos, sin, local_cos, local_sin, meta, kv_caches)

    def run_layers(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        local_cos: torch.Tensor | None,
        local_sin: torch.Tensor | None,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """The decoder stack and final norm over input embeddings ``h`` (models that build their
        own embeddings or positions, e.g. vision-language ones, call this)."""
        if self._stack is not None and self._stack.takes(h.shape[0], kv_caches, h.dtype):
            return self._stack.forward(h, cos, sin, meta, kv_caches)
        x = None
        for i, layer in enumerate(self.model.layers):
            if self._layer_uses_local[i]:
                x, h = layer(x, h, local_cos, local_sin, meta, kv_caches[i])
            else:
                x, h = layer(x, h, cos, sin, meta, kv_caches[i])
        return self.model.norm.add_forward(h, x)[1]

    def pack_linears(self, int8_max_rows: int = 0, w8a8: bool = False,
                     int8_states: dict[str, dict[str, torch.Tensor]] | None = None,
                     q4_weights: dict[str, torch.Tensor] | None = None,
                     q8_weights: dict[str, torch.Tensor] | None = None) -> int:
        """Prepack every linear (and the tied lm head) for oneDNN where it helps (CPU, bf16);
        ``int8_max_rows > 0`` adds int8 weight copies for batches up to that many rows, ``w8a8``
        int8 GEMMs for larger batches (see :class:`kernels.linear.PackedLinear`). ``int8_states``
        (by module name, from a weight cache) are adopted instead of quantizing again; ``q4_weights``
        and ``q8_weights`` (by module name) are a GGUF's own 4-bit and Q8_0 blocks for the small
        batches (``kernels.q4_pack``, ``kernels.q8_pack``; the Q8_0 ones: the head, ``lm_head``)."""
        weight = self.model.embed_tokens.weight
        if not packed_linear_supported(weight.dtype) or weight.device.type != "cpu":
            return 0
        if self.lm_head is None:
            # A tied head gets its own module sharing the embedding's storage, so it can be packed.
            head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta", dtype=weight.dtype)
            head.weight = self.model.embed_tokens.weight
            self.lm_head = head
        count = pack_linears(self, int8_max_rows, w8a8, int8_states, q4_weights=q4_weights, q8_weights=q8_weights)
        self._stack = DecoderStack.for_model(self)
        return count

    @torch.inference_mode()
    def score(self, token_ids: list[int], chunk_size: int = 256, page_size: int = 16,
              kv_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[T, vocab]`` fp32 logits of every position of one sequence, prefilled in chunks of
        ``chunk_size`` through scratch KV pages (calibration and accuracy checks, not serving);
        ``kv_dtype`` (default: the weights' dtype) may be ``torch.int8`` (``kernels/kv_quant.py``)."""
        config = self.config
        dtype = kv_dtype or self.model.embed_tokens.weight.dtype
        num_pages = -(-len(token_ids) // page_size)
        row = kv_row_width(config.head_dim, dtype)
        caches = [torch.zeros((2, config.num_key_value_heads, num_pages, page_size, row), dtype=dtype)
                  for _ in range(config.num_hidden_layers)]
        table = list(range(num_pages))
        logits = []
        for start in range(0, len(token_ids), chunk_size):
            end = min(len(token_ids), start + chunk_size)
            meta = build_attention_metadata([end - start], [end], [table], page_size)
            hidden = self(torch.tensor(token_ids[start:end], dtype=torch.long), torch.arange(start, end), meta, caches)
            logits.append(self.compute_logits(hidden))
        return torch.cat(logits)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[N, hidden] -> [N, vocab]`` float32 logits (final soft-cap applied)."""
        if isinstance(self.lm_head, PackedLinear):
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype), out_dtype=torch.float32)
        elif self.lm_head is not None:
            logits = self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()
        else:
            weight = self.model.embed_tokens.weight
            logits = F.linear(hidden.to(weight.dtype), weight).float()
        cap = self.spec.final_soft_cap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits
