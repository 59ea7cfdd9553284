"""Llama 2/3, SmolLM2 and Mistral: the plain pre-norm decoder."""

from __future__ import annotations

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, DecoderSpec

__all__ = ["LlamaForCausalLM", "MistralForCausalLM"]


class LlamaForCausalLM(DecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=config.attention_bias, o_bias=config.o_proj_bias, mlp_bias=config.mlp_bias)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama without biases; its optional sliding window comes through ``config.layer_sliding``."""
