"""The frontend channel: the scheduler's ROUTER and the gateways' DEALERs.

To the scheduler: Submit, Abort, FinishChoice, StatusQuery, FlipRequest, GatewayHello. To a
gateway: StatusReply. (Per-request results never come back this way: workers and the scheduler
push them to the gateway's own tokens socket.)
"""

from __future__ import annotations

from typing import ClassVar

from common.protocol.backend import BACKEND, BackendMessage
from common.protocol.base import Channel, Message, register
from common.protocol.embedding import EmbedTask
from common.protocol.image import ImageMeta
from common.protocol.sampling import Sampling

__all__ = [
    "FrontendMessage",
    "FRONTEND",
    "Submit",
    "Abort",
    "FinishChoice",
    "StatusQuery",
    "StatusReply",
    "FlipRequest",
    "GatewayHello",
]


class FrontendMessage(Message):
    """A message on the frontend channel."""


FRONTEND = Channel("frontend", FrontendMessage, binder="scheduler", connector="gateway")


@register
@FRONTEND.carries(to="scheduler")
class Submit(FrontendMessage):
    TAG: ClassVar[str] = "submit"
    request_id: str
    prompt_ids: list[int]
    sampling: Sampling
    priority: str = "online"
    gateway_id: str
    tokens_addr: str
    arrival_time: float
    # Set: an embedding request (prefill only, one EmbeddingResult back), not a generation.
    embed: EmbedTask | None = None
    # A multimodal request's images, each with one raw tensor frame in this order (common.image_frames).
    images: list[ImageMeta] = []


@register
@FRONTEND.carries(to="scheduler")
class Abort(FrontendMessage):
    TAG: ClassVar[str] = "abort"
    request_id: str
    reason: str


@register
@FRONTEND.carries(to="scheduler")
@BACKEND.carries(to="worker")
class FinishChoice(FrontendMessage, BackendMessage):
    """One choice of a request ended early (a stop string matched in its text): stop computing
    it. Gateway -> scheduler on the frontend, scheduler -> worker on the backend."""

    TAG: ClassVar[str] = "finish_choice"
    request_id: str
    index: int


@register
@FRONTEND.carries(to="scheduler")
class StatusQuery(FrontendMessage):
    TAG: ClassVar[str] = "status_query"


@register
@FRONTEND.carries(to="gateway")
class StatusReply(FrontendMessage):
    """What the status page and /metrics show: one display dict per instance (see the
    scheduler's registry), and the scheduler's own summary (policy, flips, pools)."""

    TAG: ClassVar[str] = "status_reply"
    instances: list[dict]
    scheduler: dict = {}


@register
@FRONTEND.carries(to="scheduler")
class FlipRequest(FrontendMessage):
    """An operator (or a test) asks the scheduler to flip an instance's role now."""

    TAG: ClassVar[str] = "flip_request"
    instance_id: str
    role: str


@register
@FRONTEND.carries(to="scheduler")
class GatewayHello(FrontendMessage):
    TAG: ClassVar[str] = "gateway_hello"
    gateway_id: str
    tokens_addr: str
