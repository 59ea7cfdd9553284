"""Gemma 3 text model (``Gemma3ForCausalLM``).

Differences from Llama, all expressed in the :class:`DecoderSpec`: embeddings scaled by
``sqrt(hidden)``; RMSNorm scales by ``1 + weight``; four norms per layer (sandwich); per-head
q/k norm; attention scale ``query_pre_attn_scalar ** -0.5``; sliding-window layers with their
own rope theta (``rope_local_base_freq``); gelu-tanh MLP; optional final logit soft-cap.

transformers' Gemma 3 never passes ``attn_logit_softcapping`` to its attention (the released
models set it to null), so it is ignored here too, to stay equal to the reference.
"""

from __future__ import annotations

import logging

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, DecoderSpec

logger = logging.getLogger(__name__)

__all__ = ["Gemma3ForCausalLM"]


class Gemma3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        if config.attn_logit_softcapping is not None:
            logger.warning("Gemma 3 ignores attn_logit_softcapping=%s (as transformers does)",
                           config.attn_logit_softcapping)
        scalar = config.query_pre_attn_scalar if config.query_pre_attn_scalar is not None else config.head_dim
        return DecoderSpec(
            qkv_bias=config.attention_bias,
            o_bias=config.o_proj_bias,
            qk_norm=True,
            norm_unit_offset=True,
            sandwich_norms=True,
            embed_scale=config.hidden_size**0.5,
            attn_scale=float(scalar) ** -0.5,
            attn_soft_cap=None,
            final_soft_cap=config.final_logit_softcapping,
            local_rope=True,
        )
