"""Qwen3-MoE: Qwen3's attention (per-head q/k norm) with sparse MoE feed-forward blocks.

Which layers are sparse follows transformers: layer i is an MoE block unless it is in
``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (those keep a dense MLP of
``intermediate_size``); ``ModelConfig.moe_layers`` holds the result.
"""

from __future__ import annotations

from common.models.config import ModelConfig
from common.models.layers import DecoderSpec
from common.models.moe import MoeDecoderForCausalLM, moe_mlp_factory

__all__ = ["Qwen3MoeForCausalLM"]


class Qwen3MoeForCausalLM(MoeDecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=config.attention_bias, o_bias=config.o_proj_bias, qk_norm=True,
                           mlp_factory=moe_mlp_factory)
