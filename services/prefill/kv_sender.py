"""The prefill side of P/D disaggregation: hand a held sequence's KV to a decode worker.

After prefill the engine holds the sequence (pages kept, nothing computed). `KvSender.hand_off`
walks the decode candidates the scheduler named, best first:

    Begin -> Ready(ok) -> Chunk x num_layers (one raw frame per layer) -> Ack(ok)

and on success releases the held pages (full pages stay in the prefix cache). A candidate that
refuses, fails or does not answer within the timeout is skipped; when none takes the sequence
it is resumed here and decoded locally: the request is never dropped. Layers go one chunk each
so the wire is busy while the next layer is gathered, and the decode side can fail fast.

Every engine call goes through `run_on_engine` (the worker's single engine thread): page
gathers are torch work and must not race a step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import zmq
import zmq.asyncio

from common import bus
from common.codec import DTYPES
from common.protocol import (
    KV,
    DecodeCandidate,
    KvTransferAck,
    KvTransferBegin,
    KvTransferCancel,
    KvTransferChunk,
    KvTransferReady,
    Message,
    Sampling,
)
from services.worker.engine_api import WorkerEngine

__all__ = ["KvSender", "HandoffRequest", "DEFAULT_TRANSFER_TIMEOUT_S"]

logger = logging.getLogger(__name__)

DEFAULT_TRANSFER_TIMEOUT_S = 5.0
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

RunOnEngine = Callable[..., Awaitable[Any]]


@dataclass
class HandoffRequest:
    """What the decode side needs besides the KV (from the request's Assign)."""

    request_id: str
    sampling: Sampling
    priority: str
    tokens_addr: str
    arrival_time: float
    candidates: list[DecodeCandidate]  # best first
    ttft_s: float = -1.0
    # A DP-balance migration of a running sequence (see services/worker/migrations.py); with
    # `recompute` the target prefills it again instead of receiving its KV.
    migration: bool = False
    recompute: bool = False


class _Peer:
    """One DEALER to a decode worker's kv ROUTER, with replies routed to waiting futures."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.waiting: dict[tuple[str, str], asyncio.Future] = {}
        self.reader: asyncio.Task | None = None

    async def read(self) -> None:
        while True:
            _, msg, _ = await bus.recv(self.sock)
            reply = cast(KvTransferReady | KvTransferAck, msg)  # all this channel end lets in
            future = self.waiting.pop((reply.TAG, reply.transfer_id), None)
            if future is not None and not future.done():
                future.set_result(reply)
            else:
                logger.debug("dropped late %s on a kv peer socket", reply.TAG)

    def expect(self, tag: str, transfer_id: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self.waiting[(tag, transfer_id)] = future
        return future


class KvSender:
    def __init__(
        self,
        engine: WorkerEngine,
        run_on_engine: RunOnEngine,
        instance_id: str,
        context: zmq.asyncio.Context,
        timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.run_on_engine = run_on_engine
        self.instance_id = instance_id
        self.timeout_s = timeout_s
        self._context = context
        self._peers: dict[str, _Peer] = {}
        self._ids = itertools.count()
        self.in_flight = 0
        self.transfers_ok = 0
        self.transfers_failed = 0  # attempts on one candidate that did not end in an ack
        self.fallbacks = 0  # sequences decoded here because no candidate took them
        self.bytes_sent = 0
        self.seconds_total = 0.0

    def stats(self) -> dict[str, float | int]:
        return {
            "kv_transfers_in_flight": self.in_flight,
            "kv_transfers_ok": self.transfers_ok,
            "kv_transfers_failed": self.transfers_failed,
            "kv_transfer_fallbacks": self.fallbacks,
            "kv_bytes_sent": self.bytes_sent,
            "kv_transfer_seconds_total": round(self.seconds_total, 4),
        }

    def close(self) -> None:
        for peer in self._peers.values():
            if peer.reader is not None:
                peer.reader.cancel()
            bus.close(peer.sock, linger_ms=0)
        self._peers.clear()

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            sock = bus.make_socket(zmq.DEALER, channel=KV.connector, context=self._context)
            bus.connect(sock, address)
            peer = self._peers[address] = _Peer(sock)
            peer.reader = asyncio.create_task(peer.read(), name=f"kv-peer {address}")
        return peer

    def _drop_peer(self, address: str) -> None:
        """Forget a peer that timed out: a fresh socket does not inherit its queued frames."""
        peer = self._peers.pop(address, None)
        if peer is not None:
            if peer.reader is not None:
                peer.reader.cancel()
            bus.close(peer.sock, linger_ms=200)  # a queued cancel may still reach a slow peer

    async def hand_off(self, request: HandoffRequest) -> str | None:
        """Move the held sequence to the first candidate that takes it; its id, or None when the
        sequence was resumed here (or the request went away meanwhile)."""
        self.in_flight += 1
        try:
            for candidate in request.candidates:
                instance_id = candidate.instance_id
                if not self.engine.handoff.is_held(request.request_id):
                    return None  # aborted while we were trying
                started = time.perf_counter()
                try:
                    ok, reason = await self._transfer(request, candidate)
                except (zmq.ZMQError, ValueError, KeyError) as exc:
                    ok, reason = False, f"{type(exc).__name__}: {exc}"
                if ok:
                    self.transfers_ok += 1
                    self.seconds_total += time.perf_counter() - started
                    try:
                        await self.run_on_engine(self.engine.handoff.release_held, request.request_id)
                    except KeyError:
                        pass  # aborted here meanwhile: the pages went back with the abort
                    logger.debug("handed %s to %s in %.1f ms", request.request_id, instance_id,
                                 (time.perf_counter() - started) * 1e3)
                    return instance_id
                self.transfers_failed += 1
                logger.warning("KV hand-off of %s to %s failed: %s", request.request_id, instance_id, reason)
            if self.engine.handoff.is_held(request.request_id):
                self.fallbacks += 0 if request.migration else 1
                logger.warning("no decode worker took %s: decoding it here", request.request_id)
                try:
                    await self.run_on_engine(self.engine.handoff.resume_held, request.request_id)
                except KeyError:
                    pass  # aborted meanwhile
            return None
        finally:
            self.in_flight -= 1

    async def _transfer(self, request: HandoffRequest, candidate: DecodeCandidate) -> tuple[bool, str]:
        address = candidate.kv_addr
        export = await self.run_on_engine(self.engine.handoff.export_kv, request.request_id)
        transfer_id = f"{self.instance_id}:{next(self._ids)}:{uuid.uuid4().hex[:6]}"
        peer = self._peer(address)
        begin = KvTransferBegin(
            transfer_id=transfer_id, request_id=request.request_id, source_instance=self.instance_id,
            prompt_ids=list(export.prompt_ids), output_ids=list(export.output_ids), logprobs=export.logprobs,
            sampling=request.sampling, priority=request.priority, tokens_addr=request.tokens_addr,
            arrival_time=request.arrival_time, num_tokens=0 if request.recompute else int(export.num_tokens), num_layers=int(export.num_layers),
            page_size=int(self.engine.page_size), dtype=_DTYPE_NAMES.get(self.engine.kv_dtype, str(self.engine.kv_dtype)),
            namespace=self.engine.kv_namespace, num_cached_tokens=int(export.num_cached_tokens),
            ttft_s=request.ttft_s, generator_state=export.generator_state,
            # The promise the scheduler made: the peer honours it even if it flipped since.
            candidate_flip_id=candidate.flip_id,
            migration=request.migration, recompute=request.recompute,
        )
        ready = await self._ask(peer, begin, KvTransferReady.TAG, transfer_id, address)
        if ready is None:
            return False, "no answer to the transfer request"
        if not ready.ok:
            return False, f"refused: {ready.reason}"
        if request.recompute:
            return True, ""  # no KV travels: the target took the sequence in to recompute it
        # One engine-thread hop for every layer: a hop per layer would wait behind a step each.
        layers = await self.run_on_engine(export.layers, 0, export.num_layers)
        acked = peer.expect(KvTransferAck.TAG, transfer_id)
        try:
            for layer, tensor in enumerate(layers):
                if not self.engine.handoff.is_held(request.request_id):
                    await self._send(peer, KvTransferCancel(transfer_id=transfer_id, reason="request aborted"))
                    return False, "request aborted during the transfer"
                self.bytes_sent += tensor.numel() * tensor.element_size()
                chunk = KvTransferChunk(transfer_id=transfer_id, layer_start=layer, num_layers=1,
                                        last=layer == len(layers) - 1)
                await self._send(peer, chunk, tensor)
            ack = await asyncio.wait_for(acked, self.timeout_s)
        except asyncio.TimeoutError:
            # Best effort: if the peer is merely slow, have it drop the pages rather than
            # decode a sequence that is about to go elsewhere.
            try:
                cancel = KvTransferCancel(transfer_id=transfer_id, reason="ack timeout")
                peer.sock.send_multipart(bus.encode_for(peer.sock, cancel), flags=zmq.NOBLOCK)
            except (zmq.ZMQError, ValueError):
                pass
            self._drop_peer(address)
            return False, f"no acknowledgement within {self.timeout_s:.1f} s"
        finally:
            peer.waiting.pop((KvTransferAck.TAG, transfer_id), None)
        return ack.ok, ack.reason

    async def _send(self, peer: _Peer, msg: Message, *tensors: Any) -> None:
        # A dead peer fills the socket's queue and a send would wait forever: bound it.
        await asyncio.wait_for(bus.send(peer.sock, msg, *tensors), self.timeout_s)

    async def _ask(self, peer: _Peer, msg: Message, tag: str, transfer_id: str, address: str) -> Any:
        future = peer.expect(tag, transfer_id)
        try:
            await self._send(peer, msg)
            return await asyncio.wait_for(future, self.timeout_s)
        except asyncio.TimeoutError:
            peer.waiting.pop((tag, transfer_id), None)
            self._drop_peer(address)
            return None
