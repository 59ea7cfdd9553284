"""The worker process: one engine, driven by assignments from the scheduler over the bus.

Sockets: DEALER to the scheduler's backend (Register, Heartbeat, RequestFinished, FlipAck in;
RegisterAck, Assign, AbortRequest out), SUB on the control PUB (topics: own id and `all`), a
bound `kv` ROUTER for future KV transfer, and PUSH sockets to the gateways' tokens addresses.

The engine is not thread-safe and its step is blocking CPU work, so one engine thread runs
`step()` while the asyncio loop keeps receiving and heartbeating; every other engine call
(add, abort, stats) happens on the loop thread between steps, never during one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.engine.sampling_params import SamplingParams
from common.protocol import (
    TOPIC_ALL,
    AbortRequest,
    FinishChoice,
    Assign,
    Deregister,
    Drain,
    FlipAck,
    Heartbeat,
    KvTransferAck,
    KvTransferHeader,
    Message,
    Register,
    RegisterAck,
    RequestError,
    RequestFinished,
    RoleFlip,
    Shutdown,
)
from common.service_config import ServiceAddresses
from common.worker.outputs import GatewayPushers, token_delta

logger = logging.getLogger(__name__)

__all__ = ["Worker", "ROLES", "DEFAULT_HEARTBEAT_INTERVAL_S"]

ROLES = ("mixed", "prefill", "decode")
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5


@dataclass
class _Request:
    tokens_addr: str
    n: int
    num_prompt_tokens: int
    finished: set[int] = field(default_factory=set)
    num_output_tokens: int = 0


class Worker:
    def __init__(
        self,
        engine: Any,
        addresses: ServiceAddresses,
        instance_id: str,
        role: str = "mixed",
        kv_addr: str | None = None,
        advertise_host: str | None = None,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        context: zmq.asyncio.Context | None = None,
        executor: ThreadPoolExecutor | None = None,
    ) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        self.engine = engine
        self.addresses = addresses
        self.instance_id = instance_id
        self.role = role
        self.kv_addr = kv_addr or addresses.kv_addr(instance_id)
        self.advertise_host = advertise_host
        self.heartbeat_interval_s = heartbeat_interval_s
        self.registered = False
        self.draining = False
        self.requests: dict[str, _Request] = {}
        self.requests_total = 0
        self.integrity_failures = 0
        self._audited_at_step = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._pending: deque[Message] = deque()  # Assign / AbortRequest waiting for the step to end
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        # Every engine call that runs torch work happens on this one thread (see worker.main).
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self._stats: dict = {}
        self.pushers = GatewayPushers(self._context)
        # Unique per process: tells the scheduler a restarted worker from a repeated Register.
        self._identity = f"{instance_id}#{uuid.uuid4().hex[:8]}".encode()
        self.backend: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None
        self.kv: zmq.asyncio.Socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def connect(self) -> None:
        self.kv = bus.make_socket(zmq.ROUTER, context=self._context)
        self.kv_addr = bus.advertised_address(bus.bind(self.kv, self.kv_addr), self.advertise_host)
        self.backend = bus.make_socket(zmq.DEALER, context=self._context, routing_id=self._identity)
        self.control = bus.make_socket(zmq.SUB, context=self._context)
        if self.addresses.curve is not None:
            self.addresses.curve.make_client(self.backend)
            self.addresses.curve.make_client(self.control)
        bus.connect(self.backend, self.addresses.backend)
        bus.subscribe(self.control, self.instance_id, TOPIC_ALL)
        bus.connect(self.control, self.addresses.control)
        self._refresh_stats()
        logger.info("worker %s (%s) connected to %s, kv at %s",
                    self.instance_id, self.role, self.addresses.backend, self.kv_addr)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or a Shutdown arrives), then leave cleanly."""
        self._stop = stop
        if self.backend is None:
            self.connect()
        tasks = [
            asyncio.create_task(self._engine_loop(), name="engine"),
            asyncio.create_task(self._backend_loop(), name="backend"),
            asyncio.create_task(self._control_loop(), name="control"),
            asyncio.create_task(self._kv_loop(), name="kv"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            await self._leave()

    async def _leave(self) -> None:
        """Fail what is in flight (the engine goes away with this process) and deregister."""
        # Wait for a step still running in the engine thread before touching the engine.
        await asyncio.get_running_loop().run_in_executor(self._executor, lambda: None)
        self._executor.shutdown(wait=True)
        for request_id in list(self.requests):
            await self._fail(request_id, 503, f"worker {self.instance_id} is shutting down")
        if self.backend is not None and self.registered:
            await bus.send(self.backend, Deregister(instance_id=self.instance_id))
        self.pushers.close()
        for sock in (self.backend, self.control, self.kv):
            if sock is not None:
                # Linger so Deregister / RequestFinished reach the scheduler before exit.
                bus.close(sock, linger_ms=200 if sock is self.backend else 0)
        logger.info("worker %s stopped", self.instance_id)

    # ---- the engine loop ----------------------------------------------------------------

    async def _engine_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._apply_pending()
            self._refresh_stats()
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._pending:
                    self._check_memory_when_idle()
                    await self._wake.wait()
                continue
            try:
                outputs = await loop.run_in_executor(self._executor, self.engine.step)
            except Exception:
                # A bug in one step must not take the worker down: fail what the engine held
                # (its state for those requests is unknown) and keep serving.
                logger.exception("engine step failed; failing %d request(s)", len(self.requests))
                for request_id in list(self.requests):
                    self.engine.abort_request(request_id)
                    await self._fail(request_id, 500, "internal error in the engine")
                continue
            for output in outputs:
                await self._emit(output)
            # Let receivers run between steps even when every send completed synchronously.
            await asyncio.sleep(0)

    def _check_memory_when_idle(self) -> None:
        """Audit the page pool once per idle period: every page free XOR referenced, refcounts
        equal to page-table references. Cheap (O(pages)) and off the hot path."""
        steps = self.engine.stats.steps
        if steps == self._audited_at_step:
            return
        self._audited_at_step = steps
        try:
            self.engine.check_integrity()
        except AssertionError as exc:
            logger.error("KV page pool integrity check failed on %s: %s", self.instance_id, exc)
            self.integrity_failures += 1
        self._refresh_stats()

    async def _apply_pending(self) -> None:
        while self._pending:
            msg = self._pending.popleft()
            if isinstance(msg, Assign):
                await self._add(msg)
            elif isinstance(msg, AbortRequest) and msg.request_id in self.requests:
                self.engine.abort_request(msg.request_id)
                state = self.requests.pop(msg.request_id)
                logger.debug("aborted %s", msg.request_id)
                await self._finished(msg.request_id, state, "abort")
            elif isinstance(msg, FinishChoice) and msg.request_id in self.requests:
                await self._finish_choice(msg.request_id, msg.index)

    async def _add(self, msg: Assign) -> None:
        if msg.request_id in self.requests:
            await self.pushers.send(msg.tokens_addr, RequestError(
                request_id=msg.request_id, code=409, message=f"request id {msg.request_id!r} is in use"))
            return
        try:
            params = SamplingParams.from_dict(msg.sampling)
            seqs = self.engine.add_request(msg.request_id, list(msg.prompt_ids), params, priority=msg.priority)
        except (ValueError, TypeError) as exc:
            await self._reject(msg, 400, str(exc))
            return
        except Exception as exc:
            logger.exception("could not add request %s", msg.request_id)
            await self._reject(msg, 500, f"internal error: {type(exc).__name__}")
            return
        self.requests[msg.request_id] = _Request(msg.tokens_addr, len(seqs), len(msg.prompt_ids))
        self.requests_total += 1

    async def _reject(self, msg: Assign, code: int, message: str) -> None:
        logger.info("rejected %s: %s", msg.request_id, message)
        await self.pushers.send(msg.tokens_addr, RequestError(request_id=msg.request_id, code=code, message=message))
        await self._send_backend(RequestFinished(
            request_id=msg.request_id, instance_id=self.instance_id, finish_reason="error",
            num_prompt_tokens=len(msg.prompt_ids), num_output_tokens=0,
        ))

    async def _emit(self, output: Any) -> None:
        state = self.requests.get(output.request_id)
        if state is None:
            return
        state.num_output_tokens += len(output.new_token_ids)
        await self.pushers.send(state.tokens_addr, token_delta(output))
        if output.finish_reason is not None:
            state.finished.add(output.index)
            if len(state.finished) >= state.n:
                del self.requests[output.request_id]
                await self._finished(output.request_id, state, output.finish_reason)

    async def _finish_choice(self, request_id: str, index: int) -> None:
        """Stop one choice the gateway already ended (stop string); its pages are freed now."""
        state = self.requests[request_id]
        if index in state.finished or not 0 <= index < state.n:
            return
        self.engine.finish_sequence(request_id, index, "stop")
        state.finished.add(index)
        if len(state.finished) >= state.n:
            del self.requests[request_id]
            await self._finished(request_id, state, "stop")

    async def _finished(self, request_id: str, state: _Request, reason: str) -> None:
        await self._send_backend(RequestFinished(
            request_id=request_id, instance_id=self.instance_id, finish_reason=reason,
            num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
        ))

    async def _fail(self, request_id: str, code: int, message: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        await self.pushers.send(state.tokens_addr, RequestError(request_id=request_id, code=code, message=message))
        await self._finished(request_id, state, "error")

    async def _send_backend(self, msg: Message) -> None:
        if self.backend is not None:
            await bus.send(self.backend, msg)

    def _refresh_stats(self) -> None:
        """Snapshot the engine's load; only called on the loop thread between steps."""
        stats = dict(self.engine.load_stats())
        stats.update(
            max_num_seqs=int(getattr(getattr(self.engine, "config", None), "max_num_seqs", 0) or 0),
            pid=os.getpid(),
            draining=self.draining,
            requests=len(self.requests),
            requests_total=self.requests_total,
            dropped_messages=self.pushers.dropped,
            integrity_failures=self.integrity_failures,
            audited_at_step=self._audited_at_step,
        )
        self._stats = stats

    # ---- receivers ----------------------------------------------------------------------

    async def _backend_loop(self) -> None:
        while True:
            _, msg, _ = await bus.recv(self.backend)
            if isinstance(msg, (Assign, AbortRequest, FinishChoice)):
                self._pending.append(msg)
                self._wake.set()
            elif isinstance(msg, RegisterAck):
                if msg.accepted and not self.registered:
                    logger.info("worker %s registered", self.instance_id)
                elif not msg.accepted:
                    logger.info("scheduler did not accept %s (%s): registering again", self.instance_id, msg.reason)
                    await self._send_backend(self._register_message())
                self.registered = msg.accepted
            else:
                logger.warning("dropped %s on the backend socket: not for a worker", msg.TAG)

    async def _control_loop(self) -> None:
        while True:
            _, msg, _ = await bus.recv(self.control)
            if isinstance(msg, RoleFlip) and msg.instance_id == self.instance_id:
                if msg.role not in ROLES:
                    logger.warning("ignored flip to unknown role %r", msg.role)
                    continue
                # Every role is served by the same mixed engine for now: record and report it.
                self.role = msg.role
                await self._send_backend(FlipAck(instance_id=self.instance_id, flip_id=msg.flip_id, role=self.role))
            elif isinstance(msg, Drain) and msg.instance_id == self.instance_id:
                self.draining = True
            elif isinstance(msg, Shutdown):
                logger.info("shutdown ordered by the scheduler")
                if self._stop is not None:
                    self._stop.set()
            else:
                logger.warning("dropped %s on the control socket: not handled by a worker", msg.TAG)

    async def _kv_loop(self) -> None:
        while True:
            identity, msg, _ = await bus.recv(self.kv)
            if isinstance(msg, KvTransferHeader):
                await bus.send(self.kv, KvTransferAck(
                    request_id=msg.request_id, ok=False, reason="KV transfer is not supported by this worker yet",
                ), identity=identity)
            else:
                logger.warning("dropped %s on the kv socket from %r: not a KV message", msg.TAG, identity)

    # ---- registration and heartbeats ----------------------------------------------------

    def _register_message(self) -> Register:
        return Register(
            instance_id=self.instance_id, role=self.role, kv_addr=self.kv_addr, num_pages=int(self.engine.num_pages),
            page_size=int(self.engine.page_size), model=str(self.engine.model_path),
            max_model_len=int(self.engine.max_model_len),
        )

    def heartbeat_message(self) -> Heartbeat:
        stats = self._stats
        prefix = stats.get("prefix_cache") or {}
        return Heartbeat(
            instance_id=self.instance_id, role=self.role, waiting=int(stats.get("waiting", 0)),
            running=int(stats.get("running", 0)), free_pages=int(stats.get("free_pages", 0)),
            total_pages=int(stats.get("num_pages", 0)), prefix_hit_rate=float(prefix.get("prefix_hit_rate", 0.0)),
            stats=stats,
        )

    async def _heartbeat_loop(self) -> None:
        while True:
            # Until acknowledged, keep registering: the scheduler may start after us or restart.
            msg = self.heartbeat_message() if self.registered else self._register_message()
            await self._send_backend(msg)
            await asyncio.sleep(self.heartbeat_interval_s)
