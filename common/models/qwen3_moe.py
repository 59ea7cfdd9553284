"""Qwen3-MoE: Qwen3's attention (per-head q/k norm) with sparse MoE feed-forward blocks.

Which layers are sparse follows transformers: layer i is an MoE block unless it is in
``mlp_only_layers`` or ``(i + 1) % decoder_sparse_step != 0`` (those keep a dense MLP of
``intermediate_size``). :class:`MoeDecoderForCausalLM` is the part every MoE family shares: the
list of MoE blocks, the expert-count hook (statistics) and expert placement (EPLB).
"""

from __future__ import annotations

import torch.nn as nn

from common.models.config import ModelConfig
from common.models.layers import DecoderForCausalLM, DecoderSpec, GatedMLP
from common.models.moe import ExpertCountsHook, SparseMoeBlock

__all__ = ["MoeDecoderForCausalLM", "Qwen3MoeForCausalLM", "moe_mlp_factory"]


def moe_mlp_factory(config: ModelConfig, layer_idx: int) -> nn.Module:
    """Layer ``layer_idx``'s feed-forward block: sparse where ``config.moe_layers`` says so."""
    sparse = config.moe_layers or [False] * config.num_hidden_layers
    if not sparse[layer_idx]:
        return GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias)
    return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                          config.moe_intermediate_size, config.hidden_act, config.norm_topk_prob,
                          moe_index=sum(sparse[:layer_idx]))


class MoeDecoderForCausalLM(DecoderForCausalLM):
    """A decoder whose spec builds its feed-forward blocks with :func:`moe_mlp_factory`."""

    def moe_blocks(self) -> list[SparseMoeBlock]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, SparseMoeBlock)]

    def set_expert_counts_hook(self, hook: ExpertCountsHook | None) -> None:
        """Called by every MoE block with its per-expert and per-slot token counts (device tensors)."""
        for block in self.moe_blocks():
            block.on_counts = hook

    def set_expert_placement(self, slot_to_expert: list[list[int]] | None) -> None:
        """One physical-slot layout per MoE layer (None: one slot per expert everywhere)."""
        blocks = self.moe_blocks()
        if slot_to_expert is not None and len(slot_to_expert) != len(blocks):
            raise ValueError(f"placement has {len(slot_to_expert)} layers, the model {len(blocks)} MoE layers")
        for i, block in enumerate(blocks):
            block.experts.set_placement(None if slot_to_expert is None else slot_to_expert[i])


class Qwen3MoeForCausalLM(MoeDecoderForCausalLM):
    @classmethod
    def spec_for(cls, config: ModelConfig) -> DecoderSpec:
        return DecoderSpec(qkv_bias=config.attention_bias, o_bias=config.o_proj_bias, qk_norm=True,
                           mlp_factory=moe_mlp_factory)
