"""Qwen2 / Qwen2.5: Llama with biases on the q/k/v projections."""

from __future__ import annotations

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, DecoderSpec

__all__ = ["Qwen2ForCausalLM"]


class Qwen2ForCausalLM(DecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=True, o_bias=False)
