"""The scheduler process: frontend/backend/control sockets, request table, liveness, status.

Gateways talk to the frontend ROUTER (Submit, Abort, FinishChoice, StatusQuery, GatewayHello,
FlipRequest); workers to the backend ROUTER (Register, Heartbeat, Deregister, RequestFinished,
RequestHandoff, FlipAck, KvEvent); the control PUB carries orders to workers (RoleFlip). Each
socket is bound to its channel end, so a handler table by message type (`_ON_FRONTEND`,
`_ON_BACKEND`) covers everything that can arrive; the bus drops the rest (a Submit it refuses is
still answered with a 400).

The request table (`request_table`) follows each request from its prefill worker to the decode
worker that took its KV over (RequestHandoff), so aborts and failure handling always reach the
worker that holds it; the DP balancer (`dp_migrations`) moves running sequences between decode
workers the same way. The PD
policy (`pd_policy`) sees every heartbeat and latency report and decides role flips on a timer.
Errors about a request (no worker, worker died) go to the owning gateway's tokens socket, the
same place workers send theirs, so a gateway has one source of per-request results.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import torch
import zmq
import zmq.asyncio

from common import bus
from common.aio import run_until_stopped
from common.protocol import (
    BACKEND,
    CONTROL,
    FRONTEND,
    Abort,
    AbortRequest,
    Assign,
    ENCODE_ROLE,
    DecodeCandidate,
    Deregister,
    EncodeRequest,
    EncodeResult,
    FinishChoice,
    FlipAck,
    FlipRequest,
    GatewayHello,
    Heartbeat,
    KvEvent,
    KvSnapshotRequest,
    Message,
    MigrateRequest,
    MigrationResult,
    ProtocolError,
    Register,
    RegisterAck,
    RequestError,
    RequestFinished,
    RequestHandoff,
    RoleFlip,
    StatusQuery,
    StatusReply,
    Submit,
)
from common.bus_guard import invalid_message_counts
from common.gateway_push import GatewayPushers
from common.log_limits import RateLimitedLog
from common.service_config import ServiceAddresses
from services.scheduler.config import SchedulerConfig
from services.scheduler.dp_migrations import DpMigrations
from services.scheduler.encode_pool import EncodePool
from services.scheduler.kv_awareness import KvAwareness
from services.scheduler.liveness import PeerMonitor, judge_disconnect
from services.scheduler.pd_policy import PdPolicy
from services.scheduler.registry import Instance, RegisterOutcome, Registry
from services.scheduler.request_table import RequestTable
from services.scheduler.role_flips import RoleFlips
from services.scheduler.router import Router

logger = logging.getLogger(__name__)
_REFUSED_FLIPS = RateLimitedLog(logger, "refused flip requests")

__all__ = ["SchedulerServer"]

# A handler of one message type: (server, sender identity, message).
Handler = Callable[..., Awaitable[None]]  # (server, identity, msg[, tensors])


class SchedulerServer:
    def __init__(
        self,
        addresses: ServiceAddresses,
        config: SchedulerConfig | None = None,
        reap_interval_s: float = 0.5,
        context: zmq.asyncio.Context | None = None,
        policy: PdPolicy | None = None,
        kv: KvAwareness | None = None,
    ) -> None:
        # The settings (and their defaults) are SchedulerConfig's; `policy` replaces the one it names.
        config = config or SchedulerConfig()
        self.addresses = addresses
        self.registry = Registry(config.heartbeat_timeout, suspect_after_s=config.suspect_after)
        # A fresh token per scheduler process: gateways resubmit what they sent to the last one.
        self.scheduler_id = uuid.uuid4().hex[:12]
        self.monitor: PeerMonitor | None = None
        self.router = Router()
        self.policy = policy or config.make_policy()
        self.policy_name = config.pd_policy
        self.policy_interval_s = config.policy_interval
        self.expected_workers = config.expected_workers
        self.flips = RoleFlips(self.registry, self._publish, self.policy.note_flip)
        self.reap_interval_s = reap_interval_s
        self.requests = RequestTable(self.registry)
        self.balance = DpMigrations(self.registry, self.requests, self._send_migrate, config.balance_settings(),
                                    enabled=config.dp_balance, recompute_below_tokens=config.dp_balance_recompute_below)
        self.balance_interval_s = config.dp_balance_interval_s
        # Multimodal Submits wait here for an encoder under ED-P / E-P-D (`encode_pool`).
        self.encode = EncodePool(config.epd_placement, self.registry, self._send_encode, self._route_submit,
                                 config.encode_timeout)
        self.gateways: dict[str, tuple[bytes, str]] = {}  # gateway_id -> (identity, tokens_addr)
        self._context = context or zmq.asyncio.Context.instance()
        self.kv = kv or KvAwareness(self._context)
        self.pushers = GatewayPushers(self._context)
        self.frontend: zmq.asyncio.Socket | None = None
        self.backend: zmq.asyncio.Socket | None = None
        self.control: zmq.asyncio.Socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------

    def bind(self) -> None:
        self.frontend = bus.make_socket(zmq.ROUTER, channel=FRONTEND.binder, context=self._context)
        self.backend = bus.make_socket(zmq.ROUTER, channel=BACKEND.binder, context=self._context)
        # A restarted worker may reconnect before ZeroMQ noticed the old connection died.
        self.backend.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.control = bus.make_socket(zmq.PUB, channel=CONTROL.binder, context=self._context)
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
        self.monitor = PeerMonitor(self.backend, self._on_peer_disconnect)
        tasks = [
            asyncio.create_task(self.monitor.run(), name="liveness"),
            asyncio.create_task(self._receive_loop(self.frontend, self._ON_FRONTEND, self._on_refused_frontend),
                                name="frontend"),
            asyncio.create_task(self._receive_loop(self.backend, self._ON_BACKEND), name="backend"),
            asyncio.create_task(self._reap_loop(), name="reaper"),
            asyncio.create_task(self._policy_loop(), name="pd-policy"),
        ]
        if self.balance.enabled:
            tasks.append(asyncio.create_task(self._balance_loop(), name="dp-balance"))
        await self.kv.start()
        tasks += [asyncio.create_task(coro) for coro in self.kv.tasks()]
        try:
            await run_until_stopped(stop, tasks)
        finally:
            await self.kv.close()
            self.monitor.close()
            self.close()

    async def _receive_loop(self, sock: zmq.asyncio.Socket, handlers: Mapping[type[Message], Handler],
                            on_refused: bus.OnRefused | None = None) -> None:
        while True:
            # Malformed messages, and those not for this socket's channel end, are dropped there.
            identity, msg, tensors = await bus.recv(sock, on_refused=on_refused)
            try:
                if type(msg) in self._TAKES_TENSORS:
                    await handlers[type(msg)](self, identity, msg, tensors)
                elif tensors:
                    logger.warning("dropped %s from %r: it carries no tensor frames", type(msg).__name__, identity)
                else:
                    await handlers[type(msg)](self, identity, msg)
            except Exception:
                # A handler bug on one message must not stop the scheduler.
                logger.exception("error handling %s from %r", type(msg).__name__, identity)

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(self.reap_interval_s)
            suspects, dead = self.registry.tick()
            await self.encode.expire()
            for instance in suspects:
                logger.warning("instance %s is suspect (%s): no new work", instance.instance_id,
                               instance.suspect_reason)
            for instance in dead:
                await self._instance_died(instance, f"missed heartbeats for {self.registry.heartbeat_timeout_s:.1f} s")

    async def _on_peer_disconnect(self, pid: int | None) -> None:
        """A backend connection closed: recover the requests of a worker that is gone for sure."""
        instance = await judge_disconnect(self.registry, pid)
        if instance is not None:
            await self._instance_died(instance, "its process exited")

    async def _instance_died(self, instance: Instance, why: str) -> None:
        """`instance` was declared dead (and removed): its requests go back to their gateways,
        which migrate them."""
        logger.warning("instance %s (incarnation %s) is dead: %s; %d request(s) to migrate",
                       instance.instance_id, instance.incarnation, why, len(instance.inflight))
        self.policy.forget(instance.instance_id)
        self.kv.forget(instance.instance_id)
        await self._fail_requests_of(instance, "worker died")
        if instance.role == ENCODE_ROLE:
            await self.encode.encoder_gone(instance)

    async def _policy_loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy_interval_s)
            try:
                flips = self.policy.decide()
            except Exception:
                logger.exception("PD policy failed to decide; no flip this round")
                flips = []
            for flip in flips:
                await self.flips.order(flip.instance_id, flip.role, flip.reason)
            await self.flips.resend_unacknowledged()

    async def _balance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.balance_interval_s)
            try:
                await self.balance.tick()
            except Exception:
                logger.exception("DP balance failed to decide; no migration this round")

    async def _send_migrate(self, instance: Instance, msg: MigrateRequest) -> None:
        await bus.send(self.backend, msg, identity=instance.identity)

    async def _on_migration_result(self, identity: bytes, msg: MigrationResult) -> None:
        sender = self.registry.by_identity(identity)
        if sender is not None and sender.instance_id == msg.from_instance:
            self.balance.on_result(msg)

    async def _publish(self, msg: RoleFlip) -> None:
        await bus.send(self.control, msg, topic=msg.instance_id)

    async def flip(self, instance_id: str, role: str, reason: str) -> bool:
        """Order an instance into `role` on the control socket; False when it cannot be done."""
        return await self.flips.order(instance_id, role, reason)

    def status_summary(self) -> dict:
        pools = Counter(instance.role for instance in self.registry.instances())
        return {
            "scheduler_id": self.scheduler_id,
            "dead_instances": self.registry.dead_instances(),
            "pd_policy": self.policy_name,
            "bus_invalid_messages": invalid_message_counts(),  # dropped inbound bus messages, by kind
            "pools": dict(pools),
            "workers": self.registry.workers(self.expected_workers),
            **self.flips.summary(),
            "requests": len(self.requests),
            "policy": self.policy.snapshot() if hasattr(self.policy, "snapshot") else {},
            **self.kv.summary(),
            **self.balance.summary(),
            **self.encode.summary(),
        }

    # ---- frontend: gateways -------------------------------------------------------------

    async def _on_refused_frontend(self, identity: bytes | None, error: ProtocolError) -> None:
        """A Submit the codec refused (e.g. an unknown or mistyped sampling parameter) is still
        answered, as a worker answers an impossible one: a 400 to its tokens address."""
        fields = error.fields or {}
        request_id, tokens_addr = fields.get("request_id"), fields.get("tokens_addr")
        if (error.tag == Submit.TAG and isinstance(request_id, str) and isinstance(tokens_addr, str)
                and tokens_addr.startswith(("ipc://", "tcp://"))):
            await self._send_error(tokens_addr, request_id, 400, error.reason)

    async def _on_finish_choice(self, identity: bytes, msg: FinishChoice) -> None:
        entry = self.requests.get(msg.request_id)
        instance = self.registry.get(entry.instance_id) if entry is not None else None
        if instance is not None:
            await bus.send(self.backend, msg, identity=instance.identity)
        elif entry is None:
            # Submitted before this scheduler (re)started: whoever holds it stops it (an unknown
            # id is a no-op for a worker).
            for other in self.registry.instances():
                await bus.send(self.backend, msg, identity=other.identity)

    async def _on_status_query(self, identity: bytes, msg: StatusQuery) -> None:
        reply = StatusReply(instances=self.registry.describe(), scheduler=self.status_summary())
        await bus.send(self.frontend, reply, identity=identity)

    async def _on_flip_request(self, identity: bytes, msg: FlipRequest) -> None:
        # The frontend checks no credentials of its own: over ipc the run directory's file mode
        # decides who may connect, over tcp only CurveZMQ (authorised client keys) does. Without
        # curve anyone who reaches the port could reorder the pools, so the order is refused.
        if self.addresses.frontend.startswith("tcp://") and self.addresses.curve is None:
            _REFUSED_FLIPS.log(repr(identity)[:80], "refused a FlipRequest (%s -> %s) from %r: the frontend is "
                               "tcp without CurveZMQ, so the sender is unauthenticated", msg.instance_id,
                               msg.role[:40], identity)
            return
        await self.flip(msg.instance_id, msg.role, "operator")

    async def _on_gateway_hello(self, identity: bytes, msg: GatewayHello) -> None:
        logger.info("gateway %s connected (tokens at %s)", msg.gateway_id, msg.tokens_addr)
        self.gateways[msg.gateway_id] = (identity, msg.tokens_addr)

    async def _on_submit(self, identity: bytes, msg: Submit, tensors: Sequence[torch.Tensor] = ()) -> None:
        if not msg.tokens_addr.startswith(("ipc://", "tcp://")):
            # Nowhere to send tokens or even an error: refuse before a worker spends time on it.
            logger.warning("dropped submit %s from %r: bad tokens address %r", msg.request_id, identity,
                           msg.tokens_addr[:100])
            return
        known = self.requests.get(msg.request_id)
        if known is not None:
            if known.gateway_id == msg.gateway_id:
                return  # the same gateway sent it again (it could not tell it arrived): done already
            await self._send_error(msg.tokens_addr, msg.request_id, 409, f"request id {msg.request_id!r} is in use")
            return
        if len(tensors) != len(msg.images):
            await self._send_error(msg.tokens_addr, msg.request_id, 400,
                                   f"{len(msg.images)} image(s) but {len(tensors)} tensor frame(s)")
            return
        await self.encode.submit(identity, msg, tensors)

    async def _route_submit(self, identity: bytes, msg: Submit, tensors: list[torch.Tensor]) -> None:
        """Pick the worker(s) of a checked Submit and send them its Assign (with its image frames)."""
        instances = self.registry.instances()
        cached = self.kv.cached_tokens(instances, msg.prompt_ids)
        route = self.router.route(instances, len(msg.prompt_ids), msg.sampling.n, cached, msg.priority)
        if route is None:
            await self._send_error(msg.tokens_addr, msg.request_id, 503, "no worker available", reason="no_worker")
            return
        instance = route.prefill
        # An image request is served whole where it is prefilled: a decode peer taking its KV would
        # not have the images its M-RoPE positions depend on.
        decode = [] if msg.images else route.decode
        self.requests.add(
            instance, request_id=msg.request_id, gateway_identity=identity, gateway_id=msg.gateway_id,
            tokens_addr=msg.tokens_addr, prompt_len=len(msg.prompt_ids),
            cached_tokens=cached.get(instance.instance_id, 0), decode_candidates=[d.instance_id for d in decode],
            max_tokens=msg.sampling.max_tokens or 0, n=msg.sampling.n,
        )
        assign = Assign(
            request_id=msg.request_id, prompt_ids=msg.prompt_ids, sampling=msg.sampling, priority=msg.priority,
            gateway_id=msg.gateway_id, tokens_addr=msg.tokens_addr, prefill_instance=instance.instance_id,
            decode_instance=decode[0].instance_id if decode else instance.instance_id,
            arrival_time=msg.arrival_time,
            decode_candidates=[DecodeCandidate(instance_id=d.instance_id, kv_addr=d.kv_addr, flip_id=d.flip_id)
                               for d in decode],
            embed=msg.embed,  # an embedding request: the worker ignores the decode candidates
            images=msg.images,
        )
        logger.debug("request %s -> %s", msg.request_id, instance.instance_id)
        await bus.send(self.backend, assign, *tensors, identity=instance.identity)

    async def _on_abort(self, identity: bytes, msg: Abort) -> None:
        if self.encode.abort(msg.request_id):
            return  # aborted while its images encoded: no worker holds it
        entry = self.requests.abort(msg.request_id)
        if entry is None:
            # Finished already, or submitted before this scheduler (re)started: a worker may still
            # hold it, and an unknown id is a no-op for a worker, so ask every one of them.
            for instance in self.registry.instances():
                await bus.send(self.backend, AbortRequest(request_id=msg.request_id), identity=instance.identity)
            return
        # Mid hand-off the KV may already sit on a decode candidate: tell each of them too (an
        # unknown id is a no-op for a worker).
        for instance_id in dict.fromkeys([entry.instance_id, *entry.decode_candidates]):
            instance = self.registry.get(instance_id)
            if instance is not None:
                logger.debug("abort %s (%s) -> %s", msg.request_id, msg.reason, instance_id)
                await bus.send(self.backend, AbortRequest(request_id=msg.request_id), identity=instance.identity)

    # ---- backend: workers ---------------------------------------------------------------

    async def _on_heartbeat(self, identity: bytes, msg: Heartbeat) -> None:
        instance = self.registry.heartbeat(identity, msg)
        if instance is not None and instance.role == ENCODE_ROLE:
            pass  # an encoder: no prefill/decode load for the PD policy
        elif instance is not None:
            # The policy's role of record is the one it ordered, while the worker has not answered.
            self.policy.observe_heartbeat(msg, instance.ordered_role)
        else:
            # Unknown sender (e.g. this scheduler restarted): ask it to register again.
            await bus.send(
                self.backend,
                RegisterAck(instance_id=msg.instance_id, accepted=False, reason="not registered; register again"),
                identity=identity,
            )

    async def _on_request_finished(self, identity: bytes, msg: RequestFinished) -> None:
        entry = self.requests.finish(msg.request_id, msg.instance_id)
        if entry is not None:
            if msg.ttft_s >= 0:
                self.policy.observe_ttft(msg.instance_id, entry.prompt_len, entry.queued_prefill_tokens, msg.ttft_s)
            if msg.tpot_s >= 0:
                self.policy.observe_tpot(msg.instance_id, msg.tpot_s)

    async def _on_kv_event(self, identity: bytes, msg: KvEvent) -> None:
        instance = self.registry.by_identity(identity)
        if instance is None or instance.instance_id != msg.source or msg.tier != "hbm":
            logger.debug("dropped a KV event from %r: not a registered worker's own HBM", identity)
        elif not self.kv.on_worker_event(msg):
            await bus.send(self.backend, KvSnapshotRequest(source=msg.source), identity=identity)

    async def _on_deregister(self, identity: bytes, msg: Deregister) -> None:
        instance = self.registry.deregister(identity, msg.instance_id)
        if instance is not None:
            logger.info("instance %s deregistered", msg.instance_id)
            self.policy.forget(msg.instance_id)
            self.kv.forget(msg.instance_id)
            await self._fail_requests_of(instance, "worker left")
            if instance.role == ENCODE_ROLE:
                await self.encode.encoder_gone(instance)

    async def _on_flip_ack(self, identity: bytes, msg: FlipAck) -> None:
        instance = self.registry.by_identity(identity)
        if instance is not None and instance.instance_id == msg.instance_id:
            self.flips.acknowledged(instance, msg)
        logger.info("instance %s is now %s (flip %d)", msg.instance_id, msg.role, msg.flip_id)

    async def _on_handoff(self, identity: bytes, msg: RequestHandoff) -> None:
        """A decode worker took a request's KV: it holds the request from now on."""
        entry = self.requests.get(msg.request_id)
        taker = self.registry.by_identity(identity)
        if taker is None or taker.instance_id != msg.to_instance:
            return
        if entry is None or entry.instance_id != msg.from_instance:
            # Aborted (or failed) while the KV travelled: nobody wants its tokens.
            logger.info("request %s landed on %s after it ended: aborting it there", msg.request_id, msg.to_instance)
            await bus.send(self.backend, AbortRequest(request_id=msg.request_id), identity=identity)
            return
        self.requests.hand_over(entry, msg.to_instance)
        if msg.ttft_s >= 0:
            self.policy.observe_ttft(msg.from_instance, entry.prompt_len, entry.queued_prefill_tokens, msg.ttft_s)

    async def _on_register(self, identity: bytes, msg: Register) -> None:
        outcome, instance, old = self.registry.register(identity, msg)
        if outcome is RegisterOutcome.REPLACED and old is not None:
            logger.warning("instance %s restarted: %d request(s) of its old process to migrate",
                           msg.instance_id, len(old.inflight))
            self.kv.forget(msg.instance_id)
            await self._fail_requests_of(old, "worker restarted")
            if old.role == ENCODE_ROLE:
                await self.encode.encoder_gone(old)
        if outcome is not RegisterOutcome.REFRESHED:
            logger.info("instance %s registered: role=%s pages=%d model=%s",
                        msg.instance_id, msg.role, msg.num_pages, msg.model)
        orphans = self.registry.orphans_of(instance) if outcome is RegisterOutcome.NEW else []
        if orphans:
            # Declared dead while it was only silent: its requests run elsewhere now.
            logger.warning("instance %s came back after being declared dead: dropping %d migrated request(s)",
                           msg.instance_id, len(orphans))
            for request_id in orphans:
                await bus.send(self.backend, AbortRequest(request_id=request_id), identity=identity)
        await bus.send(self.backend, RegisterAck(instance_id=msg.instance_id, accepted=True), identity=identity)

    async def _on_encode_result(self, identity: bytes, msg: EncodeResult, tensors: list[torch.Tensor]) -> None:
        await self.encode.on_result(identity, msg, tensors)

    async def _send_encode(self, encoder: Instance, msg: EncodeRequest, tensors: list[torch.Tensor]) -> None:
        await bus.send(self.backend, msg, *tensors, identity=encoder.identity)

    async def _fail_requests_of(self, instance: Instance, reason: str) -> None:
        """Its requests are lost with it: retriable, so their gateways migrate them."""
        for entry in self.requests.take_requests_of(instance):
            await self._send_error(entry.tokens_addr, entry.request_id, 503, f"{reason} ({instance.instance_id})",
                                   reason="worker_lost")

    # ---- to gateways --------------------------------------------------------------------

    async def _send_error(self, tokens_addr: str, request_id: str, code: int, message: str, reason: str = "") -> None:
        """Tell the owning gateway a request failed; never blocks on a gone gateway. With a
        `reason` the error is retriable (the gateway tries again elsewhere)."""
        logger.info("request %s failed: %d %s", request_id, code, message)
        await self.pushers.send(tokens_addr, RequestError(request_id=request_id, code=code, message=message,
                                                          retriable=bool(reason), reason=reason))

    # ---- dispatch: exactly what each socket's channel end takes -------------------------

    _TAKES_TENSORS: frozenset[type[Message]] = frozenset({Submit, EncodeResult})  # handlers called with the frames too
    _ON_FRONTEND: Mapping[type[Message], Handler] = {
        Submit: _on_submit,
        Abort: _on_abort,
        FinishChoice: _on_finish_choice,
        StatusQuery: _on_status_query,
        FlipRequest: _on_flip_request,
        GatewayHello: _on_gateway_hello,
    }
    _ON_BACKEND: Mapping[type[Message], Handler] = {
        Register: _on_register,
        Heartbeat: _on_heartbeat,
        Deregister: _on_deregister,
        RequestFinished: _on_request_finished,
        RequestHandoff: _on_handoff,
        FlipAck: _on_flip_ack,
        MigrationResult: _on_migration_result,
        KvEvent: _on_kv_event,
        EncodeResult: _on_encode_result,
    }
