"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): a vision tower over Qwen2's decoder.

The language layers are the shared decoder's (Qwen2 spec). What differs: image embeddings from
:class:`~common.models.vision.VisionTransformer` replace the placeholder tokens' embeddings, and
rotary positions are M-RoPE ``[3, T]`` (:class:`~common.models.rope.MRotaryEmbedding`). The
engine computes both (``common/engine/multimodal.py``) and passes them to :meth:`forward`.
"""

from __future__ import annotations

import torch

from common.models.config import ModelConfig
from common.models.qwen2 import Qwen2ForCausalLM
from common.models.rope import MRotaryEmbedding
from common.models.vision import VisionTransformer
from kernels.attention import AttentionMetadata

__all__ = ["Qwen2_5_VLForConditionalGeneration"]


class Qwen2_5_VLForConditionalGeneration(Qwen2ForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.rotary = MRotaryEmbedding(config.head_dim, config.rope_theta, config.mrope_section, config.rope_scaling)
        self.visual = VisionTransformer(config.vision_config)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_caches: list[torch.Tensor],
        image_rows: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states ``[T, hidden]``; ``positions`` is ``[T]`` (text only) or ``[3, T]``;
        rows ``image_rows`` of the batch take ``image_embeds`` instead of their token embedding."""
        h = self.embed(input_ids)
        if image_rows is not None and image_rows.numel():
            h = h.index_copy(0, image_rows, image_embeds.to(h.dtype))
        cos, sin = self.rotary.lookup(positions, h.dtype)
        return self.run_layers(h, cos, sin, None, None, meta, kv_caches)

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        """One ``[t*h*w / merge**2, hidden]`` embedding tensor per image (pixels as the HF processor gives)."""
        return self.visual.encode_images(pixel_values, grid_thw)
