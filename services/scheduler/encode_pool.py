"""The scheduler's encoder pool: multimodal Submits encoded by an encoder before their Assign.

Under ED-P and E-P-D (`epd_placement`) a Submit whose images carry pixels is held here while an
encoder instance (role `encode`) turns them into embeddings; the Submit is then routed as usual
with those images' frames replaced by the embeddings (`ImageMeta.kind = "embeddings"`), so the
prefill worker skips its vision tower. Text requests, EP-D, and images already carrying
embeddings are routed at once.

A dead encoder costs no request: every job knows its encoder, and when that encoder dies, leaves,
is replaced by a new incarnation, answers with an error, or does not answer in `timeout_s`, the
job is sent to another encoder (one not tried yet for it); with none left the Submit is routed
with its pixels and the prefill worker encodes (EP-D for that request). A late answer to an
abandoned try is recognised by its job id and dropped. The embeddings are the same tensors the
worker's own tower computes (same model class and weights), so greedy outputs do not change.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import msgspec
import torch

from common.protocol import ENCODE_ROLE, EncodeImage, EncodeRequest, EncodeResult, ImageMeta, Submit
from services.scheduler.epd_placement import ED_P, EP_D, PLACEMENTS
from services.scheduler.registry import Instance, Registry

__all__ = ["EncodePool", "DEFAULT_ENCODE_TIMEOUT_S"]

logger = logging.getLogger(__name__)

DEFAULT_ENCODE_TIMEOUT_S = 30.0

# (the submitting gateway's identity, the Submit, its frames): route it (encoded or not).
RouteSubmit = Callable[[bytes, Submit, list[torch.Tensor]], Awaitable[None]]
SendEncode = Callable[[Instance, EncodeRequest, list[torch.Tensor]], Awaitable[None]]


@dataclass
class _Job:
    request_id: str
    gateway_identity: bytes
    submit: Submit
    tensors: list[torch.Tensor]
    to_encode: list[int]  # indices of the images sent (those with pixels)
    job_id: str = ""
    encoder_id: str = ""
    sent_at: float = 0.0
    tried: set[str] = field(default_factory=set)


class EncodePool:
    def __init__(self, placement: str, registry: Registry, send: SendEncode, route: RouteSubmit,
                 timeout_s: float = DEFAULT_ENCODE_TIMEOUT_S, clock: Callable[[], float] = time.monotonic) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"unknown EPD placement {placement!r}; choose one of {PLACEMENTS}")
        self.placement = placement
        self.registry = registry
        self.send = send
        self.route = route
        self.timeout_s = timeout_s
        self.clock = clock
        self._jobs: dict[str, _Job] = {}  # job id (this try) -> job
        self._by_request: dict[str, str] = {}  # request id -> job id
        self.encoded_requests = 0
        self.encoded_images = 0
        self.cache_hits = 0
        self.retries = 0
        self.fallbacks = 0  # requests the prefill worker encoded after the encoders failed them

    # ---- entry points (called by the scheduler server) ----------------------------------

    def holds(self, request_id: str) -> bool:
        return request_id in self._by_request

    async def submit(self, identity: bytes, msg: Submit, tensors: list[torch.Tensor]) -> None:
        """Encode the Submit's pixel images on an encoder first (ED-P, E-P-D), or route it now."""
        to_encode = [i for i, meta in enumerate(msg.images) if meta.kind == "pixels"]
        if self.placement == EP_D or not to_encode:
            await self.route(identity, msg, tensors)
            return
        if msg.request_id in self._by_request:
            return  # the gateway sent it again while it encodes: it is on its way already
        job = _Job(msg.request_id, identity, msg, tensors, to_encode)
        await self._dispatch(job)

    async def on_result(self, identity: bytes, msg: EncodeResult, tensors: list[torch.Tensor]) -> None:
        job = self._jobs.get(msg.job_id)
        sender = self.registry.by_identity(identity)
        if job is None or sender is None or sender.instance_id != job.encoder_id:
            logger.debug("dropped encode result %s: no such try (late, or from another process)", msg.job_id)
            return
        del self._jobs[msg.job_id]
        problem = msg.error or self._check_embeddings(job, tensors)
        if problem:
            logger.warning("encoder %s failed request %s: %s", job.encoder_id, job.request_id, problem)
            await self._dispatch(job)
            return
        self._by_request.pop(job.request_id, None)
        self.encoded_requests += 1
        self.encoded_images += len(job.to_encode)
        self.cache_hits += msg.cache_hits
        images, frames = list(job.submit.images), list(job.tensors)
        for index, embedding in zip(job.to_encode, tensors, strict=True):
            meta = images[index]
            images[index] = ImageMeta(content_hash=meta.content_hash, grid_thw=meta.grid_thw,
                                      num_tokens=meta.num_tokens, offset=meta.offset, kind="embeddings")
            frames[index] = embedding
        submit = _with_images(job.submit, images)
        await self.route(job.gateway_identity, submit, frames)

    async def encoder_gone(self, instance: Instance) -> None:
        """`instance` died, left or was replaced: its jobs go to another encoder (or the worker)."""
        for job in [j for j in self._jobs.values() if j.encoder_id == instance.instance_id]:
            del self._jobs[job.job_id]
            logger.warning("encoder %s is gone: request %s is encoded elsewhere", instance.instance_id,
                           job.request_id)
            await self._dispatch(job)

    async def expire(self) -> None:
        """Jobs an encoder sat on past the timeout are tried elsewhere (the reaper calls this)."""
        now = self.clock()
        for job in [j for j in self._jobs.values() if now - j.sent_at > self.timeout_s]:
            del self._jobs[job.job_id]
            logger.warning("encoder %s did not answer request %s in %.0f s: encoding it elsewhere",
                           job.encoder_id, job.request_id, self.timeout_s)
            await self._dispatch(job)

    def abort(self, request_id: str) -> bool:
        """Forget a request aborted while its images encode; True when it was held here."""
        job_id = self._by_request.pop(request_id, None)
        if job_id is None:
            return False
        self._jobs.pop(job_id, None)
        return True

    def summary(self) -> dict:
        encoders = [i for i in self.registry.instances() if i.role == ENCODE_ROLE]
        return {"epd_placement": self.placement, "encoders": len(encoders), "encoding_requests": len(self._jobs),
                "encoded_requests": self.encoded_requests, "encoded_images": self.encoded_images,
                "encoder_cache_hits": self.cache_hits, "encode_retries": self.retries,
                "encode_fallbacks": self.fallbacks}

    # ---- choosing an encoder ------------------------------------------------------------

    def candidates(self, exclude: set[str] = frozenset()) -> list[Instance]:
        """Encoders this placement sends work to, best first: for ED-P those co-located with a
        live worker, for E-P-D standalone ones (either kind when the preferred one is missing),
        alive before suspect, then by queued images per batch slot."""
        encoders = [i for i in self.registry.instances()
                    if i.role == ENCODE_ROLE and not i.draining and i.instance_id not in exclude]
        encoders = [i for i in encoders if i.alive] or encoders
        if self.placement == ED_P:
            preferred = [i for i in encoders if i.colocated_with and i.colocated_with in self.registry]
        else:
            preferred = [i for i in encoders if not i.colocated_with]
        pool = preferred or encoders

        def cost(encoder: Instance) -> tuple:
            jobs = sum(1 for j in self._jobs.values() if j.encoder_id == encoder.instance_id)
            peer = self.registry.get(encoder.colocated_with) if encoder.colocated_with else None
            peer_load = peer.load / peer.capacity if peer is not None else 0.0
            return ((max(encoder.load, jobs)) / encoder.capacity, peer_load, encoder.assigned_total,
                    encoder.instance_id)

        return sorted(pool, key=cost)

    async def _dispatch(self, job: _Job) -> None:
        """Send `job` to the best encoder it has not tried; none left: route it with its pixels."""
        candidates = self.candidates(exclude=job.tried)
        if not candidates:
            self._by_request.pop(job.request_id, None)
            if job.tried:
                self.fallbacks += 1
                logger.warning("no encoder left for request %s: its prefill worker encodes it", job.request_id)
            await self.route(job.gateway_identity, job.submit, job.tensors)
            return
        if job.tried:
            self.retries += 1
        encoder = candidates[0]
        job.job_id, job.encoder_id, job.sent_at = uuid.uuid4().hex[:16], encoder.instance_id, self.clock()
        job.tried.add(encoder.instance_id)
        self._jobs[job.job_id] = job
        self._by_request[job.request_id] = job.job_id
        encoder.assigned_total += 1
        images = [EncodeImage(content_hash=job.submit.images[i].content_hash, grid_thw=job.submit.images[i].grid_thw,
                              num_tokens=job.submit.images[i].num_tokens) for i in job.to_encode]
        request = EncodeRequest(job_id=job.job_id, request_id=job.request_id, images=images)
        await self.send(encoder, request, [job.tensors[i] for i in job.to_encode])

    @staticmethod
    def _check_embeddings(job: _Job, tensors: list[torch.Tensor]) -> str:
        if len(tensors) != len(job.to_encode):
            return f"{len(tensors)} embedding frame(s) for {len(job.to_encode)} image(s)"
        for index, embedding in zip(job.to_encode, tensors, strict=True):
            rows = job.submit.images[index].num_tokens
            if embedding.dim() != 2 or embedding.shape[0] != rows:
                return f"embedding of shape {tuple(embedding.shape)} for an image of {rows} tokens"
        return ""


def _with_images(msg: Submit, images: list[ImageMeta]) -> Submit:
    """A copy of the Submit with other image metadata (msgspec structs are replaced, not edited)."""
    return msgspec.structs.replace(msg, images=images)
