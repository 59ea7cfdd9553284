"""Images of a multimodal request: bytes -> a checked RGB image -> `ImageItem`s -> the prompt's placeholders.

Used by the gateway (images from the API) and the offline `LLM` (images given as PIL images). The
steps are the model's own: transformers' image processor of the model directory does every resize
and normalisation (never re-implemented here), and a prompt's single image pad token per image
(as the chat template writes it) is expanded the way the HF processor expands it.

Every rejection is a `ValueError` subclass naming what was wrong with the image, so the gateway
answers 400 and the engine a clear error.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Sequence
from typing import Any

from PIL import Image

from common.engine.multimodal import ImageItem

__all__ = [
    "ImageInputError",
    "CorruptImageError",
    "NotAnImageError",
    "ImageTooLargeError",
    "ImageTooManyPixelsError",
    "decode_image",
    "to_rgb",
    "image_content_hash",
    "ImageProcessor",
    "expand_image_placeholders",
]


class ImageInputError(ValueError):
    """An image that cannot be used; the message says why, in the user's terms."""


class CorruptImageError(ImageInputError):
    """The bytes start like an image of a known format but do not decode (truncated, damaged)."""


class NotAnImageError(ImageInputError):
    """The bytes are no image format PIL knows (text, an archive, empty...)."""


class ImageTooLargeError(ImageInputError):
    """More bytes than the configured cap."""


class ImageTooManyPixelsError(ImageInputError):
    """Width x height over the configured cap (checked from the header, before decoding)."""


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """`data` decoded into an RGB PIL image, or one of the `ImageInputError`s.

    The size in bytes is checked first and the pixel count from the header before the pixels are
    decoded, so a small file that claims a huge canvas (a decompression bomb) costs nothing.
    """
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes; at most {max_bytes} are allowed")
    if not data:
        raise NotAnImageError("the image is empty (0 bytes)")
    with warnings.catch_warnings():
        # PIL's own bomb guard warns at its default limit; ours (max_pixels) is the one that decides.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageTooManyPixelsError(f"the image has too many pixels ({exc})") from None
        except Image.UnidentifiedImageError:
            raise NotAnImageError("the data is not an image in a known format (PNG, JPEG, GIF, WebP, ...)") from None
        except (OSError, SyntaxError, ValueError) as exc:
            raise CorruptImageError(f"the image cannot be read: {exc}") from None
        width, height = image.size
        if width <= 0 or height <= 0:
            raise CorruptImageError(f"the image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageTooManyPixelsError(f"the image is {width}x{height} = {width * height} pixels; at most "
                                          f"{max_pixels} are allowed")
        try:
            image.load()  # the first frame only, for animated formats
        except Image.DecompressionBombError as exc:
            raise ImageTooManyPixelsError(f"the image has too many pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise CorruptImageError(f"the image data is corrupt or truncated: {exc}") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' processors make it (transparency composited over white)."""
    if image.mode == "RGB":
        return image
    from transformers.image_transforms import convert_to_rgb

    return Image.fromarray(convert_to_rgb(image, return_numpy=True), "RGB")


def image_content_hash(image: Image.Image) -> str:
    """sha256 hex of an RGB image's size and pixels: equal for equal pixels whatever the file format."""
    if image.mode != "RGB":
        image = to_rgb(image)
    digest = hashlib.sha256(f"rgb {image.width}x{image.height}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ImageProcessor:
    """The model directory's own transformers image processor, giving one `ImageItem` per image."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.merge_size = int(getattr(processor, "merge_size", 1) or 1)

    @classmethod
    def from_model_dir(cls, model_dir: str) -> ImageProcessor:
        """Load `preprocessor_config.json` of `model_dir` (ValueError when it has none)."""
        from transformers import AutoImageProcessor

        try:
            processor = AutoImageProcessor.from_pretrained(model_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{model_dir} has no usable image processor (preprocessor_config.json): {exc}") from exc
        return cls(processor)

    def item(self, image: Image.Image) -> ImageItem:
        """One image through the processor: pixel_values, grid and placeholder count, content hash."""
        if not isinstance(image, Image.Image):
            raise ImageInputError(f"an image must be a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else to_rgb(image)
        try:
            out = self.processor(images=[rgb], return_tensors="pt")
        except (ValueError, TypeError) as exc:  # e.g. smaller than a patch after the processor's bounds
            raise ImageInputError(f"the image cannot be processed for this model: {exc}") from None
        grid = tuple(int(v) for v in out["image_grid_thw"][0].tolist())
        t, h, w = grid
        return ImageItem(content_hash=image_content_hash(rgb), grid_thw=(t, h, w),
                         num_tokens=t * h * w // self.merge_size**2, pixel_values=out["pixel_values"].contiguous())

    def items(self, images: Sequence[Image.Image]) -> list[ImageItem]:
        return [self.item(image) for image in images]


def expand_image_placeholders(prompt_ids: Sequence[int], items: Sequence[ImageItem], image_token_id: int) -> list[int]:
    """`prompt_ids` with the k-th image pad token repeated `items[k].num_tokens` times (as the HF
    processor expands it); sets each item's `offset` to its first placeholder's index.

    The prompt must hold exactly one pad token per image (what a chat template writes per image part).
    """
    positions = [i for i, token in enumerate(prompt_ids) if token == image_token_id]
    if len(positions) != len(items):
        raise ValueError(f"the prompt has {len(positions)} image placeholder token(s) (id {image_token_id}) but "
                         f"{len(items)} image(s) were given")
    out: list[int] = []
    start = 0
    for position, item in zip(positions, items):
        out.extend(prompt_ids[start:position])
        item.offset = len(out)
        out.extend([image_token_id] * item.num_tokens)
        start = position + 1
    out.extend(prompt_ids[start:])
    return out
