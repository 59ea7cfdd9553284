"""`ImageItem`s <-> what the bus carries: `ImageMeta` records plus one raw tensor frame per image.

The sender (gateway, scheduler after an encode) calls `image_frames`; the receiver (worker,
encoder) calls `image_items`, which checks that the frames agree with their metadata before
anything reaches a model: the codec already checked each frame's dtype and byte count against its
declared shape, this checks the shape against the image.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from common.engine.multimodal import ImageItem
from common.protocol.image import IMAGE_KINDS, ImageMeta

__all__ = ["image_frames", "image_items"]

_HASH = re.compile(r"^[0-9a-f]{16,128}$")


def image_frames(items: Sequence[ImageItem]) -> tuple[list[ImageMeta], list[torch.Tensor]]:
    """The metadata and frames of `items`: an item's embeddings travel when it has them, else its pixels."""
    metas: list[ImageMeta] = []
    tensors: list[torch.Tensor] = []
    for k, item in enumerate(items):
        tensor = item.embeddings if item.embeddings is not None else item.pixel_values
        if tensor is None:
            raise ValueError(f"image {k} has neither pixel_values nor embeddings")
        metas.append(ImageMeta(content_hash=item.content_hash, grid_thw=[int(v) for v in item.grid_thw],
                               num_tokens=int(item.num_tokens), offset=int(item.offset),
                               kind="embeddings" if item.embeddings is not None else "pixels"))
        tensors.append(tensor)
    return metas, tensors


def image_items(metas: Sequence[ImageMeta], tensors: Sequence[torch.Tensor]) -> list[ImageItem]:
    """Rebuild the `ImageItem`s of a received message (ValueError on any disagreement)."""
    if len(metas) != len(tensors):
        raise ValueError(f"{len(metas)} image(s) but {len(tensors)} tensor frame(s)")
    items = []
    for k, (meta, tensor) in enumerate(zip(metas, tensors)):
        if meta.kind not in IMAGE_KINDS:
            raise ValueError(f"image {k}: kind {meta.kind!r} is not one of {IMAGE_KINDS}")
        if not _HASH.match(meta.content_hash):
            raise ValueError(f"image {k}: content_hash must be 16-128 lowercase hex digits")
        if len(meta.grid_thw) != 3 or min(meta.grid_thw) <= 0:
            raise ValueError(f"image {k}: grid_thw {meta.grid_thw} must be three positive integers")
        if meta.num_tokens <= 0 or meta.offset < 0:
            raise ValueError(f"image {k}: num_tokens must be > 0 and offset >= 0")
        if tensor.dim() != 2 or not tensor.dtype.is_floating_point:
            raise ValueError(f"image {k}: its frame must be a 2-D floating-point tensor, got "
                             f"{tensor.dtype}{list(tensor.shape)}")
        t, h, w = meta.grid_thw
        rows = meta.num_tokens if meta.kind == "embeddings" else t * h * w
        if tensor.shape[0] != rows:
            what = "num_tokens" if meta.kind == "embeddings" else "t*h*w patches"
            raise ValueError(f"image {k}: its {meta.kind} frame has {tensor.shape[0]} rows, {what} is {rows}")
        items.append(ImageItem(
            content_hash=meta.content_hash, grid_thw=(t, h, w), num_tokens=meta.num_tokens, offset=meta.offset,
            pixel_values=tensor if meta.kind == "pixels" else None,
            embeddings=tensor if meta.kind == "embeddings" else None,
        ))
    return items
