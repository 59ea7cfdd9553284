"""Encode work on the backend channel: the scheduler asks an encoder instance for image embeddings.

With the E-P-D and ED-P placements (`services.scheduler.epd_placement`) a multimodal request's
images are encoded by an encoder instance (`python -m services.encoder`, registered with the role
`encode`) before its prefill is assigned. The scheduler sends one `EncodeRequest` per request
with every image to encode, each image's `pixel_values` as one raw tensor frame in the order of
`images`; the encoder answers with one `EncodeResult` whose frames are the embeddings
`[num_tokens, hidden]` of each image, in the same order (or an error, and no frames). Tensors
never travel inside msgpack.
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.backend import BACKEND, BackendMessage
from common.protocol.base import Record, register

__all__ = ["ENCODE_ROLE", "EncodeImage", "EncodeRequest", "EncodeResult"]

# The role an encoder instance registers and heartbeats with (never a worker role: no requests
# are routed to it, and it is never flipped).
ENCODE_ROLE = "encode"


class EncodeImage(Record):
    """One image to encode; its pixel_values travel as the matching tensor frame."""

    content_hash: str  # the embedding cache's key (sha256 of the decoded pixels and size)
    grid_thw: list[int]  # [t, h, w] patches, as the model's image processor gave it
    num_tokens: int  # rows of the embedding the language model expects


@register
@BACKEND.carries(to="worker")
class EncodeRequest(BackendMessage):
    TAG: ClassVar[str] = "encode_request"
    job_id: str  # unique per try: a late answer to an abandoned try is recognised and dropped
    request_id: str
    images: list[EncodeImage]


@register
@BACKEND.carries(to="scheduler")
class EncodeResult(BackendMessage):
    TAG: ClassVar[str] = "encode_result"
    job_id: str
    instance_id: str
    error: str = ""  # set: nothing was encoded (no frames); the scheduler encodes elsewhere
    cache_hits: int = 0  # images of this job served from the encoder's embedding cache
    encode_s: float = 0.0  # seconds spent in the vision tower for this job (0: all cached)
