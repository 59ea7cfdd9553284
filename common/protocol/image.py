"""What an image of a multimodal request is as it travels on the bus (Submit, then Assign).

The metadata is typed here; the image's data never goes inside msgpack: each `ImageMeta` of a
message has one raw tensor frame, in the same order (`common.image_frames` builds and checks
them). `kind` says what that frame holds: the image processor's `pixel_values`
([patches, C*T*P*P], the serving worker runs the vision tower) or a vision tower's `embeddings`
([num_tokens, hidden], computed by an encoder instance).
"""

from __future__ import annotations

from common.protocol.base import Record

__all__ = ["ImageMeta", "IMAGE_KINDS"]

IMAGE_KINDS = ("pixels", "embeddings")


class ImageMeta(Record):
    content_hash: str  # sha256 hex of the decoded RGB pixels and size: the prefix cache keys on it
    grid_thw: list[int]  # (t, h, w) in patches, as the model's image processor returned it
    num_tokens: int  # placeholder tokens the image takes in prompt_ids
    offset: int  # index in prompt_ids of its first placeholder token
    kind: str = "pixels"  # one of IMAGE_KINDS: what its tensor frame holds
