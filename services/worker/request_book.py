"""The requests a worker holds, from admission (an Assign, or KV that landed here) to the end.

Admit into the engine (with the prefix pages reloaded from the kvstore), stream each step's
output to the owning gateway, hand a prefilled request's KV to a decode worker, stop one choice
or the whole request on demand, and report every end to the scheduler (RequestFinished, with
the latency this worker saw). Every method runs on the worker's event loop, between engine steps
or while one runs; every engine call goes through `run_on_engine` (the one engine thread).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import torch

from common.engine.sampling_params import SamplingParams
from common.gateway_push import GatewayPushers, token_delta
from common.image_frames import image_items
from common.protocol import (
    AbortRequest,
    Assign,
    BackendMessage,
    FinishChoice,
    KvTransferBegin,
    MigrateRequest,
    RequestError,
    RequestFinished,
    RequestHandoff,
)
from services.decode.kv_receiver import KvReceiver
from services.prefill.kv_sender import HandoffRequest, KvSender
from services.worker.embed_queue import EmbedQueue
from services.worker.engine_api import WorkerEngine
from services.worker.image_assign import ImageAssign
from services.worker.kv_tiering import KvTiering
from services.worker.migrations import Migrations
from services.worker.request_state import RequestState
from services.worker.role_state import RoleState

__all__ = ["RequestBook", "BookOwner"]

logger = logging.getLogger(__name__)

RunOnEngine = Callable[..., Awaitable[Any]]
SendBackend = Callable[[BackendMessage], Awaitable[None]]


class BookOwner(Protocol):
    """What the book uses of the worker that owns it (read when needed: set after the book)."""

    instance_id: str
    incarnation: str
    engine: WorkerEngine
    roles: RoleState
    pushers: GatewayPushers
    tiering: KvTiering
    sender: KvSender
    receiver: KvReceiver


class RequestBook:
    def __init__(self, worker: BookOwner, run_on_engine: RunOnEngine, send_backend: SendBackend,
                 wake: Callable[[], None]) -> None:
        self.worker = worker  # its engine, role state, pushers and KV helpers
        self.run_on_engine = run_on_engine
        self.send_backend = send_backend
        self.wake = wake  # the engine loop has work
        self.requests: dict[str, RequestState] = {}
        self.total = 0
        self.load_dropped = False  # a request ended (or left) since the last heartbeat
        self._handoffs: set[asyncio.Task] = set()
        # Embedding requests (an Assign with `embed`): computed apart, one engine call per batch.
        self.embeds = EmbedQueue(worker, run_on_engine, send_backend, self._embedding_done)
        # DP-balance migrations of running sequences to another decode worker.
        self.migrations = Migrations(self, run_on_engine, send_backend)

    def _embedding_done(self) -> None:
        self.load_dropped = True

    async def apply(self, msg: Assign | ImageAssign | AbortRequest | FinishChoice | MigrateRequest) -> None:
        """Apply what the scheduler sent, between engine steps."""
        if isinstance(msg, MigrateRequest):
            await self.migrations.start(msg)
        elif isinstance(msg, ImageAssign):
            await self.add(msg.msg, msg.tensors)
        elif isinstance(msg, Assign):
            if msg.embed is None or msg.request_id in self.requests:
                await self.add(msg)  # a generation (or a request id in use: refused there)
            else:
                await self.embeds.add(msg)
        elif isinstance(msg, AbortRequest):
            if not self.embeds.abort(msg.request_id):
                await self.abort(msg.request_id)
        elif msg.request_id in self.requests:
            await self.finish_choice(msg.request_id, msg.index)

    def cancel_handoffs(self) -> None:
        for task in self._handoffs:
            task.cancel()
        self.migrations.cancel()

    async def abort(self, request_id: str) -> None:
        """Stop a request wherever it is here: running, held for a hand-off, or KV arriving."""
        if await self.worker.receiver.abort(request_id):
            logger.debug("aborted incoming %s", request_id)
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        await self.run_on_engine(self.worker.engine.abort_request, request_id)
        logger.debug("aborted %s", request_id)
        await self._finished(request_id, state, "abort")

    async def add(self, msg: Assign, image_tensors: Sequence[torch.Tensor] = ()) -> None:
        worker = self.worker
        if msg.request_id in self.requests:
            await worker.pushers.send(msg.tokens_addr, RequestError(
                request_id=msg.request_id, code=409, message=f"request id {msg.request_id!r} is in use"))
            return
        handoff = None
        try:
            params = SamplingParams.from_dict(msg.sampling.to_dict())
            images = image_items(msg.images, image_tensors) if msg.images or image_tensors else None
            if images and msg.embed is not None:
                raise ValueError("an embedding request cannot carry images")
            # Only single-choice requests are handed over; the scheduler serves n > 1 whole.
            hold = bool(msg.decode_candidates) and params.n == 1 and not params.use_beam_search
            if hold:
                handoff = HandoffRequest(
                    request_id=msg.request_id, sampling=msg.sampling, priority=msg.priority,
                    tokens_addr=msg.tokens_addr, arrival_time=msg.arrival_time,
                    candidates=list(msg.decode_candidates),
                )

            def add() -> tuple[list, dict[str, int]]:
                # One engine call: pages fetched from the kvstore land right before admission.
                loaded = worker.tiering.load(msg.request_id, list(msg.prompt_ids))
                extra = {"images": images} if images else {}  # EP-D: the engine's own vision tower encodes
                return worker.engine.add_request(msg.request_id, list(msg.prompt_ids), params, priority=msg.priority,
                                                 hold_after_prefill=hold, **extra), loaded

            _, loaded = await self.run_on_engine(add)
        except (ValueError, TypeError) as exc:
            await self._reject(msg, 400, str(exc))
            return
        except Exception as exc:
            logger.exception("could not add request %s", msg.request_id)
            await self._reject(msg, 500, f"internal error: {type(exc).__name__}")
            return
        # params.n choices come back (a beam request starts as one sequence and returns n beams)
        self.requests[msg.request_id] = RequestState(msg.tokens_addr, params.n, len(msg.prompt_ids), handoff=handoff,
                                                     from_store=loaded, sampling=msg.sampling, priority=msg.priority,
                                                     arrival_time=msg.arrival_time)
        self.total += 1
        worker.roles.started("prefill")

    async def _reject(self, msg: Assign, code: int, message: str) -> None:
        logger.info("rejected %s: %s", msg.request_id, message)
        await self.worker.pushers.send(msg.tokens_addr, RequestError(request_id=msg.request_id, code=code,
                                                                     message=message))
        await self.send_backend(RequestFinished(
            request_id=msg.request_id, instance_id=self.worker.instance_id, finish_reason="error",
            num_prompt_tokens=len(msg.prompt_ids), num_output_tokens=0,
        ))

    async def emit(self, output: Any) -> None:
        """One engine output: its tokens to the gateway; its end, or its hand-off, here."""
        state = self.requests.get(output.request_id)
        if state is None:
            return
        now = time.monotonic()
        if state.first_token_at is None:
            state.first_token_at = now
            state.ttft_s = now - state.started_at
            self.worker.tiering.count_hit(output.num_cached_tokens, state.from_store)
        state.num_output_tokens += len(output.new_token_ids)
        state.tokens_here += len(output.new_token_ids)
        delta = token_delta(output)
        delta.instance_id, delta.incarnation = self.worker.instance_id, self.worker.incarnation
        await self.worker.pushers.send(state.tokens_addr, delta)
        if getattr(output, "held", False) and state.handoff is not None:
            state.handoff.ttft_s = state.ttft_s
            task = asyncio.create_task(self._hand_off(output.request_id, state), name=f"handoff {output.request_id}")
            self._handoffs.add(task)
            task.add_done_callback(self._handoffs.discard)
            return
        if output.finish_reason is not None:
            state.finished.add(output.index)
            if len(state.finished) >= state.n:
                del self.requests[output.request_id]
                await self._finished(output.request_id, state, output.finish_reason)

    async def _hand_off(self, request_id: str, state: RequestState) -> None:
        """Move a prefilled request to a decode worker; it is resumed here if none takes it."""
        assert state.handoff is not None
        taker = await self.worker.sender.hand_off(state.handoff)
        if taker is not None:
            # The decode worker owns it now and reports it to the scheduler (RequestHandoff).
            self.requests.pop(request_id, None)
            self.load_dropped = True
        else:
            state.handoff = None  # decoding here: this worker finishes it like any request
        self.wake()

    async def on_kv_landed(self, begin: KvTransferBegin) -> None:
        """A sequence's KV arrived and it joined the running batch: this worker owns the request."""
        self.requests[begin.request_id] = RequestState(
            begin.tokens_addr, 1, len(begin.prompt_ids), num_output_tokens=len(begin.output_ids),
            first_token_at=time.monotonic(), ttft_s=begin.ttft_s, from_kv=True,
            sampling=begin.sampling, priority=begin.priority, arrival_time=begin.arrival_time,
        )
        self.total += 1
        self.worker.roles.started("decode")
        await self.send_backend(RequestHandoff(
            request_id=begin.request_id, from_instance=begin.source_instance, to_instance=self.worker.instance_id,
            ttft_s=begin.ttft_s,
        ))
        self.wake()

    async def finish_choice(self, request_id: str, index: int) -> None:
        """Stop one choice the gateway already ended (stop string); its pages are freed now."""
        state = self.requests[request_id]
        if index in state.finished or not 0 <= index < state.n:
            return
        await self.run_on_engine(self.worker.engine.finish_sequence, request_id, index, "stop")
        state.finished.add(index)
        if len(state.finished) >= state.n:
            del self.requests[request_id]
            await self._finished(request_id, state, "stop")

    async def _finished(self, request_id: str, state: RequestState, reason: str) -> None:
        self.load_dropped = True
        await self.send_backend(RequestFinished(
            request_id=request_id, instance_id=self.worker.instance_id, finish_reason=reason,
            num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
            ttft_s=-1.0 if state.from_kv else state.ttft_s, tpot_s=state.tpot_s(time.monotonic()),
        ))

    async def fail(self, request_id: str, code: int, message: str, reason: str = "") -> None:
        """End a request with an error; with a `reason` it is retriable (the gateway migrates it)."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        await self.worker.pushers.send(state.tokens_addr, RequestError(request_id=request_id, code=code,
                                                                       message=message, retriable=bool(reason),
                                                                       reason=reason))
        await self._finished(request_id, state, "error")
