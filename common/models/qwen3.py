"""Qwen3: per-head RMSNorm on queries and keys before rotary, no q/k/v bias by default."""

from __future__ import annotations

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, DecoderSpec

__all__ = ["Qwen3ForCausalLM"]


class Qwen3ForCausalLM(DecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=config.attention_bias, o_bias=config.o_proj_bias, qk_norm=True)
