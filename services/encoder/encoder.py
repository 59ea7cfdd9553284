"""The vision tower an encoder instance runs: batched `model.encode_images`, behind the cache.

The model is the same class the workers load (`common.models.registry.load_model`), so an image
encoded here gives exactly the embedding a prefill worker's own tower would (EP-D): greedy
outputs do not depend on the placement. Images of several requests that arrive together are
encoded in one call (their patches concatenated, one grid row each), which is what the tower's
per-image attention windows expect.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from services.encoder.embedding_cache import EmbeddingCache

__all__ = ["VisionTower", "BatchEncoder", "PendingImage", "load_vision_tower"]

logger = logging.getLogger(__name__)


class VisionTower(Protocol):
    """What the encoder needs of a multimodal model (mm-model's `encode_images` contract)."""

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> list[torch.Tensor]:
        ...


@dataclass
class PendingImage:
    content_hash: str
    grid_thw: tuple[int, int, int]
    num_tokens: int
    pixel_values: torch.Tensor


def load_vision_tower(model_path: str, dtype: torch.dtype, device: str) -> tuple[VisionTower, Any]:
    """(vision tower, model config) of a vision-language model directory: only the vision
    weights are loaded (an encoder needs no language model). ValueError for a text-only model."""
    from common.models.registry import load_vision_tower as load

    return load(model_path, dtype=dtype, device=device)


class BatchEncoder:
    """Encodes lists of images, each image once: cached embeddings are reused, the rest are
    encoded in one vision-tower call and cached."""

    def __init__(self, tower: VisionTower, cache: EmbeddingCache, device: str = "cpu") -> None:
        self.tower = tower
        self.cache = cache
        self.device = device
        self.images_encoded = 0
        self.batches = 0
        self.encode_seconds = 0.0

    def encode(self, images: list[PendingImage]) -> tuple[list[torch.Tensor], list[bool], float]:
        """(one CPU `[num_tokens, hidden]` embedding per image, whether each came from the cache,
        seconds in the tower).

        Raises ValueError when the tower's output does not match an image's `num_tokens` (a
        bad grid): the caller answers with an error and the request is encoded elsewhere.
        """
        results: list[torch.Tensor | None] = [None] * len(images)
        todo: dict[str, list[int]] = {}  # an image repeated within the batch is encoded once
        hits = [False] * len(images)
        for index, image in enumerate(images):
            cached = self.cache.get(image.content_hash) if image.content_hash not in todo else None
            if cached is not None and cached.shape[0] == image.num_tokens:
                results[index] = cached
                hits[index] = True
            else:
                todo.setdefault(image.content_hash, []).append(index)
        seconds = 0.0
        if todo:
            firsts = [indices[0] for indices in todo.values()]
            pixels = torch.cat([images[i].pixel_values for i in firsts]).to(self.device)
            grids = [tuple(images[i].grid_thw) for i in firsts]
            start = time.perf_counter()
            with torch.inference_mode():
                outputs = self.tower.encode_images(pixels, grids)
            seconds = time.perf_counter() - start
            self.batches += 1
            self.images_encoded += len(firsts)
            self.encode_seconds += seconds
            for (content_hash, indices), output in zip(todo.items(), outputs, strict=True):
                expected = images[indices[0]].num_tokens
                if output.shape[0] != expected:
                    raise ValueError(f"the vision tower gave {output.shape[0]} embeddings for an image of "
                                     f"{expected} tokens (grid {images[indices[0]].grid_thw})")
                embedding = output.detach().to("cpu").contiguous()
                self.cache.put(content_hash, embedding)
                for index in indices:
                    results[index] = embedding
        return [r for r in results if r is not None], hits, seconds

    def stats(self) -> dict[str, float | int]:
        return {"images_encoded": self.images_encoded, "encode_batches": self.batches,
                "encode_seconds": round(self.encode_seconds, 4), **self.cache.stats()}
