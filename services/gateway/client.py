"""The gateway's side of the bus: DEALER to the scheduler, PULL for token streams, request registry.

One PULL socket (the tokens channel) receives TokenDelta / RequestError for every request this
gateway owns, from workers and from the scheduler; a single dispatcher task routes each message
to the owning request's `RequestStream` (a deque plus one future: lighter than an asyncio.Queue
on the per-token path). The DEALER (the frontend channel) carries Submit / Abort / FinishChoice /
StatusQuery / GatewayHello out and StatusReply back. Each socket is bound to its channel end, so
nothing else reaches the loops.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import zmq

from common import bus
from common.service_config import CurveKeys
from common.protocol import (
    FRONTEND,
    TOKENS,
    Abort,
    EmbedTask,
    FinishChoice,
    FrontendMessage,
    GatewayHello,
    Message,
    RequestError,
    Sampling,
    StatusQuery,
    StatusReply,
    Submit,
    TokensMessage,
)
from services.gateway.migration import ImageFrames, MigrationPolicy

logger = logging.getLogger(__name__)

# An instance in one of these states takes no new work (anything else, or no state, is ready).
_NOT_READY_STATES = frozenset(("starting", "loading", "draining", "dead", "suspect", "stopping"))


class RequestStream:
    """Messages for one generation (all its sub-requests), consumed in batches by one handler."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[TokensMessage] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, msg: TokensMessage) -> None:
        self._items.append(msg)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get_batch(self) -> list[TokensMessage]:
        """Everything that arrived since the last call (waits for at least one message)."""
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items


def instance_ready(instance: dict[str, Any]) -> bool:
    if instance.get("ready") is False:
        return False
    state = instance.get("state") or instance.get("status")
    return not (isinstance(state, str) and state.lower() in _NOT_READY_STATES)


class BusClient:
    def __init__(
        self,
        frontend_addr: str,
        tokens_addr: str,
        gateway_id: str,
        *,
        status_interval: float = 0.5,
        status_stale_after: float = 3.0,
        advertise_host: str | None = None,
        curve: CurveKeys | None = None,
        migration: MigrationPolicy | None = None,
    ) -> None:
        self.frontend_addr = frontend_addr
        self.tokens_addr = tokens_addr
        self.advertise_host = advertise_host
        self.curve = curve
        self.gateway_id = gateway_id
        self.status_interval = status_interval
        self.status_stale_after = status_stale_after
        self.instances: list[dict[str, Any]] = []
        self.last_status_time = 0.0  # monotonic time of the last StatusReply
        self.on_status: Callable[[list[dict[str, Any]]], None] | None = None
        self.on_scheduler: Callable[[dict[str, Any]], None] | None = None
        self.scheduler_info: dict[str, Any] = {}  # PD policy, pools, flips
        # What the last status says of each instance's process: id -> incarnation (alive or
        # suspect), and the (id, incarnation) pairs declared dead (generations migrate those).
        self._incarnations: dict[str, str] = {}
        self._dead: set[tuple[str, str]] = set()
        self.migration: MigrationPolicy = migration or MigrationPolicy()
        self._streams: dict[str, RequestStream] = {}
        self._dealer: zmq.asyncio.Socket | None = None
        self._pull: zmq.asyncio.Socket | None = None
        self._tasks: list[asyncio.Task] = []
        self._pending_sends: set[asyncio.Task] = set()

    # ---- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        self._pull = bus.make_socket(zmq.PULL, channel=TOKENS.binder)
        # Workers push to this address, so a tcp wildcard bind is advertised under a reachable host.
        self.tokens_addr = bus.advertised_address(bus.bind(self._pull, self.tokens_addr), self.advertise_host)
        self._dealer = bus.make_socket(zmq.DEALER, channel=FRONTEND.connector, routing_id=self.gateway_id.encode())
        if self.curve is not None:
            self.curve.make_client(self._dealer)
        bus.connect(self._dealer, self.frontend_addr)
        # GatewayHello goes out on the first StatusReply (see _on_status), i.e. once the
        # scheduler is known to be there, and again whenever it comes back.
        self._tasks = [
            asyncio.create_task(self._receive_loop(self._pull, self._on_result), name="gateway-tokens"),
            # StatusReply is the only message the frontend channel brings a gateway.
            asyncio.create_task(self._receive_loop(self._dealer, self._on_status), name="gateway-frontend"),
            asyncio.create_task(self._status_loop(), name="gateway-status"),
        ]
        logger.info("bus client up: frontend=%s tokens=%s id=%s", self.frontend_addr, self.tokens_addr,
                    self.gateway_id)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        # give queued aborts a moment to leave, so the workers free their pages
        if self._pending_sends:
            await asyncio.wait(self._pending_sends, timeout=0.5)
        for sock in (self._dealer, self._pull):
            if sock is not None:
                bus.close(sock)

    # ---- requests -------------------------------------------------------------------------

    def register(self, request_id: str, stream: RequestStream) -> None:
        self._streams[request_id] = stream

    def unregister(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def fail_all(self, code: int, message: str) -> None:
        """End every request in flight with an error (shutdown: handlers finish at once)."""
        for request_id, stream in list(self._streams.items()):
            stream.put(RequestError(request_id=request_id, code=code, message=message))

    async def submit(self, request_id: str, prompt_ids: list[int], sampling: Sampling,
                     arrival_time: float, priority: str = "online", embed: EmbedTask | None = None,
                     images: ImageFrames | None = None) -> None:
        metas, tensors = images if images is not None else ([], [])
        msg = Submit(request_id=request_id, prompt_ids=prompt_ids, sampling=sampling, priority=priority,
                     gateway_id=self.gateway_id, tokens_addr=self.tokens_addr, arrival_time=arrival_time,
                     embed=embed, images=metas)
        await bus.send(self._dealer, msg, *tensors)  # each image's pixels as one raw frame

    def abort_soon(self, request_id: str, reason: str) -> None:
        """Send Abort without awaiting (usable from `finally` blocks of cancelled handlers)."""
        self._send_soon(Abort(request_id=request_id, reason=reason))

    def finish_choice_soon(self, request_id: str, index: int) -> None:
        """Stop one choice on the worker (the others of the request keep going)."""
        self._send_soon(FinishChoice(request_id=request_id, index=index))

    def _send_soon(self, msg: FrontendMessage) -> None:
        if self._dealer is None or self._dealer.closed:
            return
        task = asyncio.get_running_loop().create_task(self._send_logged(msg))
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)

    async def _send_logged(self, msg: FrontendMessage) -> None:
        try:
            await bus.send(self._dealer, msg)
        except Exception:  # a failed abort must not take anything else down
            logger.exception("could not send %s", msg.TAG)

    # ---- health ---------------------------------------------------------------------------

    @property
    def scheduler_alive(self) -> bool:
        return time.monotonic() - self.last_status_time < self.status_stale_after

    @property
    def scheduler_id(self) -> str:
        """The scheduler process's token ("" before the first status): it changes on a restart."""
        value = self.scheduler_info.get("scheduler_id")
        return value if isinstance(value, str) else ""

    @property
    def seen_scheduler(self) -> bool:
        return self.last_status_time > 0

    def instance_state(self, instance_id: str, incarnation: str) -> str:
        """What the fresh status says of one worker process: "listed" (alive or suspect), "dead"
        (declared dead, or its id now belongs to another incarnation) or "unlisted" (nothing:
        e.g. a restarted scheduler that has not heard from it yet). "unknown" without a fresh
        status."""
        if not self.scheduler_alive:
            return "unknown"
        if (instance_id, incarnation) in self._dead:
            return "dead"
        current = self._incarnations.get(instance_id)
        if current is None:
            return "unlisted"
        return "listed" if not incarnation or not current or current == incarnation else "dead"

    @property
    def ready(self) -> bool:
        """A fresh status says at least one worker can take requests."""
        return self.scheduler_alive and any(instance_ready(inst) for inst in self.instances)

    # ---- loops ----------------------------------------------------------------------------

    async def _receive_loop(self, sock: zmq.asyncio.Socket, handle: Callable[[Any], None]) -> None:
        while True:
            try:
                # Only messages for this socket's channel end come out (the bus drops the rest).
                _, msg, _ = await bus.recv(sock)
            except zmq.ZMQError as exc:
                if sock.closed:
                    return
                logger.error("receive failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            handle(msg)

    def _on_result(self, msg: Message) -> None:
        """A TokenDelta or RequestError (the tokens channel's only messages)."""
        result = cast(TokensMessage, msg)
        stream = self._streams.get(result.request_id)
        if stream is not None:
            stream.put(result)
        else:  # late deltas of an aborted or finished request: expected, harmless
            logger.debug("%s for unknown request %s dropped", result.TAG, result.request_id)

    def _on_status(self, msg: StatusReply) -> None:
        was_alive = self.scheduler_alive
        self.instances = [inst for inst in msg.instances if isinstance(inst, dict)]
        self.scheduler_info = msg.scheduler
        self._incarnations = {inst["id"]: str(inst.get("incarnation") or "") for inst in self.instances
                              if isinstance(inst.get("id"), str)}
        dead = msg.scheduler.get("dead_instances") if isinstance(msg.scheduler, dict) else None
        self._dead = {(d["id"], str(d.get("incarnation") or "")) for d in dead or ()
                      if isinstance(d, dict) and isinstance(d.get("id"), str)}
        self.last_status_time = time.monotonic()
        if not was_alive:
            logger.info("scheduler reachable: %d instance(s)", len(self.instances))
            # a restarted scheduler has forgotten us: introduce ourselves again
            self._send_soon(GatewayHello(gateway_id=self.gateway_id, tokens_addr=self.tokens_addr))
        try:
            if self.on_status is not None:
                self.on_status(self.instances)
            if self.on_scheduler is not None:
                self.on_scheduler(self.scheduler_info)
        except Exception:
            logger.exception("status callback failed")

    async def _status_loop(self) -> None:
        while True:
            try:
                # Bounded: with the scheduler gone for long the DEALER queue fills and send waits.
                # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
                # lands as the send completes, and this loop would then never stop.)
                async with asyncio.timeout(self.status_stale_after):
                    await bus.send(self._dealer, StatusQuery())
            except TimeoutError:
                logger.debug("status query not sent: the scheduler is not taking messages")
            except zmq.ZMQError as exc:
                logger.debug("status query not sent: %r", exc)
            if not self.scheduler_alive and self.instances:
                self.instances = []  # stale: the scheduler is gone, nobody can serve
                if self.on_status is not None:
                    self.on_status([])
            await asyncio.sleep(self.status_interval)
