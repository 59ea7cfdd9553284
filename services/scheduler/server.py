"""The scheduler process: frontend/backend/control sockets, request table, liveness, status.

Gateways talk to the frontend ROUTER (Submit, Abort, StatusQuery, GatewayHello); workers to the
backend ROUTER (Register, Heartbeat, Deregister, RequestFinished, FlipAck); the control PUB
carries orders to workers. Errors about a request (no worker, worker died) go to the owning
gateway's tokens socket, the same place workers send theirs, so a gateway has one source of
per-request results.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.protocol import (
    Abort,
    AbortRequest,
    FinishChoice,
    Assign,
    Deregister,
    FlipAck,
    GatewayHello,
    Heartbeat,
    Message,
    Register,
    RegisterAck,
    RequestError,
    RequestFinished,
    StatusQuery,
    StatusReply,
    Submit,
)
from common.service_config import ServiceAddresses
from common.worker.outputs import GatewayPushers
from services.scheduler.registry import DEFAULT_HEARTBEAT_TIMEOUT_S, Instance, RegisterOutcome, Registry
from services.scheduler.router import Router

logger = logging.getLogger(__name__)

__all__ = ["SchedulerServer", "RequestEntry"]

@dataclass
class RequestEntry:
    request_id: str
    gateway_identity: bytes
    gateway_id: str
    tokens_addr: str
    instance_id: str
    submitted_at: float


class SchedulerServer:
    def __init__(
        self,
        addresses: ServiceAddresses,
        heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S,
        reap_interval_s: float = 0.5,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.addresses = addresses
        self.registry = Registry(heartbeat_timeout_s)
        self.router = Router()
        self.reap_interval_s = reap_interval_s
        self.requests: dict[str, RequestEntry] = {}
        self.gateways: dict[str, tuple[bytes, str]] = {}  # gateway_id -> (identity, tokens_addr)
        self._context = context or zmq.asyncio.Context.instance()
        self.pushers = GatewayPushers(self._context)
        self.frontend: zmq.asyncio.Socket | None = None
        self.backend: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def bind(self) -> None:
        self.frontend = bus.make_socket(zmq.ROUTER, context=self._context)
        self.backend = bus.make_socket(zmq.ROUTER, context=self._context)
        # A restarted worker may reconnect before ZeroMQ noticed the old connection died.
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.control = bus.make_socket(zmq.PUB, context=self._context)
        if self.addresses.curve is not None:
            for sock in (self.frontend, self.backend, self.control):
                self.addresses.curve.make_server(sock)
        bus.bind(self.frontend, self.addresses.frontend)
        bus.bind(self.backend, self.addresses.backend)
        bus.bind(self.control, self.addresses.control)
        logger.info(
            "scheduler listening: frontend=%s backend=%s control=%s",
            self.addresses.frontend, self.addresses.backend, self.addresses.control,
        )

    def close(self) -> None:
        for sock in (self.frontend, self.backend, self.control):
            if sock is not None:
                bus.close(sock, linger_ms=0)
        self.pushers.close()

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; sockets are closed (and ipc files removed) on the way out."""
        if self.frontend is None:
            self.bind()
        tasks = [
            asyncio.create_task(self._receive_loop(self.frontend, self._on_frontend), name="frontend"),
            asyncio.create_task(self._receive_loop(self.backend, self._on_backend), name="backend"),
            asyncio.create_task(self._reap_loop(), name="reaper"),
        ]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            self.close()

    async def _receive_loop(self, sock: zmq.asyncio.Socket, handler) -> None:
        while True:
            identity, msg, _ = await bus.recv(sock)  # malformed messages are dropped and logged there
            try:
                await handler(identity, msg)
            except Exception:
                # A handler bug on one message must not stop the scheduler.
                logger.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            for instance in self.registry.expire():
                logger.warning(
                    "instance %s missed heartbeats for %.1f s: removed, failing %d request(s)",
                    instance.instance_id, self.registry.heartbeat_timeout_s, len(instance.inflight),
                )
                await self._fail_requests_of(instance, "worker died")

    # ---- frontend: gateways -------------------------------------------------------------

    async def _on_frontend(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Submit):
            await self._on_submit(identity, msg)
        elif isinstance(msg, Abort):
            await self._on_abort(msg)
        elif isinstance(msg, FinishChoice):
            entry = self.requests.get(msg.request_id)
            instance = self.registry.get(entry.instance_id) if entry is not None else None
            if instance is not None:
                await bus.send(self.backend, msg, identity=instance.identity)
        elif isinstance(msg, StatusQuery):
            await bus.send(self.frontend, StatusReply(instances=self.registry.describe()), identity=identity)
        elif isinstance(msg, GatewayHello):
            logger.info("gateway %s connected (tokens at %s)", msg.gateway_id, msg.tokens_addr)
            self.gateways[msg.gateway_id] = (identity, msg.tokens_addr)
        else:
            logger.warning("dropped %s on the frontend socket from %r: not a gateway message", msg.TAG, identity)

    async def _on_submit(self, identity: bytes, msg: Submit) -> None:
        if not msg.tokens_addr.startswith(("ipc://", "tcp://")):
            # Nowhere to send tokens or even an error: refuse before a worker spends time on it.
            logger.warning("dropped submit %s from %r: bad tokens address %r", msg.request_id, identity,
                           msg.tokens_addr[:100])
            return
        if msg.request_id in self.requests:
            await self._send_error(msg.tokens_addr, msg.request_id, 409, f"request id {msg.request_id!r} is in use")
            return
        instance = self.router.choose(self.registry.instances(), len(msg.prompt_ids))
        if instance is None:
            await self._send_error(msg.tokens_addr, msg.request_id, 503, "no worker available")
            return
        assign = Assign(
            request_id=msg.request_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling, priority=msg.priority,
            gateway_id=msg.gateway_id, tokens_addr=msg.tokens_addr, prefill_instance=instance.instance_id,
            decode_instance=instance.instance_id, arrival_time=msg.arrival_time,
        )
        self.requests[msg.request_id] = RequestEntry(
            msg.request_id, identity, msg.gateway_id, msg.tokens_addr, instance.instance_id, time.monotonic()
        )
        self.registry.assign(instance.instance_id, msg.request_id)
        logger.debug("request %s -> %s", msg.request_id, instance.instance_id)
        await bus.send(self.backend, assign, identity=instance.identity)

    async def _on_abort(self, msg: Abort) -> None:
        entry = self.requests.pop(msg.request_id, None)
        if entry is None:
            # Finished already, or submitted before this scheduler (re)started: a worker may still
            # hold it, and an unknown id is a no-op for a worker, so ask every one of them.
            for instance in self.registry.instances():
                await bus.send(self.backend, AbortRequest(request_id=msg.request_id), identity=instance.identity)
            return
        self.registry.release(entry.instance_id, msg.request_id)
        instance = self.registry.get(entry.instance_id)
        if instance is not None:
            logger.debug("abort %s (%s) -> %s", msg.request_id, msg.reason, instance.instance_id)
            await bus.send(self.backend, AbortRequest(request_id=msg.request_id), identity=instance.identity)

    # ---- backend: workers ---------------------------------------------------------------

    async def _on_backend(self, identity: bytes, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            if self.registry.heartbeat(identity, msg) is None:
                # Unknown sender (e.g. this scheduler restarted): ask it to register again.
                await bus.send(
                    self.backend,
                    RegisterAck(instance_id=msg.instance_id, accepted=False, reason="not registered; register again"),
                    identity=identity,
                )
        elif isinstance(msg, RequestFinished):
            entry = self.requests.get(msg.request_id)
            if entry is not None and entry.instance_id == msg.instance_id:
                del self.requests[msg.request_id]
                self.registry.release(msg.instance_id, msg.request_id)
        elif isinstance(msg, Register):
            await self._on_register(identity, msg)
        elif isinstance(msg, Deregister):
            instance = self.registry.deregister(identity, msg.instance_id)
            if instance is not None:
                logger.info("instance %s deregistered", msg.instance_id)
                await self._fail_requests_of(instance, "worker left")
        elif isinstance(msg, FlipAck):
            logger.info("instance %s is now %s (flip %d)", msg.instance_id, msg.role, msg.flip_id)
        else:
            logger.warning("dropped %s on the backend socket from %r: not a worker message", msg.TAG, identity)

    async def _on_register(self, identity: bytes, msg: Register) -> None:
        outcome, instance, old = self.registry.register(identity, msg)
        if outcome is RegisterOutcome.REPLACED and old is not None:
            logger.warning("instance %s restarted: failing %d request(s) of its old process",
                           msg.instance_id, len(old.inflight))
            await self._fail_requests_of(old, "worker restarted")
        if outcome is not RegisterOutcome.REFRESHED:
            logger.info("instance %s registered: role=%s pages=%d model=%s",
                        msg.instance_id, msg.role, msg.num_pages, msg.model)
        await bus.send(self.backend, RegisterAck(instance_id=msg.instance_id, accepted=True), identity=identity)

    async def _fail_requests_of(self, instance: Instance, reason: str) -> None:
        for request_id in sorted(instance.inflight):
            entry = self.requests.get(request_id)
            if entry is None or entry.instance_id != instance.instance_id:
                continue
            del self.requests[request_id]
            await self._send_error(entry.tokens_addr, request_id, 503, f"{reason} ({instance.instance_id})")
        instance.inflight.clear()

    # ---- to gateways --------------------------------------------------------------------

    async def _send_error(self, tokens_addr: str, request_id: str, code: int, message: str) -> None:
        """Tell the owning gateway a request failed; never blocks on a gone gateway."""
        logger.info("request %s failed: %d %s", request_id, code, message)
        await self.pushers.send(tokens_addr, RequestError(request_id=request_id, code=code, message=message))
