"""The decode side of P/D disaggregation: take a sequence's KV in on the worker's `kv` ROUTER.

    Begin  -> reserve pages for the whole sequence (or refuse: wrong model/layout, no pages,
              not taking decode work) -> Ready
    Chunk  -> keep the layer frames (zero-copy views of the received messages)
    last   -> one engine-thread call writes every layer into the reserved pages and commits the
              sequence to the running batch -> Ack(ok); the worker then owns the request
    Cancel -> free the reservation

Writing all layers in one engine call at the end, rather than one call per chunk, keeps a
transfer from waiting behind one decode step per layer. A transfer that stalls (the prefill
worker died) is cancelled after the timeout, so reserved pages never leak.

Whether the worker takes decode work is its call (`admission`): a draining worker refuses, one in
the decode or mixed role accepts, and one that flipped out of the decode role still accepts a
sequence whose candidate was named before that flip. Refusals are counted by reason
(`kv_handoffs_refused_<reason>` in the stats, on the status page): one for the role means the
scheduler named a worker that had already left the decode role.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import zmq.asyncio

from common import bus
from common.engine.block_manager import NoFreePagesError
from common.engine.sampling_params import SamplingParams
from common.protocol import (
    KvMessage,
    KvTransferAck,
    KvTransferBegin,
    KvTransferCancel,
    KvTransferChunk,
    KvTransferReady,
)
from services.worker.engine_api import WorkerEngine

__all__ = ["KvReceiver", "Admission", "REFUSAL_REASONS"]

logger = logging.getLogger(__name__)

RunOnEngine = Callable[..., Awaitable[Any]]

# Why an incoming transfer is refused; each has its counter, `kv_handoffs_refused_<reason>`.
REFUSAL_REASONS = ("role", "draining", "no_pages", "layout", "other")


class Admission(NamedTuple):
    """The worker's answer to an incoming sequence: take it or not, and why."""

    ok: bool
    # Refused: one of REFUSAL_REASONS. Taken: "role" (it takes decode work) or "promised" (it
    # flipped out of the decode role after the scheduler named it: the hand-off is honoured).
    reason: str
    message: str = ""


@dataclass
class _Incoming:
    identity: bytes
    begin: KvTransferBegin
    deadline: float
    layers: dict[int, torch.Tensor] = field(default_factory=dict)


class KvReceiver:
    def __init__(
        self,
        engine: WorkerEngine,
        run_on_engine: RunOnEngine,
        admission: Callable[[KvTransferBegin], Admission],
        on_committed: Callable[[KvTransferBegin], Awaitable[None]],
        timeout_s: float,
    ) -> None:
        self.engine = engine
        self.run_on_engine = run_on_engine
        self.admission = admission  # whether this worker takes a sequence's KV now
        self.on_committed = on_committed
        self.timeout_s = timeout_s
        self._incoming: dict[str, _Incoming] = {}
        self.received_ok = 0
        self.refused = 0
        self.refused_by_reason: Counter[str] = Counter()
        self.honoured_after_flip = 0  # taken although the worker left the decode role since
        self.cancelled = 0
        self.bytes_received = 0
        self.recomputed_in = 0  # migrated sequences taken in to recompute (no KV received)

    def stats(self) -> dict[str, int]:
        return {
            "kv_incoming": len(self._incoming),
            "kv_received_ok": self.received_ok,
            "kv_refused": self.refused,
            **{f"kv_handoffs_refused_{reason}": self.refused_by_reason[reason] for reason in REFUSAL_REASONS},
            "kv_handoffs_honoured_after_flip": self.honoured_after_flip,
            "kv_cancelled": self.cancelled,
            "kv_bytes_received": self.bytes_received,
            "dp_recomputed_in": self.recomputed_in,
        }

    async def handle(self, sock: zmq.asyncio.Socket, identity: bytes, msg: KvMessage, tensors: list) -> None:
        """One message from a prefill worker: Begin, Chunk or Cancel, all that the decode end of
        the kv channel lets in (`sock` is that end, bound by this worker)."""
        await self._HANDLERS[type(msg)](self, sock, identity, msg, tensors)

    async def _on_begin(self, sock: zmq.asyncio.Socket, identity: bytes, msg: KvTransferBegin, tensors: list) -> None:
        refusal = await self._begin(identity, msg)
        if refusal is not None:
            self.refused += 1
            self.refused_by_reason[refusal.reason] += 1
            logger.info("refused KV of %s from %s: %s", msg.request_id, msg.source_instance, refusal.message)
        await bus.send(sock, KvTransferReady(transfer_id=msg.transfer_id, ok=refusal is None,
                                             reason=refusal.message if refusal is not None else ""),
                       identity=identity)
        if refusal is None and msg.recompute:
            # A migrated sequence to recompute: no layers follow, it is queued here already.
            self.recomputed_in += 1
            await self.on_committed(msg)

    async def _on_chunk(self, sock: zmq.asyncio.Socket, identity: bytes, msg: KvTransferChunk, tensors: list) -> None:
        reason = await self._chunk(identity, msg, tensors)
        if reason is not None or msg.last:
            await bus.send(sock, KvTransferAck(transfer_id=msg.transfer_id, ok=reason is None, reason=reason or ""),
                           identity=identity)

    async def _on_cancel(self, sock: zmq.asyncio.Socket, identity: bytes, msg: KvTransferCancel, tensors: list) -> None:
        incoming = self._incoming.get(msg.transfer_id)
        if incoming is not None and incoming.identity == identity:
            await self._cancel(msg.transfer_id, f"cancelled by the sender: {msg.reason}")

    async def _begin(self, identity: bytes, msg: KvTransferBegin) -> Admission | None:
        """Reserve pages for the transfer; the refusal when it is not taken."""
        admission = self.admission(msg)
        if not admission.ok:
            return admission
        engine = self.engine
        if msg.namespace != engine.kv_namespace:
            return Admission(False, "layout",
                             f"KV layout {msg.namespace!r} differs from this worker's {engine.kv_namespace!r}")
        if msg.num_layers != engine.num_layers or msg.page_size != engine.page_size:
            return Admission(False, "layout", "layer count or page size differs from this worker's")
        if msg.transfer_id in self._incoming:
            return Admission(False, "other", f"transfer id {msg.transfer_id!r} is in use")
        try:
            params = SamplingParams.from_dict(msg.sampling.to_dict())
            await self.run_on_engine(
                lambda: engine.handoff.reserve_transfer(
                    msg.request_id, list(msg.prompt_ids), list(msg.output_ids), params, priority=msg.priority,
                    num_tokens=msg.num_tokens, logprobs=msg.logprobs, num_cached_tokens=msg.num_cached_tokens,
                    generator_state=msg.generator_state, recompute=msg.recompute,
                )
            )
        except NoFreePagesError:
            return Admission(False, "no_pages", "no free KV pages")
        except (ValueError, TypeError, KeyError) as exc:
            return Admission(False, "other", str(exc))
        if not msg.recompute:  # a recomputed sequence is in the engine's queue already
            self._incoming[msg.transfer_id] = _Incoming(identity, msg, time.monotonic() + self.timeout_s)
        if admission.reason == "promised":
            self.honoured_after_flip += 1
            logger.info("took KV of %s in after a flip: named as a decode candidate before it",
                        msg.request_id)
        return None

    async def _chunk(self, identity: bytes, msg: KvTransferChunk, tensors: list) -> str | None:
        incoming = self._incoming.get(msg.transfer_id)
        if incoming is None or incoming.identity != identity:
            return f"unknown transfer {msg.transfer_id!r}"
        num_layers = incoming.begin.num_layers
        if (len(tensors) != msg.num_layers or msg.num_layers < 1 or msg.layer_start < 0
                or msg.layer_start + msg.num_layers > num_layers):
            await self._cancel(msg.transfer_id, "malformed chunk")
            return f"chunk of layers [{msg.layer_start}, +{msg.num_layers}) with {len(tensors)} frame(s) is malformed"
        for offset, tensor in enumerate(tensors):
            incoming.layers[msg.layer_start + offset] = tensor
            self.bytes_received += tensor.numel() * tensor.element_size()
        incoming.deadline = time.monotonic() + self.timeout_s
        if not msg.last:
            return None
        if len(incoming.layers) != num_layers:
            await self._cancel(msg.transfer_id, "layers missing")
            return f"last chunk arrived with {len(incoming.layers)} of {num_layers} layers"
        del self._incoming[msg.transfer_id]
        request_id = incoming.begin.request_id
        layers = [incoming.layers[i] for i in range(num_layers)]

        def land() -> None:
            self.engine.handoff.write_kv_layers(request_id, 0, layers)
            self.engine.handoff.commit_transfer(request_id)

        try:
            await self.run_on_engine(land)
        except (ValueError, KeyError, RuntimeError) as exc:
            await self._release(request_id)
            self.cancelled += 1
            return f"could not take the KV in: {exc}"
        self.received_ok += 1
        await self.on_committed(incoming.begin)
        return None

    async def _cancel(self, transfer_id: str, reason: str) -> None:
        incoming = self._incoming.pop(transfer_id, None)
        if incoming is None:
            return
        self.cancelled += 1
        logger.info("dropped incoming KV of %s: %s", incoming.begin.request_id, reason)
        await self._release(incoming.begin.request_id)

    async def _release(self, request_id: str) -> None:
        try:
            await self.run_on_engine(self.engine.handoff.cancel_transfer, request_id)
        except KeyError:
            pass  # aborted meanwhile: the pages are back already

    async def abort(self, request_id: str) -> bool:
        """Drop an incoming transfer of an aborted request; True if there was one."""
        for transfer_id, incoming in list(self._incoming.items()):
            if incoming.begin.request_id == request_id:
                await self._cancel(transfer_id, "request aborted")
                return True
        return False

    async def expire(self) -> None:
        """Cancel transfers whose sender went silent (called periodically by the worker)."""
        now = time.monotonic()
        for transfer_id, incoming in list(self._incoming.items()):
            if now > incoming.deadline:
                await self._cancel(transfer_id, f"no data for {self.timeout_s:.1f} s")

    async def close(self) -> None:
        for transfer_id in list(self._incoming):
            await self._cancel(transfer_id, "worker stopping")

    _HANDLERS: dict[type[KvMessage], Callable[..., Awaitable[None]]] = {
        KvTransferBegin: _on_begin,
        KvTransferChunk: _on_chunk,
        KvTransferCancel: _on_cancel,
    }
