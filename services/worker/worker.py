"""The worker process: one engine, driven by assignments from the scheduler over the bus.

Sockets: DEALER to the scheduler's backend (Register, Heartbeat, RequestFinished, RequestHandoff,
FlipAck in; RegisterAck, Assign, AbortRequest out), SUB on the control PUB (topics: own id and
`all`), a bound `kv` ROUTER where prefill workers hand sequences over (`kv_receiver`), DEALERs to
decode workers' kv sockets (`kv_sender`), and PUSH sockets to the gateways' tokens addresses.

Roles are a policy over one engine (DESIGN.md §1): an Assign that names decode candidates is
prefilled here and its KV handed over; one without is served whole. A role flip changes which
work the scheduler sends and which KV this worker accepts, never what is already running.

The engine is not thread-safe and its step is blocking CPU work, so every engine call (step,
add, abort, KV export/import, stats) runs on the one engine thread, one at a time, while the
asyncio loop keeps receiving and heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
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
    KvSnapshotRequest,
    KvTransferBegin,
    Message,
    Register,
    RegisterAck,
    RequestError,
    RequestFinished,
    RequestHandoff,
    RoleFlip,
    Shutdown,
)
from common.service_config import ServiceAddresses
from services.decode.kv_receiver import KvReceiver
from services.prefill.kv_sender import DEFAULT_TRANSFER_TIMEOUT_S, HandoffRequest, KvSender
from services.worker.kv_tiering import KvTiering
from common.gateway_push import GatewayPushers, token_delta
from services.worker.request_state import RequestState
from services.worker.role_state import ROLES, RoleState

logger = logging.getLogger(__name__)

__all__ = ["Worker", "ROLES", "DEFAULT_HEARTBEAT_INTERVAL_S"]
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5


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
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        kvstore: Any = None,
    ) -> None:
        self.engine = engine
        self.addresses = addresses
        self.instance_id = instance_id
        self.roles = RoleState(role)
        self.kv_addr = kv_addr or addresses.kv_addr(instance_id)
        self.advertise_host = advertise_host
        self.heartbeat_interval_s = heartbeat_interval_s
        self.registered = False
        self.draining = False
        self.requests: dict[str, RequestState] = {}
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
        self._stats_at = 0.0  # monotonic time of the last refresh
        self.pushers = GatewayPushers(self._context)
        # Unique per process: tells the scheduler a restarted worker from a repeated Register.
        self._identity = f"{instance_id}#{uuid.uuid4().hex[:8]}".encode()
        self.backend: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None
        self.kv: zmq.asyncio.Socket | None = None
        self.sender = KvSender(engine, self._on_engine, instance_id, self._context, transfer_timeout_s)
        # A reservation outlives the sender's own timeouts many times over: under load the sender
        # may wait behind long steps to gather the layers, and expiring early fails the transfer.
        self.receiver = KvReceiver(engine, self._on_engine, self._decode_refusal, self._on_kv_landed,
                                   max(30.0, 6 * transfer_timeout_s))
        self._handoffs: set[asyncio.Task] = set()
        self._load_dropped = False  # a request ended since the last heartbeat
        self.tiering = KvTiering(engine, self._on_engine, instance_id, self._send_backend, kvstore)

    @property
    def role(self) -> str:
        return self.roles.role

    async def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread, after whatever engine work is in progress."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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
        self._stats = dict(self.engine.load_stats())
        logger.info("worker %s (%s) connected to %s, kv at %s",
                    self.instance_id, self.role, self.addresses.backend, self.kv_addr)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or a Shutdown arrives), then leave cleanly."""
        self._stop = stop
        if self.backend is None:
            self.connect()
        await self.tiering.start()
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
        for task in self._handoffs:
            task.cancel()
        await self.receiver.close()
        await self.tiering.close()
        # Wait for a step still running in the engine thread before touching the engine.
        await self._on_engine(lambda: None)
        self._executor.shutdown(wait=True)
        for request_id in list(self.requests):
            await self._fail(request_id, 503, f"worker {self.instance_id} is shutting down")
        if self.backend is not None and self.registered:
            await bus.send(self.backend, Deregister(instance_id=self.instance_id))
        self.pushers.close()
        self.sender.close()
        for sock in (self.backend, self.control, self.kv):
            if sock is not None:
                # Linger so Deregister / RequestFinished reach the scheduler before exit.
                bus.close(sock, linger_ms=200 if sock is self.backend else 0)
        logger.info("worker %s stopped", self.instance_id)

    # ---- the engine loop ----------------------------------------------------------------

    async def _engine_loop(self) -> None:
        while True:
            await self._apply_pending()
            # Stats cost an engine-thread hop: refresh them when they are about to be read (a
            # heartbeat is due, the load just dropped, or the engine goes idle), not every step.
            stale = time.monotonic() - self._stats_at >= self.heartbeat_interval_s / 2
            if stale or self._load_dropped or not self.engine.has_unfinished():
                await self._refresh_stats()
            if self._load_dropped and self.registered:
                # A request ended: report the lighter load now, not up to a heartbeat later, so
                # the next request is not routed on a stale queue (KV-aware routing counts it).
                self._load_dropped = False
                await self._send_backend(self.heartbeat_message())
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._pending:
                    await self._check_memory_when_idle()
                    await self._wake.wait()
                continue
            try:
                outputs = await self._on_engine(self.engine.step)
            except Exception:
                # A bug in one step must not take the worker down: fail what the engine held
                # (its state for those requests is unknown) and keep serving.
                logger.exception("engine step failed; failing %d request(s)", len(self.requests))
                for request_id in list(self.requests):
                    await self._on_engine(self.engine.abort_request, request_id)
                    await self._fail(request_id, 500, "internal error in the engine")
                continue
            # Pages this step cached reach the scheduler's prefix index before the tokens reach
            # the client, so a follow-up request is routed knowing where its prefix is.
            await self.tiering.flush_events()
            for output in outputs:
                await self._emit(output)
            # Let receivers run between steps even when every send completed synchronously.
            await asyncio.sleep(0)

    async def _check_memory_when_idle(self) -> None:
        """Audit the page pool once per idle period: every page free XOR referenced, refcounts
        equal to page-table references. Cheap (O(pages)) and off the hot path."""
        steps = self.engine.stats.steps
        if steps == self._audited_at_step or self.sender.in_flight or self.receiver.stats()["kv_incoming"]:
            return
        self._audited_at_step = steps
        try:
            await self._on_engine(self.engine.check_integrity)
        except AssertionError as exc:
            logger.error("KV page pool integrity check failed on %s: %s", self.instance_id, exc)
            self.integrity_failures += 1
        await self._refresh_stats()

    async def _apply_pending(self) -> None:
        while self._pending:
            msg = self._pending.popleft()
            if isinstance(msg, Assign):
                await self._add(msg)
            elif isinstance(msg, AbortRequest):
                await self._abort(msg.request_id)
            elif isinstance(msg, FinishChoice) and msg.request_id in self.requests:
                await self._finish_choice(msg.request_id, msg.index)

    async def _abort(self, request_id: str) -> None:
        """Stop a request wherever it is here: running, held for a hand-off, or KV arriving."""
        if await self.receiver.abort(request_id):
            logger.debug("aborted incoming %s", request_id)
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        await self._on_engine(self.engine.abort_request, request_id)
        logger.debug("aborted %s", request_id)
        await self._finished(request_id, state, "abort")

    async def _add(self, msg: Assign) -> None:
        if msg.request_id in self.requests:
            await self.pushers.send(msg.tokens_addr, RequestError(
                request_id=msg.request_id, code=409, message=f"request id {msg.request_id!r} is in use"))
            return
        handoff = None
        try:
            params = SamplingParams.from_dict(msg.sampling)
            # Only single-choice requests are handed over; the scheduler serves n > 1 whole.
            hold = bool(msg.decode_candidates) and params.n == 1
            if hold:
                handoff = HandoffRequest(
                    request_id=msg.request_id, sampling=msg.sampling, priority=msg.priority,
                    tokens_addr=msg.tokens_addr, arrival_time=msg.arrival_time,
                    candidates=[list(c[:2]) for c in msg.decode_candidates if len(c) >= 2],
                )

            def add() -> tuple[list, dict[str, int]]:
                # One engine call: pages fetched from the kvstore land right before admission.
                loaded = self.tiering.load(msg.request_id, list(msg.prompt_ids))
                return self.engine.add_request(msg.request_id, list(msg.prompt_ids), params, priority=msg.priority,
                                               hold_after_prefill=hold), loaded

            seqs, loaded = await self._on_engine(add)
        except (ValueError, TypeError) as exc:
            await self._reject(msg, 400, str(exc))
            return
        except Exception as exc:
            logger.exception("could not add request %s", msg.request_id)
            await self._reject(msg, 500, f"internal error: {type(exc).__name__}")
            return
        self.requests[msg.request_id] = RequestState(msg.tokens_addr, len(seqs), len(msg.prompt_ids), handoff=handoff,
                                                 from_store=loaded)
        self.requests_total += 1
        self.roles.started("prefill")

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
        now = time.monotonic()
        if state.first_token_at is None:
            state.first_token_at = now
            state.ttft_s = now - state.started_at
            self.tiering.count_hit(output.num_cached_tokens, state.from_store)
        state.num_output_tokens += len(output.new_token_ids)
        state.tokens_here += len(output.new_token_ids)
        await self.pushers.send(state.tokens_addr, token_delta(output))
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
        taker = await self.sender.hand_off(state.handoff)
        if taker is not None:
            # The decode worker owns it now and reports it to the scheduler (RequestHandoff).
            self.requests.pop(request_id, None)
            self._load_dropped = True
        else:
            state.handoff = None  # decoding here: this worker finishes it like any request
        self._wake.set()

    def _queue(self, msg: Message) -> None:
        """Hand a message to the engine loop (applied between steps, in arrival order)."""
        self._pending.append(msg)
        self._wake.set()

    async def _on_kv_landed(self, begin: KvTransferBegin) -> None:
        """A sequence's KV arrived and it joined the running batch: this worker owns the request."""
        self.requests[begin.request_id] = RequestState(
            begin.tokens_addr, 1, len(begin.prompt_ids), num_output_tokens=len(begin.output_ids),
            first_token_at=time.monotonic(), ttft_s=begin.ttft_s, from_kv=True,
        )
        self.requests_total += 1
        self.roles.started("decode")
        await self._send_backend(RequestHandoff(
            request_id=begin.request_id, from_instance=begin.source_instance, to_instance=self.instance_id,
            ttft_s=begin.ttft_s,
        ))
        self._wake.set()

    def _decode_refusal(self) -> str | None:
        if self.draining:
            return f"worker {self.instance_id} is draining"
        if not self.roles.takes_decode_work():
            return f"worker {self.instance_id} is in the {self.role} role"
        return None

    async def _finish_choice(self, request_id: str, index: int) -> None:
        """Stop one choice the gateway already ended (stop string); its pages are freed now."""
        state = self.requests[request_id]
        if index in state.finished or not 0 <= index < state.n:
            return
        await self._on_engine(self.engine.finish_sequence, request_id, index, "stop")
        state.finished.add(index)
        if len(state.finished) >= state.n:
            del self.requests[request_id]
            await self._finished(request_id, state, "stop")

    async def _finished(self, request_id: str, state: RequestState, reason: str) -> None:
        self._load_dropped = True
        await self._send_backend(RequestFinished(
            request_id=request_id, instance_id=self.instance_id, finish_reason=reason,
            num_prompt_tokens=state.num_prompt_tokens, num_output_tokens=state.num_output_tokens,
            ttft_s=-1.0 if state.from_kv else state.ttft_s, tpot_s=state.tpot_s(time.monotonic()),
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

    async def _refresh_stats(self) -> None:
        """Snapshot the engine's load (on the engine thread: it reads the engine's tables)."""
        stats = dict(await self._on_engine(self.engine.load_stats))
        stats.update(
            max_num_seqs=int(getattr(getattr(self.engine, "config", None), "max_num_seqs", 0) or 0),
            pid=os.getpid(),
            draining=self.draining,
            requests=len(self.requests),
            requests_total=self.requests_total,
            dropped_messages=self.pushers.dropped,
            integrity_failures=self.integrity_failures,
            audited_at_step=self._audited_at_step,
            **self.roles.stats(),
            **self.sender.stats(),
            **self.receiver.stats(),
            **self.tiering.stats(),
        )
        self._stats = stats
        self._stats_at = time.monotonic()

    # ---- receivers ----------------------------------------------------------------------

    async def _backend_loop(self) -> None:
        while True:
            _, msg, _ = await bus.recv(self.backend)
            if isinstance(msg, Assign) and self.tiering.client is not None:
                # Reload its prefix from the kvstore first, off the engine loop.
                self.tiering.reload_then(msg, self._queue)
            elif isinstance(msg, AbortRequest) and self.tiering.abort_reload(msg.request_id):
                pass
            elif isinstance(msg, (Assign, AbortRequest, FinishChoice)):
                self._queue(msg)
            elif isinstance(msg, KvSnapshotRequest):
                await self.tiering.send_snapshot()
            elif isinstance(msg, RegisterAck):
                if msg.accepted and not self.registered:
                    logger.info("worker %s registered", self.instance_id)
                    # Report the load at once: the registry has no stats for us until then.
                    self.registered = True
                    await self._send_backend(self.heartbeat_message())
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
                old = self.role
                if self.roles.flip(msg.role, msg.flip_id):
                    # In-flight work keeps running; only what is admitted next changes.
                    logger.info("worker %s flipped %s -> %s (flip %d)", self.instance_id, old, self.role, msg.flip_id)
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
            identity, msg, tensors = await bus.recv(self.kv)
            try:
                await self.receiver.handle(self.kv, identity, msg, tensors)
            except Exception:
                # One bad transfer must not stop this worker from taking the next.
                logger.exception("error handling %s on the kv socket", msg.TAG)

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
            await self.receiver.expire()
            await asyncio.sleep(self.heartbeat_interval_s)
