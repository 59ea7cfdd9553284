"""What a worker does with each message the scheduler sends it.

Backend (DEALER, the worker's end of the backend channel): Assign, AbortRequest, FinishChoice
and MigrateRequest go to the engine loop's queue (an Assign via a prefix reload from the kvstore when one is
configured); KvSnapshotRequest and RegisterAck are answered here. Control (SUB, topics: own id
and `all`): RoleFlip, Drain, Shutdown. Each socket is bound to its channel end, so the handler
tables below cover everything that can arrive: the bus drops the rest.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import zmq.asyncio

from common import bus
from common.protocol import (
    AbortRequest,
    Assign,
    BackendMessage,
    ControlMessage,
    Drain,
    EncodeRequest,
    FinishChoice,
    FlipAck,
    KvSnapshotRequest,
    MigrateRequest,
    RegisterAck,
    RoleFlip,
    Shutdown,
)
from services.worker.image_assign import ImageAssign
from services.worker.kv_tiering import KvTiering
from services.worker.load_report import LoadReport
from services.worker.role_state import ROLES, RoleState

__all__ = ["Inbox", "InboxOwner", "EngineWork"]

logger = logging.getLogger(__name__)

# applied by the engine loop between steps
EngineWork = Assign | ImageAssign | AbortRequest | FinishChoice | MigrateRequest
Handler = Callable[[Any, Any], Awaitable[None]]


class InboxOwner(Protocol):
    """What the inbox uses of the worker it receives for."""

    instance_id: str
    draining: bool
    roles: RoleState
    tiering: KvTiering
    report: LoadReport

    @property
    def role(self) -> str: ...

    def stop(self) -> None: ...


class Inbox:
    def __init__(
        self,
        worker: InboxOwner,
        queue: Callable[[EngineWork], None],
        send_backend: Callable[[BackendMessage], Awaitable[None]],
    ) -> None:
        self.worker = worker
        self.queue = queue
        self.send_backend = send_backend

    async def backend_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            _, msg, tensors = await bus.recv(sock)
            if isinstance(msg, Assign) and (msg.images or tensors):
                # Its images' frames travel with it; their prefix pages are keyed by image content,
                # which the kvstore's token hashes do not cover: no reload.
                self.queue(ImageAssign(msg, tensors))
                continue
            await self.ON_BACKEND[type(msg)](self, msg)

    async def control_loop(self, sock: zmq.asyncio.Socket) -> None:
        while True:
            _, msg, _ = await bus.recv(sock)
            await self.ON_CONTROL[type(msg)](self, msg)

    # ---- backend --------------------------------------------------------------------------

    async def _on_assign(self, msg: Assign) -> None:
        tiering = self.worker.tiering
        if tiering.client is not None and msg.embed is None:  # an embedding keeps no KV: nothing to reload
            tiering.reload_then(msg, self.queue)  # its prefix comes from the kvstore first
        else:
            self.queue(msg)

    async def _on_abort_request(self, msg: AbortRequest) -> None:
        if not self.worker.tiering.abort_reload(msg.request_id):  # else it never reached the queue
            self.queue(msg)

    async def _on_finish_choice(self, msg: FinishChoice) -> None:
        self.queue(msg)

    async def _on_migrate_request(self, msg: MigrateRequest) -> None:
        self.queue(msg)  # a running sequence is parked between steps only

    async def _on_snapshot_request(self, msg: KvSnapshotRequest) -> None:
        await self.worker.tiering.send_snapshot()

    async def _on_register_ack(self, msg: RegisterAck) -> None:
        await self.worker.report.on_register_ack(msg)

    # ---- control --------------------------------------------------------------------------

    async def _on_role_flip(self, msg: RoleFlip) -> None:
        worker = self.worker
        # Orders reach this worker by topic (its id, or `all`); one naming another id is stray.
        if msg.instance_id != worker.instance_id:
            return
        if msg.role not in ROLES:
            logger.warning("ignored flip to unknown role %r", msg.role)
            return
        old = worker.role
        if worker.roles.flip(msg.role, msg.flip_id):
            # In-flight work keeps running; only what is admitted next changes.
            logger.info("worker %s flipped %s -> %s (flip %d)", worker.instance_id, old, worker.role, msg.flip_id)
        await self.send_backend(FlipAck(instance_id=worker.instance_id, flip_id=msg.flip_id, role=worker.role))

    async def _on_drain(self, msg: Drain) -> None:
        if msg.instance_id == self.worker.instance_id:
            self.worker.draining = True

    async def _on_shutdown(self, msg: Shutdown) -> None:
        logger.info("shutdown ordered by the scheduler")
        self.worker.stop()

    async def _on_encode_request(self, msg: EncodeRequest) -> None:
        # Encode jobs go to encoder instances (role `encode`), never to a worker.
        logger.warning("dropped encode job %s: this is a worker, not an encoder", msg.job_id)

    ON_BACKEND: Mapping[type[BackendMessage], Handler] = {
        Assign: _on_assign,
        AbortRequest: _on_abort_request,
        FinishChoice: _on_finish_choice,
        MigrateRequest: _on_migrate_request,
        KvSnapshotRequest: _on_snapshot_request,
        RegisterAck: _on_register_ack,
        EncodeRequest: _on_encode_request,
    }
    ON_CONTROL: Mapping[type[ControlMessage], Handler] = {
        RoleFlip: _on_role_flip,
        Drain: _on_drain,
        Shutdown: _on_shutdown,
    }
