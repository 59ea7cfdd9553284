"""The engine: requests in, token deltas out. One step = schedule -> run -> postprocess."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from common.engine.block_manager import BlockManager, NoFreePagesError
from common.engine.config import EngineConfig
from common.engine.kv_cache import allocate_kv_caches, default_kv_budget, num_pages_for_budget, parse_memory_size
from common.engine.kv_transfer import (
    IncomingTransfer,
    KvExport,
    KvStoreHooks,
    logprobs_from_plain,
    logprobs_to_plain,
    scatter_layers,
)
from common.engine.runner import ModelRunner
from common.engine.sampler import Sampler, SamplerOutput, TokenLogprobs, make_generator
from common.engine.sampling_params import SamplingParams, validate_prompt_ids
from common.engine.scheduler import BatchScheduler, ScheduledBatch
from common.engine.sequence import Priority, Sequence, SequenceStatus
from common.models.registry import default_model_path, load_model
from kernels.cpu_ext import paged_decode_module

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "SequenceOutput", "EngineStats", "KvExport", "NoFreePagesError"]

KvEventHook = Callable[[str, list[bytes]], None]
OffloadHook = Callable[[list[bytes], list[torch.Tensor]], None]


@dataclass(slots=True)
class SequenceOutput:
    """What one step produced for one sequence: new tokens and, at the end, why it stopped."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    held: bool = False  # prefilled and parked for a P/D hand-off (see LLMEngine.export_kv)


@dataclass
class EngineStats:
    steps: int = 0
    step_time_total: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    peak_used_pages: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = config.model or default_model_path()
        dtype = config.resolved_dtype()
        self.model, self.model_config = load_model(self.model_path, dtype=dtype, device=config.device)
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.page_size = config.page_size

        kv_dtype = config.resolved_kv_dtype()
        budget = (
            parse_memory_size(config.kv_cache_memory)
            if config.kv_cache_memory is not None
            else default_kv_budget(config.kv_cache_fraction)
        )
        num_pages = num_pages_for_budget(
            budget, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.page_size, kv_dtype
        )
        if num_pages < 2:
            raise ValueError(f"KV cache budget of {budget} bytes holds fewer than 2 pages")
        self.num_pages = num_pages
        kv_caches = allocate_kv_caches(
            num_pages, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, self.page_size, kv_dtype,
            config.device,
        )
        namespace = f"{self.model_path}|{kv_dtype}|{self.page_size}"
        self.kv_caches = kv_caches
        self._kv_event_hook: KvEventHook | None = None
        self.block_manager = BlockManager(
            num_pages, self.page_size, namespace, config.enable_prefix_cache, on_event=self._on_kv_event
        )
        self._store = KvStoreHooks(self.block_manager, kv_caches)
        self.block_manager.on_reclaim = self._store.on_reclaim
        self.scheduler = BatchScheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, kv_caches, self.page_size, Sampler(set(mc.eos_token_ids)),
            self.block_manager.page_table, config.device,
        )
        if torch.device(config.device).type == "cpu":
            # Build (or load the cached build of) the C++ decode kernel now, while starting up,
            # rather than inside the first request's decode step.
            paged_decode_module()
        self.eos_token_ids = set(mc.eos_token_ids)
        self.vocab_size = mc.vocab_size
        self._requests: dict[str, list[Sequence]] = {}
        self._held: dict[str, Sequence] = {}  # prefilled, parked for export (n == 1 requests)
        self._incoming: dict[str, IncomingTransfer] = {}  # pages reserved, KV arriving
        self.stats = EngineStats()
        logger.info(
            "engine ready: model=%s dtype=%s kv_pages=%d x %d tokens (%.1f MiB) max_model_len=%d",
            self.model_path, dtype, num_pages, self.page_size, budget / 2**20, self.max_model_len,
        )

    # ---- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams | None = None,
        priority: str | Priority = Priority.ONLINE,
        arrival_time: float | None = None,
        hold_after_prefill: bool = False,
    ) -> list[Sequence]:
        """Validate and queue a request; raises ``ValueError`` with a clear message on bad input.

        With ``hold_after_prefill`` (``n == 1`` only) the sequence is parked after its first
        output token, pages kept, until :meth:`export_kv` + :meth:`release_held` or
        :meth:`resume_held`.
        """
        params = params or SamplingParams()
        max_tokens = self._validate_request(request_id, prompt_ids, params)
        if hold_after_prefill and params.n != 1:
            raise ValueError(f"hold_after_prefill needs n == 1, got n={params.n}")
        prio = Priority.parse(priority)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs = []
        for index in range(params.n):
            gen = make_generator(params.seed + index) if params.seed is not None else None
            seq = Sequence(
                request_id=request_id, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
                index=index, priority=prio, arrival_time=arrival, generator=gen,
                hold_after_prefill=hold_after_prefill,
            )
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = seqs
        return seqs

    def _validate_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int:
        """Checks shared by add_request and reserve_transfer; returns the resolved max_tokens."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        params.validate()
        validate_prompt_ids(prompt_ids, self.vocab_size)
        params.validate_for_model(len(prompt_ids), self.max_model_len, self.vocab_size)
        max_tokens = params.resolved_max_tokens(len(prompt_ids), self.max_model_len)
        pages = -(-(len(prompt_ids) + max_tokens) // self.page_size)
        if pages > self.num_pages:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) needs {pages} KV pages but the "
                f"cache holds {self.num_pages}; lower max_tokens or raise --kv-cache-memory"
            )
        return max_tokens

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; its pages go back to the pool at once."""
        seqs = self._requests.pop(request_id, None)
        if seqs is None:
            return False
        # Held and incoming sequences are in neither queue; remove() still frees their pages.
        self._held.pop(request_id, None)
        self._incoming.pop(request_id, None)
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.remove(seq)
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = seq.finish_reason or "abort"
        return True

    def finish_sequence(self, request_id: str, index: int, reason: str = "stop") -> None:
        """End one choice early (a stop string matched in its text)."""
        for seq in self._requests.get(request_id, ()):
            if seq.index == index and not seq.is_finished:
                self._finish(seq, reason)
        self._forget_if_done(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return []
        sampled = self.runner.run(batch)
        outputs = self._postprocess(batch, sampled)
        self.stats.steps += 1
        self.stats.step_time_total += time.perf_counter() - t0
        self.stats.preemptions += len(batch.preempted)
        used = self.block_manager.num_used_pages
        self.stats.peak_used_pages = max(self.stats.peak_used_pages, used)
        return outputs

    def _postprocess(self, batch: ScheduledBatch, sampled: SamplerOutput | None) -> list[SequenceOutput]:
        outputs: list[SequenceOutput] = []
        k = 0
        now = time.monotonic()
        for item in batch.items:
            seq = item.seq
            samples = item.samples  # read before num_computed moves
            seq.num_computed += item.num_new_tokens
            if seq.num_output_tokens == 0:
                self.stats.prompt_tokens += item.num_new_tokens
            self.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if not samples:
                continue
            token = sampled.token_ids[k]
            lp = sampled.logprobs[k]
            k += 1
            seq.token_ids.append(token)
            if lp is not None:
                seq.logprobs.append(lp)
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.stats.generated_tokens += 1
            reason = self._stop_reason(seq, token)
            held = False
            if reason is not None:
                self._finish(seq, reason)
            elif seq.hold_after_prefill:
                # Park it: pages stay allocated, nothing more is computed until it is exported
                # (and released) or resumed.
                seq.hold_after_prefill = False
                self.scheduler.detach(seq)
                seq.status = SequenceStatus.HELD
                self._held[seq.request_id] = seq
                held = True
            outputs.append(
                SequenceOutput(
                    request_id=seq.request_id, index=seq.index, new_token_ids=[token],
                    new_logprobs=[lp] if lp is not None else None, finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                    num_cached_tokens=seq.num_cached_prompt, held=held,
                )
            )
            if reason is not None:
                self._forget_if_done(seq.request_id)
        return outputs

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop"
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self._held.get(seq.request_id) is seq:
            del self._held[seq.request_id]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]

    # ---- P/D hand-off: prefill side -----------------------------------------------------

    def is_held(self, request_id: str) -> bool:
        """Whether the request is parked for a hand-off (a dict lookup: safe from another thread)."""
        return request_id in self._held

    def held_requests(self) -> list[str]:
        return list(self._held)

    def export_kv(self, request_id: str) -> KvExport:
        """State and KV handle of a held sequence (engine thread; read it before release_held)."""
        seq = self._held_seq(request_id)
        num_pages = -(-seq.num_computed // self.page_size)
        page_ids = self.block_manager.page_table(seq.seq_id)[:num_pages]
        gen_state = seq.generator.get_state().numpy().tobytes() if seq.generator is not None else None
        return KvExport(
            request_id=request_id, prompt_ids=list(seq.prompt_ids), output_ids=list(seq.output_ids),
            logprobs=logprobs_to_plain(seq.logprobs) if seq.params.logprobs is not None else None,
            num_tokens=seq.num_computed, num_cached_tokens=seq.num_cached_prompt, page_ids=page_ids,
            num_layers=self.num_layers, generator_state=gen_state, _caches=self.kv_caches,
            _index=torch.tensor(page_ids, dtype=torch.long, device=self.kv_caches[0].device),
        )

    def release_held(self, request_id: str) -> None:
        """The KV went elsewhere: free the pages (full ones stay cached) and forget the request."""
        seq = self._held_seq(request_id)
        self._finish(seq, "transferred")
        self._forget_if_done(request_id)

    def resume_held(self, request_id: str) -> None:
        """No decode worker took it: keep decoding here."""
        seq = self._held_seq(request_id)
        del self._held[request_id]
        self.scheduler.attach(seq)

    def _held_seq(self, request_id: str) -> Sequence:
        seq = self._held.get(request_id)
        if seq is None:
            raise KeyError(f"request {request_id!r} is not held")
        return seq

    # ---- P/D hand-off: decode side ------------------------------------------------------

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
    ) -> list[int]:
        """Create an incoming sequence and fresh pages for ``num_tokens`` tokens of KV.

        Raises ``ValueError`` on a bad request, :class:`NoFreePagesError` when the pool cannot
        hold the pages even after evicting cached ones (running sequences are never preempted).
        """
        params = params or SamplingParams()
        max_tokens = self._validate_request(request_id, prompt_ids, params)
        if params.n != 1:
            raise ValueError(f"a transferred request needs n == 1, got n={params.n}")
        if output_ids:
            validate_prompt_ids(list(output_ids), self.vocab_size)
        total = len(prompt_ids) + len(output_ids)
        if not 0 < num_tokens < total:
            # At least the last token must be left to compute: its step samples the next one.
            raise ValueError(f"num_tokens must be in [1, {total - 1}], got {num_tokens}")
        if len(output_ids) >= max_tokens or total >= self.max_model_len:
            raise ValueError(f"{len(output_ids)} output tokens already reach the request's limit")
        gen = None
        if params.seed is not None:
            gen = make_generator(params.seed)
            if generator_state is not None:
                gen.set_state(torch.frombuffer(bytearray(generator_state), dtype=torch.uint8))
        seq = Sequence(
            request_id=request_id, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
            priority=Priority.parse(priority),
            arrival_time=arrival_time if arrival_time is not None else time.monotonic(), generator=gen,
        )
        seq.token_ids.extend(output_ids)
        if logprobs:
            seq.logprobs = logprobs_from_plain(logprobs)
        seq.num_cached_prompt = num_cached_tokens
        pages = self.block_manager.reserve(seq.seq_id, num_tokens)  # may raise NoFreePagesError
        seq.status = SequenceStatus.INCOMING
        self._incoming[request_id] = IncomingTransfer(seq, pages, num_tokens)
        self._requests[request_id] = [seq]
        return list(pages)

    def write_kv_layers(self, request_id: str, layer_start: int, tensors: list[torch.Tensor]) -> None:
        """Copy transferred ``[2, kv_heads, n_pages, page_size, head_dim]`` blocks into the reserved pages."""
        incoming = self._incoming_transfer(request_id)
        scatter_layers(self.kv_caches, incoming.page_ids, layer_start, tensors)
        incoming.written.update(range(layer_start, layer_start + len(tensors)))

    def commit_transfer(self, request_id: str) -> None:
        """All layers written: register the full pages and start decoding from the next step."""
        incoming = self._incoming_transfer(request_id)
        missing = sorted(set(range(self.num_layers)) - incoming.written)
        if missing:
            raise ValueError(f"request {request_id!r}: layers {missing} were never written")
        seq = incoming.seq
        del self._incoming[request_id]
        seq.num_computed = incoming.num_tokens
        self.block_manager.commit(seq.seq_id, seq.token_ids, seq.num_computed)
        seq.first_token_time = time.monotonic()
        self.scheduler.attach(seq)

    def cancel_transfer(self, request_id: str) -> None:
        """Give the reserved pages back and forget the request."""
        self._incoming_transfer(request_id)
        self.abort_request(request_id)

    def _incoming_transfer(self, request_id: str) -> IncomingTransfer:
        incoming = self._incoming.get(request_id)
        if incoming is None:
            raise KeyError(f"request {request_id!r} has no transfer in progress")
        return incoming

    @property
    def kv_namespace(self) -> str:
        return self.block_manager.namespace

    @property
    def num_layers(self) -> int:
        return len(self.kv_caches)

    @property
    def kv_dtype(self) -> torch.dtype:
        return self.kv_caches[0].dtype

    @property
    def kv_page_shape(self) -> tuple[int, int, int, int]:
        two, kv_heads, _, page_size, head_dim = self.kv_caches[0].shape
        return (two, kv_heads, page_size, head_dim)

    # ---- tiered KV store hooks -----------------------------------------------------------

    def set_kv_event_hook(self, fn: KvEventHook | None) -> None:
        """``fn("stored"|"evicted", hashes)`` as full pages enter / leave the local prefix cache."""
        self._kv_event_hook = fn

    def _on_kv_event(self, kind: str, hashes: list[bytes]) -> None:
        if self._kv_event_hook is not None:
            # Called from inside block-manager operations (mid-schedule): a failing listener
            # must not leave a step half planned, so it is logged, not raised.
            try:
                self._kv_event_hook(kind, hashes)
            except Exception:
                logger.exception("KV event hook failed on %s of %d pages", kind, len(hashes))

    def set_offload_hook(self, fn: OffloadHook | None) -> None:
        """``fn(hashes, payloads)`` on the engine thread when cached pages are evicted for reuse,
        before they are overwritten; payloads as :meth:`page_payload`."""
        self._store.offload_hook = fn

    def page_payload(self, page_id: int) -> torch.Tensor:
        """A copy of one page across all layers as flat uint8 (``[L, 2, kv_heads, page_size, head_dim]``)."""
        return self._store.page_payload(page_id)

    def prefix_hashes(self, token_ids: list[int]) -> list[bytes]:
        return self._store.prefix_hashes(token_ids)

    def cached_hashes(self) -> list[bytes]:
        return self.block_manager.cached_hashes()

    def cached_prefix_pages(self, token_ids: list[int]) -> int:
        return self._store.cached_prefix_pages(token_ids)

    def insert_cached_pages(self, token_ids: list[int], start_page: int, payloads: list[torch.Tensor]) -> int:
        """Load pages from a store tier into the prefix cache (evictable); returns pages inserted."""
        return self._store.insert_cached_pages(token_ids, start_page, payloads)

    # ---- introspection ------------------------------------------------------------------

    def load_stats(self) -> dict:
        """What a worker reports in heartbeats and what the benchmark prints."""
        bm = self.block_manager.stats()
        return {
            "waiting": self.scheduler.num_waiting,
            "running": self.scheduler.num_running,
            "num_pages": self.num_pages,
            "free_pages": self.block_manager.num_free_pages,
            "used_pages": self.block_manager.num_used_pages,
            "peak_used_pages": self.stats.peak_used_pages,
            "steps": self.stats.steps,
            "mean_step_time_s": self.stats.step_time_total / max(1, self.stats.steps),
            "preemptions": self.stats.preemptions,
            "queued_prefill_tokens": self.scheduler.queued_prefill_tokens(),
            "prompt_tokens_total": self.stats.prompt_tokens,
            "generated_tokens_total": self.stats.generated_tokens,
            "held": len(self._held),
            "incoming": len(self._incoming),
            "prefix_cache": bm,
        }

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
