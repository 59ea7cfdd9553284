"""The worker process: one engine, driven by assignments from the scheduler over the bus.

Sockets: DEALER to the scheduler's backend (sends Register and Heartbeat, built by `load_report`,
and RequestFinished, RequestHandoff, FlipAck, KvEvent; what it receives is handled in `inbox`),
SUB on the control PUB (topics: own id and `all`; `inbox` too), a bound `kv` ROUTER where prefill
workers hand sequences over (`kv_receiver`), DEALERs to decode workers' kv sockets
(`kv_sender`), and PUSH sockets to the gateways' tokens addresses. Each is bound to its channel
end, so it only ever receives messages meant for a worker there.

Roles are a policy over one engine (DESIGN.md §1): an Assign that names decode candidates is
prefilled here and its KV handed over; one without is served whole. A role flip changes which
work the scheduler sends and which KV this worker accepts next, never what is already running
nor a hand-off promised before it (`_decode_admission`). The requests themselves, from
admission to RequestFinished, are kept by `request_book`.

The engine is not thread-safe and its step is blocking CPU work, so every engine call (step,
add, abort, KV export/import, stats) runs on the one engine thread, one at a time, while the
asyncio loop keeps receiving and heartbeating.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.gateway_push import GatewayPushers
from common.kvstore_client import KvStoreClient
from common.protocol import BACKEND, CONTROL, KV, TOPIC_ALL, BackendMessage, Deregister, KvTransferBegin
from common.service_config import ServiceAddresses
from services.decode.kv_receiver import Admission, KvReceiver
from services.prefill.kv_sender import DEFAULT_TRANSFER_TIMEOUT_S, KvSender
from services.worker.engine_api import WorkerEngine
from services.worker.inbox import EngineWork, Inbox
from services.worker.kv_tiering import KvTiering
from services.worker.load_report import LoadReport
from services.worker.request_book import RequestBook
from services.worker.role_state import ROLES, RoleState
from services.worker.watchdog import StepWatchdog

logger = logging.getLogger(__name__)

__all__ = ["Worker", "ROLES", "DEFAULT_HEARTBEAT_INTERVAL_S", "DEFAULT_STEP_WATCHDOG_S"]
DEFAULT_HEARTBEAT_INTERVAL_S = 0.5
DEFAULT_STEP_WATCHDOG_S = 60.0


class Worker:
    def __init__(
        self,
        engine: WorkerEngine,
        addresses: ServiceAddresses,
        instance_id: str,
        role: str = "mixed",
        kv_addr: str | None = None,
        advertise_host: str | None = None,
        heartbeat_interval_s: float = DEFAULT_HEARTBEAT_INTERVAL_S,
        context: zmq.asyncio.Context | None = None,
        executor: ThreadPoolExecutor | None = None,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        kvstore: KvStoreClient | None = None,
        step_watchdog_s: float = DEFAULT_STEP_WATCHDOG_S,
    ) -> None:
        self.engine = engine
        self.watchdog = StepWatchdog(step_watchdog_s, instance_id)
        self.addresses = addresses
        self.instance_id = instance_id
        self.roles = RoleState(role)
        self.kv_addr = kv_addr or addresses.kv_addr(instance_id)
        self.advertise_host = advertise_host
        self.heartbeat_interval_s = heartbeat_interval_s
        self.draining = False
        self.integrity_failures = 0
        self.audited_at_step = 0
        self._context = context or zmq.asyncio.Context.instance()
        self._pending: deque[EngineWork] = deque()  # applied when the step in progress ends
        self._wake = asyncio.Event()
        self._stop: asyncio.Event | None = None
        # Every engine call that runs torch work happens on this one thread (see worker.main).
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine-step")
        self.report = LoadReport(self, self._on_engine, self._send_backend)
        self.inbox = Inbox(self, self._queue, self._send_backend)
        self.book = RequestBook(self, self._on_engine, self._send_backend, self._wake.set)
        self.pushers = GatewayPushers(self._context)
        # Unique per process: tells the scheduler a restarted worker from a repeated Register,
        # and the gateway which process computed a token (so it can migrate a lost stream).
        self.incarnation = uuid.uuid4().hex[:8]
        self._identity = f"{instance_id}#{self.incarnation}".encode()
        self.backend: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None
        self.kv: zmq.asyncio.Socket | None = None
        self.sender = KvSender(engine, self._on_engine, instance_id, self._context, transfer_timeout_s)
        # A reservation outlives the sender's own timeouts many times over: under load the sender
        # may wait behind long steps to gather the layers, and expiring early fails the transfer.
        self.receiver = KvReceiver(engine, self._on_engine, self._decode_admission, self.book.on_kv_landed,
                                   max(30.0, 6 * transfer_timeout_s))
        self.tiering = KvTiering(engine, self._on_engine, instance_id, self._send_backend, kvstore)

    @property
    def role(self) -> str:
        return self.roles.role

    async def _on_engine(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the engine thread, after whatever engine work is in progress."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- lifecycle ----------------------------------------------------------------------

    def connect(self) -> None:
        self.kv = bus.make_socket(zmq.ROUTER, channel=KV.binder, context=self._context)
        self.kv_addr = bus.advertised_address(bus.bind(self.kv, self.kv_addr), self.advertise_host)
        self.backend = bus.make_socket(zmq.DEALER, channel=BACKEND.connector, context=self._context,
                                       routing_id=self._identity)
        self.control = bus.make_socket(zmq.SUB, channel=CONTROL.connector, context=self._context)
        if self.addresses.curve is not None:
            self.addresses.curve.make_client(self.backend)
            self.addresses.curve.make_client(self.control)
        bus.connect(self.backend, self.addresses.backend)
        bus.subscribe(self.control, self.instance_id, TOPIC_ALL)
        bus.connect(self.control, self.addresses.control)
        self.report.prime()
        logger.info("worker %s (%s) connected to %s, kv at %s",
                    self.instance_id, self.role, self.addresses.backend, self.kv_addr)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set (or a Shutdown arrives), then leave cleanly."""
        self._stop = stop
        if self.backend is None:
            self.connect()
        await self.tiering.start()
        self.watchdog.start()
        tasks = [
            asyncio.create_task(self._engine_loop(), name="engine"),
            asyncio.create_task(self.inbox.backend_loop(self.backend), name="backend"),
            asyncio.create_task(self.inbox.control_loop(self.control), name="control"),
            asyncio.create_task(self._kv_loop(), name="kv"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            await self._leave()

    def stop(self) -> None:
        """Make `run` return (as a Shutdown order does); a no-op before it started."""
        if self._stop is not None:
            self._stop.set()

    async def _leave(self) -> None:
        """Fail what is in flight (the engine goes away with this process) and deregister."""
        self.watchdog.stop()
        self.book.cancel_handoffs()
        await self.receiver.close()
        await self.tiering.close()
        # Wait for a step still running in the engine thread before touching the engine.
        await self._on_engine(lambda: None)
        self._executor.shutdown(wait=True)
        for request_id in list(self.book.requests):
            await self.book.fail(request_id, 503, f"worker {self.instance_id} is shutting down", reason="worker_lost")
        if self.backend is not None and self.report.registered:
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
            stale = self.report.older_than(self.heartbeat_interval_s / 2)
            if stale or self.book.load_dropped or not self.engine.has_unfinished():
                await self.report.refresh()
            if self.book.load_dropped and self.report.registered:
                # A request ended: report the lighter load now, not up to a heartbeat later, so
                # the next request is not routed on a stale queue (KV-aware routing counts it).
                self.book.load_dropped = False
                await self._send_backend(self.report.heartbeat_message())
            if not self.engine.has_unfinished():
                self._wake.clear()
                if not self._pending:
                    await self._check_memory_when_idle()
                    await self._wake.wait()
                continue
            try:
                outputs = await self._on_engine(self._watched_step)
            except Exception:
                # A bug in one step must not take the worker down: fail what the engine held
                # (its state for those requests is unknown) and keep serving.
                logger.exception("engine step failed; failing %d request(s)", len(self.book.requests))
                for request_id in list(self.book.requests):
                    await self._on_engine(self.engine.abort_request, request_id)
                    await self.book.fail(request_id, 500, "internal error in the engine")
                continue
            # Pages this step cached reach the scheduler's prefix index before the tokens reach
            # the client, so a follow-up request is routed knowing where its prefix is.
            await self.tiering.flush_events()
            for output in outputs:
                await self.book.emit(output)
            # Let receivers run between steps even when every send completed synchronously.
            await asyncio.sleep(0)

    def _watched_step(self) -> list:
        """One engine step under the watchdog (on the engine thread)."""
        self.watchdog.step_began()
        try:
            return self.engine.step()
        finally:
            self.watchdog.step_ended()

    async def _check_memory_when_idle(self) -> None:
        """Audit the page pool once per idle period: every page free XOR referenced, refcounts
        equal to page-table references. Cheap (O(pages)) and off the hot path."""
        steps = self.engine.stats.steps
        if steps == self.audited_at_step or self.sender.in_flight or self.receiver.stats()["kv_incoming"]:
            return
        self.audited_at_step = steps
        try:
            await self._on_engine(self.engine.check_integrity)
        except AssertionError as exc:
            logger.error("KV page pool integrity check failed on %s: %s", self.instance_id, exc)
            self.integrity_failures += 1
        await self.report.refresh()

    async def _apply_pending(self) -> None:
        while self._pending:
            await self.book.apply(self._pending.popleft())

    def _queue(self, msg: EngineWork) -> None:
        """Hand a message to the engine loop (applied between steps, in arrival order)."""
        self._pending.append(msg)
        self._wake.set()

    def _decode_admission(self, begin: KvTransferBegin) -> Admission:
        """Whether to take a sequence's KV in: the role decides what is taken next, never a
        promise already made (a candidate named before the latest flip is honoured)."""
        if self.draining:
            return Admission(False, "draining", f"worker {self.instance_id} is draining")
        if self.roles.takes_decode_work():
            return Admission(True, "role")
        if self.roles.named_before_latest_flip(begin.candidate_flip_id):
            return Admission(True, "promised")
        return Admission(False, "role", f"worker {self.instance_id} is in the {self.role} role")

    async def _send_backend(self, msg: BackendMessage) -> None:
        if self.backend is not None:
            await bus.send(self.backend, msg)

    async def _heartbeat_loop(self) -> None:
        while True:
            await self.report.beat()
            await self.receiver.expire()
            await asyncio.sleep(self.heartbeat_interval_s)

    async def _kv_loop(self) -> None:
        while True:
            identity, msg, tensors = await bus.recv(self.kv)
            try:
                await self.receiver.handle(self.kv, identity, msg, tensors)
            except Exception:
                # One bad transfer must not stop this worker from taking the next.
                logger.exception("error handling %s on the kv socket", msg.TAG)
