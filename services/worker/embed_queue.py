"""Embedding requests on a worker: an Assign with `embed` set, answered with one EmbeddingResult.

Every embedding Assign that reaches the engine loop's queue before the engine thread is free joins
one engine call (`common.engine.embedding.embed_token_lists`), so the inputs of a batch request,
and of concurrent requests, share forwards instead of running one by one. Nothing is kept: the
pages a forward used are back in the pool when the call returns, and the request ends here
(RequestFinished to the scheduler) as soon as its vector is pushed to the gateway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import numpy as np

from common.engine.block_manager import NoFreePagesError
from common.engine.embedding import EmbeddingInputError, check_embedding_input, embed_token_lists
from common.gateway_push import GatewayPushers
from common.protocol import Assign, BackendMessage, EmbeddingResult, RequestError, RequestFinished

__all__ = ["EmbedQueue"]

logger = logging.getLogger(__name__)

# Generations may hold every free page for a moment; they give them back as they finish.
NO_PAGES_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0, 1.0, 2.0)


class EmbedOwner(Protocol):
    instance_id: str
    engine: Any  # the LLMEngine (embed_token_lists uses its model, KV pool and token budget)
    pushers: GatewayPushers


class EmbedQueue:
    def __init__(self, worker: EmbedOwner, run_on_engine: Callable[..., Awaitable[Any]],
                 send_backend: Callable[[BackendMessage], Awaitable[None]],
                 on_done: Callable[[], None]) -> None:
        self.worker = worker  # read when needed: its pushers are set after the book
        self.run_on_engine = run_on_engine
        self.send_backend = send_backend
        self.on_done = on_done  # a request ended (the load dropped)
        self._waiting: dict[str, Assign] = {}
        self._running: set[str] = set()
        self._task: asyncio.Task | None = None
        self.total = 0

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting or request_id in self._running

    async def add(self, msg: Assign) -> None:
        """Queue one embedding request; the engine call starts once the caller yields."""
        if msg.request_id in self:
            await self.worker.pushers.send(msg.tokens_addr, RequestError(
                request_id=msg.request_id, code=409, message=f"request id {msg.request_id!r} is in use"))
            return
        self._waiting[msg.request_id] = msg
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain(), name="embeddings")

    def abort(self, request_id: str) -> bool:
        """Drop a request not computed yet (one being computed finishes: it takes one call)."""
        return self._waiting.pop(request_id, None) is not None

    async def _drain(self) -> None:
        while self._waiting:
            batch = list(self._waiting.values())
            self._waiting.clear()
            self._running.update(m.request_id for m in batch)
            try:
                await self._run(batch)
            except Exception:  # never leave a request without an answer
                logger.exception("embedding batch failed")
                for msg in batch:
                    await self._fail(msg, 500, "internal error while computing the embedding")
            finally:
                self._running.difference_update(m.request_id for m in batch)

    async def _run(self, batch: list[Assign]) -> None:
        engine = self.worker.engine
        groups: dict[tuple[str, bool], list[Assign]] = {}
        for msg in batch:
            try:
                check_embedding_input(engine, msg.prompt_ids)
            except EmbeddingInputError as exc:
                await self._fail(msg, 400, str(exc))
                continue
            assert msg.embed is not None
            groups.setdefault((msg.embed.pooling, msg.embed.normalize), []).append(msg)
        for (pooling, normalize), msgs in groups.items():
            vectors = await self._embed(msgs, pooling, normalize)
            if vectors is None:
                continue
            for msg, vector in zip(msgs, vectors):
                await self._answer(msg, vector)

    async def _embed(self, msgs: list[Assign], pooling: str, normalize: bool) -> np.ndarray | None:
        ids = [list(m.prompt_ids) for m in msgs]
        for delay in (*NO_PAGES_RETRY_S, None):
            try:
                result = await self.run_on_engine(embed_token_lists, self.worker.engine, ids, pooling, normalize)
                return result.numpy()
            except NoFreePagesError as exc:
                if delay is None:
                    for msg in msgs:
                        await self._fail(msg, 503, f"the KV cache is full; retry shortly ({exc})")
                    return None
                await asyncio.sleep(delay)
            except ValueError as exc:  # e.g. an unknown pooling name
                for msg in msgs:
                    await self._fail(msg, 400, str(exc))
                return None
        return None

    async def _answer(self, msg: Assign, vector: np.ndarray) -> None:
        data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
        await self.worker.pushers.send(msg.tokens_addr, EmbeddingResult(
            request_id=msg.request_id, embedding=data, dim=int(vector.shape[0]),
            num_prompt_tokens=len(msg.prompt_ids)))
        await self._finished(msg, "stop")

    async def _fail(self, msg: Assign, code: int, message: str) -> None:
        logger.info("embedding %s failed: %s", msg.request_id, message)
        await self.worker.pushers.send(msg.tokens_addr, RequestError(request_id=msg.request_id, code=code,
                                                                     message=message))
        await self._finished(msg, "error")

    async def _finished(self, msg: Assign, reason: str) -> None:
        self.total += 1
        await self.send_backend(RequestFinished(
            request_id=msg.request_id, instance_id=self.worker.instance_id, finish_reason=reason,
            num_prompt_tokens=len(msg.prompt_ids), num_output_tokens=0,
        ))
        self.on_done()
