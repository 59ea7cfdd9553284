"""common.image_inputs (bytes -> checked image -> ImageItem -> expanded prompt) and common.image_frames
(ImageItems <-> the bus), against transformers' own image processor of the tiny Qwen2.5-VL model."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from common import codec
from common.engine.multimodal import ImageItem
from common.image_frames import image_frames, image_items
from common.image_inputs import (
    CorruptImageError,
    ImageProcessor,
    ImageTooLargeError,
    ImageTooManyPixelsError,
    NotAnImageError,
    decode_image,
    expand_image_placeholders,
    image_content_hash,
)
from common.protocol import Sampling, Submit
from tests.unit._vl_model import make_image_processor, sample_image

LIMITS = {"max_bytes": 1 << 20, "max_pixels": 1 << 20}
PAD = 7  # an image pad token id for the placeholder tests


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> ImageProcessor:
    path = tmp_path_factory.mktemp("vl_processor")
    make_image_processor().save_pretrained(str(path))
    return ImageProcessor.from_model_dir(str(path))


# ------------------------------------------------------------------------------ decode_image


def test_png_and_lossless_formats_decode_to_the_same_rgb_pixels() -> None:
    image = sample_image(40, 30, seed=1)
    from_png = decode_image(encoded(image, "PNG"), **LIMITS)
    from_bmp = decode_image(encoded(image, "BMP"), **LIMITS)
    assert from_png.mode == from_bmp.mode == "RGB" and from_png.size == (40, 30)
    assert from_png.tobytes() == from_bmp.tobytes() == image.tobytes()
    assert image_content_hash(from_png) == image_content_hash(from_bmp) == image_content_hash(image)


def test_content_hash_tells_pixels_and_sizes_apart() -> None:
    a = sample_image(32, 32, seed=1)
    b = a.copy()
    b.putpixel((5, 5), (0, 0, 0) if a.getpixel((5, 5)) != (0, 0, 0) else (1, 1, 1))
    assert image_content_hash(a) != image_content_hash(b)
    # the same bytes as another shape are another image
    reshaped = Image.frombytes("RGB", (16, 64), a.tobytes())
    assert image_content_hash(a) != image_content_hash(reshaped)


def test_transparency_is_composited_over_white_as_transformers_does() -> None:
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))  # fully transparent
    rgb = decode_image(encoded(rgba), **LIMITS)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)


def test_a_jpeg_decodes() -> None:
    rgb = decode_image(encoded(sample_image(64, 48), "JPEG"), **LIMITS)
    assert rgb.size == (64, 48) and rgb.mode == "RGB"


@pytest.mark.parametrize("data", [b"", b"hello, I am text and no image", b"PK\x03\x04" + bytes(100)])
def test_bytes_that_are_no_image_are_refused(data: bytes) -> None:
    with pytest.raises(NotAnImageError):
        decode_image(data, **LIMITS)


def test_a_truncated_png_is_corrupt() -> None:
    data = encoded(sample_image(64, 64))
    with pytest.raises(CorruptImageError, match="corrupt or truncated"):
        decode_image(data[: len(data) // 2], **LIMITS)


def test_a_damaged_jpeg_is_corrupt() -> None:
    data = bytearray(encoded(sample_image(64, 64), "JPEG"))
    data[200:] = b"\x00" * (len(data) - 200)  # the entropy-coded data and the end marker are gone
    with pytest.raises(CorruptImageError):
        decode_image(bytes(data[:400]), **LIMITS)


def test_too_many_bytes_is_refused_before_decoding() -> None:
    data = encoded(sample_image(64, 64))
    with pytest.raises(ImageTooLargeError, match=f"{len(data)} bytes"):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=1 << 20)
    assert decode_image(data, max_bytes=len(data), max_pixels=1 << 20).size == (64, 64)


def test_a_huge_canvas_in_a_small_file_is_refused_from_its_header() -> None:
    data = encoded(Image.new("RGB", (5000, 4000), (1, 2, 3)))  # 20 Mpx of one colour: a few KiB of PNG
    assert len(data) < LIMITS["max_bytes"]
    with pytest.raises(ImageTooManyPixelsError, match="5000x4000"):
        decode_image(data, **LIMITS)


def test_every_refusal_is_a_value_error() -> None:
    for cls in (CorruptImageError, NotAnImageError, ImageTooLargeError, ImageTooManyPixelsError):
        assert issubclass(cls, ValueError)


# ---------------------------------------------------------------------------- ImageProcessor


def test_items_equal_the_transformers_processor_output(processor: ImageProcessor) -> None:
    images = [sample_image(56, 56, seed=0), sample_image(90, 60, seed=2)]
    items = processor.items(images)
    reference = make_image_processor()(images=images, return_tensors="pt")
    grids = [tuple(row) for row in reference["image_grid_thw"].tolist()]
    assert [item.grid_thw for item in items] == grids
    assert [item.num_tokens for item in items] == [t * h * w // 4 for t, h, w in grids]
    assert items[0].num_tokens == 4  # a 56x56 image: 4x4 patches merged 2x2
    assert torch.equal(torch.cat([item.pixel_values for item in items]), reference["pixel_values"])
    assert items[0].content_hash == image_content_hash(images[0]) != items[1].content_hash
    assert all(item.offset == -1 and item.embeddings is None for item in items)


def test_processor_of_a_directory_without_one_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="image processor"):
        ImageProcessor.from_model_dir(str(tmp_path))


# ---------------------------------------------------------------------- placeholder expansion


def _item(num_tokens: int) -> ImageItem:
    return ImageItem(content_hash="ab" * 32, grid_thw=(1, 2, 2 * num_tokens), num_tokens=num_tokens)


def test_each_pad_token_becomes_its_images_placeholders() -> None:
    items = [_item(3), _item(2)]
    prompt = [1, 2, PAD, 3, PAD, 4]
    expanded = expand_image_placeholders(prompt, items, PAD)
    assert expanded == [1, 2, PAD, PAD, PAD, 3, PAD, PAD, 4]
    assert [item.offset for item in items] == [2, 6]


def test_adjacent_images_and_images_at_the_ends() -> None:
    items = [_item(1), _item(2), _item(1)]
    assert expand_image_placeholders([PAD, PAD, 5, PAD], items, PAD) == [PAD, PAD, PAD, 5, PAD]
    assert [item.offset for item in items] == [0, 1, 4]


@pytest.mark.parametrize("prompt,count", [([1, PAD, 2], 2), ([1, PAD, PAD, 2], 1), ([1, 2], 1)])
def test_a_count_mismatch_is_refused(prompt: list[int], count: int) -> None:
    with pytest.raises(ValueError, match="placeholder"):
        expand_image_placeholders(prompt, [_item(2) for _ in range(count)], PAD)


# ------------------------------------------------------------------------------- bus frames


def _submit(metas) -> Submit:
    return Submit(request_id="r", prompt_ids=[1, 2], sampling=Sampling(), gateway_id="g", tokens_addr="ipc:///x",
                  arrival_time=0.0, images=metas)


def test_items_cross_the_codec_as_raw_frames(processor: ImageProcessor) -> None:
    items = processor.items([sample_image(56, 56), sample_image(84, 56, seed=3)])
    expand_image_placeholders([PAD, 9, PAD], items, PAD)
    embedded = ImageItem(content_hash="cd" * 32, grid_thw=(1, 2, 4), num_tokens=2, offset=40,
                         embeddings=torch.randn(2, 64))
    metas, tensors = image_frames([*items, embedded])
    assert [m.kind for m in metas] == ["pixels", "pixels", "embeddings"]
    frames = codec.encode(_submit(metas), *tensors)
    assert len(frames) == 4  # the envelope, then one raw frame per image (nothing inside msgpack)
    assert len(frames[0]) < 1024
    msg, received = codec.decode(frames)
    back = image_items(msg.images, received)
    for want, got in zip([*items, embedded], back):
        assert (got.content_hash, got.grid_thw, got.num_tokens, got.offset) == \
               (want.content_hash, want.grid_thw, want.num_tokens, want.offset)
    assert torch.equal(back[0].pixel_values, items[0].pixel_values) and back[0].embeddings is None
    assert torch.equal(back[2].embeddings, embedded.embeddings) and back[2].pixel_values is None


def test_frames_that_disagree_with_their_metadata_are_refused(processor: ImageProcessor) -> None:
    (item,) = processor.items([sample_image(56, 56)])
    item.offset = 3
    metas, tensors = image_frames([item])
    with pytest.raises(ValueError, match="1 image"):
        image_items(metas, [])
    with pytest.raises(ValueError, match="rows"):
        image_items(metas, [tensors[0][:-1]])
    with pytest.raises(ValueError, match="2-D floating-point"):
        image_items(metas, [tensors[0].to(torch.int32)])
    bad = [metas[0].__class__(**{**_fields(metas[0]), "kind": "audio"})]
    with pytest.raises(ValueError, match="kind"):
        image_items(bad, tensors)
    bad = [metas[0].__class__(**{**_fields(metas[0]), "grid_thw": [1, 4]})]
    with pytest.raises(ValueError, match="grid_thw"):
        image_items(bad, tensors)
    bad = [metas[0].__class__(**{**_fields(metas[0]), "content_hash": "not hex"})]
    with pytest.raises(ValueError, match="content_hash"):
        image_items(bad, tensors)


def _fields(meta) -> dict:
    import msgspec

    return msgspec.structs.asdict(meta)
