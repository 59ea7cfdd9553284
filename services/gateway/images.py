"""Image parts of a chat request: found, fetched, checked and turned into `ImageItem`s.

`ImageSupport.load` tells a multimodal model directory (a `vision_config` in `config.json` and
the model's `preprocessor_config.json`) from a text-only one. For a multimodal model,
`ImageSupport.prepare` fetches each `image_url` part (data: or http(s):, `image_fetch`), decodes
and checks it (`common.image_inputs`), runs the model's own image processor, and hands back the
conversation with each image part as `{"type": "image"}` (what chat templates render as the
model's image placeholder) plus the items in prompt order. A text-only model refuses image parts
with a 400 (`refuse_images`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from common.codec import DEFAULT_MAX_MESSAGE_BYTES
from common.engine.multimodal import ImageItem
from common.image_inputs import ImageInputError, ImageProcessor, decode_image, expand_image_placeholders
from services.gateway.image_fetch import ImageFetcher, ImageFetchError
from services.gateway.json_fields import bad_request

__all__ = ["ImageLimits", "ImageSupport", "image_parts", "refuse_images", "IMAGE_PART_TYPES"]

logger = logging.getLogger(__name__)

IMAGE_PART_TYPES = frozenset({"image_url"})
# Room in a Submit for everything but the pixel frames (prompt ids, sampling, metadata).
_BUS_HEADROOM = 4 * 1024 * 1024


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # one image's encoded size
    fetch_timeout_s: float  # one http(s) fetch, in all
    max_pixels: int  # one image's width x height, before the processor resizes it
    max_images: int  # per request


def image_parts(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(where, url) of every image part of the conversation, in prompt order."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                    found.append((f"messages[{i}].content[{j}]", part["image_url"]["url"]))
    return found


def refuse_images(model_id: str, messages: list[dict[str, Any]]) -> None:
    """400 for a text-only model given image parts."""
    parts = image_parts(messages)
    if parts:
        where = parts[0][0]
        raise bad_request(f"the model '{model_id}' takes text only; it cannot read image parts ({where})",
                          param=where.rsplit("[", 1)[0], code="unsupported_content")


def _without_image_urls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with each image part as {"type": "image"}: the template writes the
    placeholder, and never sees (or copies) a data URL's megabytes."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES
                                             for p in content):
            message = {**message, "content": [{"type": "image"} if isinstance(p, dict) and p.get("type") in
                                              IMAGE_PART_TYPES else p for p in content]}
        out.append(message)
    return out


def _read_model_config(model_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


class ImageSupport:
    """The served model's image side: its processor, its image pad token and the gateway's limits."""

    def __init__(self, processor: ImageProcessor, image_token_id: int, limits: ImageLimits) -> None:
        self.processor = processor
        self.image_token_id = image_token_id
        self.limits = limits
        self.fetcher = ImageFetcher(limits.max_bytes, limits.fetch_timeout_s)
        # All images of a request travel in one Submit: their pixel frames must fit the bus.
        self.max_frame_bytes = DEFAULT_MAX_MESSAGE_BYTES - _BUS_HEADROOM

    @classmethod
    def load(cls, model_path: str, tokenizer: Any, limits: ImageLimits) -> ImageSupport | None:
        """The image side of a multimodal HF directory; None for a text-only model (or a GGUF file)."""
        if not os.path.isdir(model_path):
            return None
        config = _read_model_config(model_path)
        if config is None or "vision_config" not in config:
            return None
        token_id = config.get("image_token_id", config.get("image_token_index"))
        if not isinstance(token_id, int):
            token_id = tokenizer.hf.convert_tokens_to_ids("<|image_pad|>")  # Qwen-VL's name for it
            token_id = token_id if token_id != tokenizer.hf.unk_token_id else None
        if not isinstance(token_id, int):
            raise ValueError(f"{model_path}: a vision model whose config.json names no image_token_id")
        processor = ImageProcessor.from_model_dir(model_path)
        logger.info("serving images: image token %d, merge size %d", token_id, processor.merge_size)
        return cls(processor, token_id, limits)

    async def prepare(self, messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[ImageItem]]:
        """The conversation for the chat template and its images as items (APIError 400 on any bad image)."""
        parts = image_parts(messages)
        if len(parts) > self.limits.max_images:
            raise bad_request(f"the request has {len(parts)} images; at most {self.limits.max_images} are allowed "
                              f"per request", param="messages", code="too_many_images")
        datas = await asyncio.gather(*(self._fetch(where, url) for where, url in parts))
        loop = asyncio.get_running_loop()
        items = []
        total = 0
        for (where, _), data in zip(parts, datas):
            # Decoding and the processor are CPU work: off the event loop.
            item = await loop.run_in_executor(None, self._item, where, data)
            total += item.pixel_values.numel() * item.pixel_values.element_size()
            if total > self.max_frame_bytes:
                raise bad_request(f"the images of this request take {total} bytes once processed (at {where}); at "
                                  f"most {self.max_frame_bytes} fit one request", param=where, code="image_too_large")
            items.append(item)
        return _without_image_urls(messages), items

    def expand(self, prompt_ids: list[int], items: list[ImageItem]) -> list[int]:
        try:
            return expand_image_placeholders(prompt_ids, items, self.image_token_id)
        except ValueError as exc:  # e.g. the text itself spelled the image pad token
            raise bad_request(f"the rendered prompt does not match its images: {exc}", param="messages") from None

    async def _fetch(self, where: str, url: str) -> bytes:
        try:
            return await self.fetcher.fetch(url)
        except ImageFetchError as exc:
            raise bad_request(f"{where}: {exc}", param=where, code="invalid_image_url") from None

    def _item(self, where: str, data: bytes) -> ImageItem:
        try:
            image = decode_image(data, max_bytes=self.limits.max_bytes, max_pixels=self.limits.max_pixels)
            return self.processor.item(image)
        except ImageInputError as exc:
            raise bad_request(f"{where}: {exc}", param=where, code="invalid_image") from None

    async def close(self) -> None:
        await self.fetcher.close()
