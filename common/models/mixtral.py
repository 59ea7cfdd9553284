"""Mixtral: Mistral's attention with a sparse MoE block (top-2, renormalised) in every layer."""

from __future__ import annotations

from common.models.config import ModelConfig
from common.models.layers import DecoderSpec
from common.models.moe import MoeDecoderForCausalLM, moe_mlp_factory

__all__ = ["MixtralForCausalLM"]


class MixtralForCausalLM(MoeDecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(mlp_factory=moe_mlp_factory)
