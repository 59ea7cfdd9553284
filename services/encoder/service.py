"""The encoder process: a DEALER on the scheduler's backend, like a worker's, serving encode jobs.

It registers with the role `encode` (and keeps registering until acknowledged: the scheduler may
start later, or restart), heartbeats its load every interval, and answers each `EncodeRequest`
with one `EncodeResult` carrying the embeddings as raw frames. Jobs that arrive while the tower is
busy (or within `batch_wait_s` of each other) are encoded together, up to `max_batch_images`.
The pool is elastic: an encoder started later registers and gets work; one that leaves
deregisters, and one that dies is noticed by the scheduler, which re-sends its jobs elsewhere.

The vision tower runs on one executor thread (torch work is blocking), so the loop keeps
receiving and heartbeating while a batch encodes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.protocol import (
    BACKEND,
    ENCODE_ROLE,
    BackendMessage,
    Deregister,
    EncodeRequest,
    EncodeResult,
    Heartbeat,
    Register,
    RegisterAck,
)
from common.service_config import ServiceAddresses
from services.encoder.encoder import BatchEncoder, PendingImage

__all__ = ["EncoderService"]

logger = logging.getLogger(__name__)


@dataclass
class _Job:
    msg: EncodeRequest
    images: list[PendingImage]


class EncoderService:
    def __init__(
        self,
        encoder: BatchEncoder,
        addresses: ServiceAddresses,
        instance_id: str,
        model: str,
        colocated_with: str = "",
        max_batch_images: int = 16,
        batch_wait_s: float = 0.002,
        heartbeat_interval_s: float = 0.5,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.encoder = encoder
        self.addresses = addresses
        self.instance_id = instance_id
        self.model = model
        self.colocated_with = colocated_with
        self.max_batch_images = max_batch_images
        self.batch_wait_s = batch_wait_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.incarnation = uuid.uuid4().hex[:8]
        self.registered = False
        self.jobs_done = 0
        self.jobs_failed = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._queue: deque[_Job] = deque()
        self._arrived = asyncio.Event()
        self._running_images = 0
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-tower")
        self.backend: zmq.asyncio.Socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def connect(self) -> None:
        identity = f"{self.instance_id}#{self.incarnation}".encode()
        self.backend = bus.make_socket(zmq.DEALER, channel=BACKEND.connector, context=self._context,
                                       routing_id=identity)
        if self.addresses.curve is not None:
            self.addresses.curve.make_client(self.backend)
        bus.connect(self.backend, self.addresses.backend)
        logger.info("encoder %s connected to %s", self.instance_id, self.addresses.backend)

    async def run(self, stop: asyncio.Event) -> None:
        if self.backend is None:
            self.connect()
        tasks = [
            asyncio.create_task(self._receive_loop(), name="backend"),
            asyncio.create_task(self._batch_loop(), name="batches"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        # Jobs still queued are the scheduler's to re-send: it hears of our leaving right away.
        self._executor.shutdown(wait=True)
        if self.backend is not None:
            if self.registered:
                await bus.send(self.backend, Deregister(instance_id=self.instance_id))
            bus.close(self.backend, linger_ms=200)
        logger.info("encoder %s stopped", self.instance_id)

    # ---- registration and load ----------------------------------------------------------

    def register_message(self) -> Register:
        return Register(instance_id=self.instance_id, role=ENCODE_ROLE, kv_addr="", num_pages=0, page_size=0,
                        model=self.model, max_model_len=0, incarnation=self.incarnation, pid=os.getpid(),
                        colocated_with=self.colocated_with)

    def heartbeat_message(self) -> Heartbeat:
        waiting = sum(len(job.images) for job in self._queue)
        stats = {"pid": os.getpid(), "colocated_with": self.colocated_with, "jobs_done": self.jobs_done,
                 "jobs_failed": self.jobs_failed, "queued_jobs": len(self._queue), **self.encoder.stats()}
        return Heartbeat(
            instance_id=self.instance_id, role=ENCODE_ROLE, waiting=waiting, running=self._running_images,
            free_pages=0, total_pages=0, used_pages=0,
            prefix_hit_rate=float(self.encoder.cache.hit_rate), queued_prefill_tokens=0,
            max_num_seqs=self.max_batch_images, draining=False, flipping=False, kv_namespace="",
            prompt_tokens_total=0, generated_tokens_total=0, stats=stats, incarnation=self.incarnation,
        )

    async def _send(self, msg: BackendMessage, *tensors: torch.Tensor) -> None:
        if self.backend is not None:
            await bus.send(self.backend, msg, *tensors)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._send(self.heartbeat_message() if self.registered else self.register_message())
            await asyncio.sleep(self.heartbeat_interval_s)

    # ---- jobs ---------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            _, msg, tensors = await bus.recv(self.backend)
            if isinstance(msg, RegisterAck):
                if msg.accepted and not self.registered:
                    logger.info("encoder %s registered", self.instance_id)
                    self.registered = True
                    await self._send(self.heartbeat_message())
                elif not msg.accepted:
                    self.registered = False
            elif isinstance(msg, EncodeRequest):
                await self._accept(msg, tensors)
            # Anything else on the backend (aborts, finish choices broadcast to every instance)
            # names requests, which an encoder never holds.

    async def _accept(self, msg: EncodeRequest, tensors: list[torch.Tensor]) -> None:
        problem = self._check(msg, tensors)
        if problem:
            logger.warning("encode job %s refused: %s", msg.job_id, problem)
            self.jobs_failed += 1
            await self._send(EncodeResult(job_id=msg.job_id, instance_id=self.instance_id, error=problem))
            return
        images = [PendingImage(content_hash=meta.content_hash, grid_thw=tuple(meta.grid_thw),
                               num_tokens=meta.num_tokens, pixel_values=pixels)
                  for meta, pixels in zip(msg.images, tensors, strict=True)]
        self._queue.append(_Job(msg, images))
        self._arrived.set()

    @staticmethod
    def _check(msg: EncodeRequest, tensors: list[torch.Tensor]) -> str:
        if not msg.images:
            return "no images to encode"
        if len(tensors) != len(msg.images):
            return f"{len(msg.images)} image(s) but {len(tensors)} pixel frame(s)"
        for meta, pixels in zip(msg.images, tensors, strict=True):
            if len(meta.grid_thw) != 3 or min(meta.grid_thw) < 1 or meta.num_tokens < 1:
                return f"bad image grid {meta.grid_thw} / {meta.num_tokens} tokens"
            if pixels.dim() != 2 or pixels.shape[0] != meta.grid_thw[0] * meta.grid_thw[1] * meta.grid_thw[2]:
                return f"pixel_values of shape {tuple(pixels.shape)} do not match the grid {meta.grid_thw}"
        return ""

    async def _next_batch(self) -> list[_Job]:
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        if self.batch_wait_s > 0:
            await asyncio.sleep(self.batch_wait_s)  # let the jobs arriving together batch up
        jobs = [self._queue.popleft()]
        count = len(jobs[0].images)
        while self._queue and count + len(self._queue[0].images) <= self.max_batch_images:
            job = self._queue.popleft()
            jobs.append(job)
            count += len(job.images)
        return jobs

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_batch()
            images = [image for job in jobs for image in job.images]
            self._running_images = len(images)
            try:
                embeddings, hits, seconds = await loop.run_in_executor(self._executor, self.encoder.encode, images)
            except Exception as exc:  # a bad image must not take the encoder down: answer each job
                logger.exception("encoding a batch of %d job(s) failed", len(jobs))
                self._running_images = 0
                for job in jobs:
                    await self._answer_alone(job, exc)
                continue
            self._running_images = 0
            start = 0
            for job in jobs:
                own = embeddings[start:start + len(job.images)]
                start += len(job.images)
                # The batch's tower time, shared in proportion to each job's images.
                share = len(job.images) / max(1, len(images))
                self.jobs_done += 1
                await self._send(EncodeResult(job_id=job.msg.job_id, instance_id=self.instance_id,
                                              cache_hits=sum(hits[start - len(own):start]),
                                              encode_s=seconds * share), *own)

    async def _answer_alone(self, job: _Job, batch_error: Exception) -> None:
        """After a failed batch, each job again on its own: only the bad one gets the error."""
        loop = asyncio.get_running_loop()
        try:
            embeddings, hits, seconds = await loop.run_in_executor(self._executor, self.encoder.encode, job.images)
        except Exception as exc:
            self.jobs_failed += 1
            await self._send(EncodeResult(job_id=job.msg.job_id, instance_id=self.instance_id,
                                          error=f"{type(exc).__name__}: {exc}"[:500]))
            return
        self.jobs_done += 1
        await self._send(EncodeResult(job_id=job.msg.job_id, instance_id=self.instance_id,
                                      cache_hits=sum(hits), encode_s=seconds), *embeddings)
