"""The engine's side of P/D disaggregation (``engine.handoff``).

Prefill role: a request added with ``hold_after_prefill`` is parked after its first token
(pages kept, in neither scheduler queue, nothing computed) until its KV is exported and the
sequence released, or it is resumed here. Decode role: pages are reserved for a sequence whose
KV arrives from a prefill worker; once every layer is written it joins the running batch.

Every call runs on the engine thread, between steps (the page pool and the scheduler's queues
are only consistent there), except :meth:`KvHandoff.is_held`: a dict lookup, safe from any thread.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from common.engine.block_manager import BlockManager, NoFreePagesError
from common.engine.kv_transfer import KvExport, logprobs_from_plain, logprobs_to_plain, scatter_layers
from common.engine.sampler import make_generator
from common.engine.sampling_params import SamplingParams, validate_prompt_ids
from common.engine.scheduler import BatchScheduler
from common.engine.sequence import Priority, Sequence, SequenceStatus

__all__ = ["KvHandoff", "IncomingTransfer"]


class _Engine(Protocol):
    """What the hand-off uses of the engine that owns it (a protocol: the engine imports this module)."""

    block_manager: BlockManager
    scheduler: BatchScheduler
    kv_caches: list[torch.Tensor]
    vocab_size: int
    max_model_len: int

    def validate_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int: ...

    def adopt(self, seq: Sequence) -> None: ...

    def requests_of(self, request_id: str) -> list[Sequence]: ...

    def finish_sequence(self, request_id: str, index: int, reason: str = "stop") -> None: ...

    def abort_request(self, request_id: str) -> bool: ...


@dataclass
class IncomingTransfer:
    """Decode side: a sequence whose reserved pages are being filled with transferred KV."""

    seq: Sequence
    page_ids: list[int]
    num_tokens: int
    written: set[int] = field(default_factory=set)  # layers written so far


class KvHandoff:
    """Held sequences (prefill side) and incoming transfers (decode side) of one engine."""

    def __init__(self, engine: _Engine) -> None:
        self._engine = engine
        self._held: dict[str, Sequence] = {}  # prefilled, parked for export (n == 1 requests)
        self._incoming: dict[str, IncomingTransfer] = {}  # pages reserved, KV arriving

    # ---- called by the engine ------------------------------------------------------------

    def hold(self, seq: Sequence) -> None:
        """Park a sequence that just sampled its first token and asked to be held."""
        seq.hold_after_prefill = False  # held once: a resumed sequence decodes on
        self._engine.scheduler.detach(seq)
        seq.status = SequenceStatus.HELD
        self._held[seq.request_id] = seq

    def discard(self, seq: Sequence) -> None:
        """``seq`` finished (a stop string may end a held one): it is no longer held."""
        if self._held.get(seq.request_id) is seq:
            del self._held[seq.request_id]

    def forget(self, request_id: str) -> None:
        """The request is being aborted; the abort frees its pages."""
        self._held.pop(request_id, None)
        self._incoming.pop(request_id, None)

    def stats(self) -> dict[str, int]:
        return {"held": len(self._held), "incoming": len(self._incoming)}

    # ---- prefill side --------------------------------------------------------------------

    def is_held(self, request_id: str) -> bool:
        """Whether the request is parked for a hand-off (a dict lookup: safe from another thread)."""
        return request_id in self._held

    def held_requests(self) -> list[str]:
        return list(self._held)

    def export_kv(self, request_id: str) -> KvExport:
        """State and KV handle of a held sequence (read its layers before :meth:`release_held`)."""
        seq = self._held_seq(request_id)
        caches = self._engine.kv_caches
        num_pages = -(-seq.num_computed // self._engine.block_manager.page_size)
        page_ids = self._engine.block_manager.page_table(seq.seq_id)[:num_pages]
        return KvExport(
            request_id=request_id, prompt_ids=list(seq.prompt_ids), output_ids=list(seq.output_ids),
            logprobs=logprobs_to_plain(seq.logprobs) if seq.params.logprobs is not None else None,
            num_tokens=seq.num_computed, num_cached_tokens=seq.num_cached_prompt, page_ids=page_ids,
            num_layers=len(caches), _caches=caches,
            _index=torch.tensor(page_ids, dtype=torch.long, device=caches[0].device),
        )

    def release_held(self, request_id: str) -> None:
        """The KV went elsewhere: free the pages (full ones stay cached) and forget the request."""
        seq = self._held_seq(request_id)
        self._engine.finish_sequence(request_id, seq.index, "transferred")

    def hold_running(self, request_id: str) -> int:
        """DP balance: park a running decode sequence (as after prefill) so it can be exported;
        returns its computed tokens. Raises ``ValueError`` when it cannot move: not a single
        running sequence, not in its decode phase, or with state that does not travel (grammar)."""
        seqs = self._engine.requests_of(request_id)
        if len(seqs) != 1:
            raise ValueError(f"request {request_id!r} is not a single running sequence here")
        seq = seqs[0]
        if seq.status is not SequenceStatus.RUNNING or request_id in self._held:
            raise ValueError(f"request {request_id!r} is {seq.status.value}, not running")
        # Decode phase: everything but the last sampled token is computed (a step boundary).
        if seq.num_output_tokens == 0 or seq.num_uncomputed != 1:
            raise ValueError(f"request {request_id!r} is not in its decode phase")
        if seq.grammar is not None:
            raise ValueError(f"request {request_id!r} has a grammar, whose state does not travel")
        self._engine.scheduler.detach(seq)
        seq.status = SequenceStatus.HELD
        self._held[request_id] = seq
        return seq.num_computed

    def resume_held(self, request_id: str) -> None:
        """No decode worker took it: keep decoding here."""
        seq = self._held_seq(request_id)
        del self._held[request_id]
        self._engine.scheduler.attach(seq)

    def _held_seq(self, request_id: str) -> Sequence:
        seq = self._held.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not held")
        return seq

    # ---- decode side ---------------------------------------------------------------------

    def reserve_transfer(
        self,
        request_id: str,
        prompt_ids: list[int],
        output_ids: list[int],
        params: SamplingParams | None = None,
        *,
        priority: str | Priority = Priority.ONLINE,
        arrival_time: float | None = None,
        num_tokens: int,
        logprobs: list | None = None,
        num_cached_tokens: int = 0,
        generator_state: bytes | None = None,
        recompute: bool = False,
    ) -> list[int]:
        """Create an incoming sequence and fresh pages for ``num_tokens`` tokens of KV.

        With ``recompute`` (a migrated sequence, ``num_tokens == 0``) no KV arrives: the sequence
        is queued to prefill prompt + outputs here, as after a preemption, and no pages are
        reserved (the free pool must hold it now, or this raises :class:`NoFreePagesError`).
        Raises ``ValueError`` on a bad request, :class:`NoFreePagesError` when the pool cannot
        hold the pages even after evicting cached ones (running sequences are never preempted).
        """
        engine = self._engine
        params = params or SamplingParams()
        max_tokens = engine.validate_request(request_id, prompt_ids, params)
        if params.n != 1:
            raise ValueError(f"a transferred request needs n == 1, got n={params.n}")
        if output_ids:
            validate_prompt_ids(list(output_ids), engine.vocab_size)
        total = len(prompt_ids) + len(output_ids)
        if recompute:
            if num_tokens != 0 or not output_ids:
                raise ValueError("a recomputed sequence carries output tokens and no KV (num_tokens == 0)")
        elif not 0 < num_tokens < total:
            # At least the last token must be left to compute: its step samples the next one.
            raise ValueError(f"num_tokens must be in [1, {total - 1}], got {num_tokens}")
        if len(output_ids) >= max_tokens or total >= engine.max_model_len:
            raise ValueError(f"{len(output_ids)} output tokens already reach the request's limit")
        # Seeded noise is a pure function of (seed, position) (see sampler.SeededGenerator): no
        # generator state travels; `generator_state` is accepted from older senders and unused.
        gen = make_generator(params.seed) if params.seed is not None else None
        seq = Sequence(
            request_id=request_id, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
            priority=Priority.parse(priority),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(), generator=gen,
        )
        seq.token_ids.extend(output_ids)
        if logprobs:
            seq.logprobs = logprobs_from_plain(logprobs)
        seq.num_cached_prompt = num_cached_tokens
        if recompute:
            if engine.block_manager.pages_needed(seq.seq_id, total) > engine.block_manager.num_free_pages:
                raise NoFreePagesError(f"no room to recompute {total} tokens")
            seq.num_preemptions = 1  # prefilled again, like a preempted sequence: keeps num_cached_prompt
            engine.adopt(seq)
            engine.scheduler.add(seq)
            return []
        pages = engine.block_manager.reserve(seq.seq_id, num_tokens)  # may raise NoFreePagesError
        seq.status = SequenceStatus.INCOMING
        self._incoming[request_id] = IncomingTransfer(seq, pages, num_tokens)
        engine.adopt(seq)
        return list(pages)

    def write_kv_layers(self, request_id: str, layer_start: int, tensors: list[torch.Tensor]) -> None:
        """Copy transferred ``[2, kv_heads, n_pages, page_size, head_dim]`` blocks into the reserved pages."""
        incoming = self._incoming_transfer(request_id)
        scatter_layers(self._engine.kv_caches, incoming.page_ids, layer_start, tensors)
        incoming.written.update(range(layer_start, layer_start + len(tensors)))

    def commit_transfer(self, request_id: str) -> None:
        """All layers written: register the full pages and start decoding from the next step."""
        incoming = self._incoming_transfer(request_id)
        missing = sorted(set(range(len(self._engine.kv_caches))) - incoming.written)
        if missing:
            raise ValueError(f"request {request_id!r}: layers {missing} were never written")
        seq = incoming.seq
        del self._incoming[request_id]
        seq.num_computed = incoming.num_tokens
        self._engine.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed)
        seq.first_token_time = time.monotonic()
        self._engine.scheduler.attach(seq)

    def cancel_transfer(self, request_id: str) -> None:
        """Give the reserved pages back and forget the request."""
        self._incoming_transfer(request_id)
        self._engine.abort_request(request_id)

    def _incoming_transfer(self, request_id: str) -> IncomingTransfer:
        incoming = self._incoming.get(request_id)
        if incoming is None:
            raise KeyError(f"request {request_id!r} has no transfer in progress")
        return incoming
