"""The engine: requests in, ``step()`` = schedule -> run -> postprocess, token deltas out.

Moving KV in and out of the page pool lives beside it, in parts the engine owns: the P/D hand-off
(``engine.handoff``, :mod:`common.engine.handoff`) and the tiered KV store's hooks
(``engine.store_hooks``, :mod:`common.engine.kv_transfer`). Not thread-safe: one thread drives it.
With ``--overlap-schedule`` on, ``step()`` plans the next step on a helper thread while it computes
(``engine.pipeline``, :mod:`common.engine.overlap`); nothing of it runs between two calls.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from common.engine.beam_groups import BeamGroup, BeamGroups
from common.engine.block_manager import BlockManager, NoFreePagesError
from common.engine.config import EngineConfig
from common.engine.cuda_graphs import maybe_cuda_graphs
from common.engine.expert_parallel import ExpertParallel
from common.engine.grammar_mask import GrammarMasker
from common.engine.handoff import KvHandoff
from common.engine.host_malloc import keep_freed_memory
from common.engine.kv_cache import allocate_kv_caches, default_kv_budget, num_pages_for_budget, parse_memory_size
from common.engine.kv_transfer import KvStoreHooks
from common.engine.multimodal import ImageItem, build_multimodal_state
from common.engine.outputs import EngineStats, SequenceOutput
from common.engine.overlap import OverlapPipeline, resolve_min_batch
from common.engine.runner import ModelRunner
from common.engine.sampler import Sampler, SamplerOutput, TokenLogprobs, make_generator
from common.engine.sampling_params import SamplingParams, validate_prompt_ids
from common.engine.scheduler import BatchScheduler, ScheduledBatch
from common.engine.sequence import Priority, Sequence, SequenceStatus
from common.engine.speculative import accepted_length, make_speculator
from common.models.registry import default_model_path, load_model
from kernels.cpu_ext import paged_decode_module

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "SequenceOutput", "EngineStats", "NoFreePagesError"]


class LLMEngine:
    """One model, its KV page pool and batch scheduler; :meth:`step` advances every running sequence."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.speculator = make_speculator(config)  # validates the speculative settings first
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if torch.device(config.device).type == "cpu":
            keep_freed_memory()  # a step's large temporaries reuse pages instead of faulting them in
        self.model_path = config.model or default_model_path()
        dtype = config.resolved_dtype()
        self.model, self.model_config = load_model(self.model_path, dtype=dtype, device=config.device,
                                                   cache_dir=config.resolved_weight_cache_dir())
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
        self.block_manager = BlockManager(num_pages, self.page_size, namespace, config.enable_prefix_cache)
        self.store_hooks = KvStoreHooks(self.block_manager, kv_caches)  # takes the block manager's callbacks
        self.scheduler = BatchScheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(
            self.model, kv_caches, self.page_size, Sampler(set(mc.eos_token_ids)),
            self.block_manager.page_table, config.device,
            grammar=GrammarMasker(self.model_path, mc.vocab_size, mc.eos_token_ids),
            w8a8_prompts=config.w8a8_prompts, prompt_w8a8_layers=config.prompt_w8a8_set(),
        )
        self.runner.decode_graphs = maybe_cuda_graphs(self.model, kv_caches, self.page_size, self.max_model_len,
                                                      config.max_num_seqs, config.cuda_graphs)
        if torch.device(config.device).type == "cpu":
            # Build (or load the cached build of) the C++ decode kernel now, while starting up,
            # rather than inside the first request's decode step.
            paged_decode_module()
        self.experts = ExpertParallel.for_model(self.model, config)  # MoE statistics and EPLB (None: dense)
        min_batch = resolve_min_batch(config.overlap_schedule, config.device, config.overlap_min_batch)
        self.pipeline = None if min_batch is None else OverlapPipeline(
            self.scheduler, self.runner, self.block_manager, self.max_model_len, min_batch)
        if self.speculator is not None:
            self.scheduler.propose_drafts = lambda seq: self.speculator.propose(seq, self.max_model_len)
        self.eos_token_ids = set(mc.eos_token_ids)
        self.vocab_size = mc.vocab_size
        self._requests: dict[str, list[Sequence]] = {}
        self.handoff = KvHandoff(self)
        self.beams = BeamGroups(self.scheduler, self.block_manager, kv_caches, self.eos_token_ids)
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
        images: list[ImageItem] | None = None,
    ) -> list[Sequence]:
        """Validate and queue a request; raises ``ValueError`` with a clear message on bad input.

        ``images`` (vision-language models only): the prompt already holds each image's expanded
        placeholders; items without embeddings are encoded by the model's vision tower when their
        tokens are first computed (see :mod:`common.engine.multimodal`).

        With ``hold_after_prefill`` (``n == 1`` only) the sequence is parked after its first
        output token, pages kept, until ``handoff.export_kv`` + ``handoff.release_held`` or
        ``handoff.resume_held``.
        """
        params = params or SamplingParams()
        max_tokens = self.validate_request(request_id, prompt_ids, params)
        if hold_after_prefill and (params.n != 1 or params.use_beam_search):
            raise ValueError(f"hold_after_prefill needs n == 1 without beam search, got n={params.n}")
        mm = self._multimodal_state(prompt_ids, images, hold_after_prefill) if images else None
        prio = Priority.parse(priority)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        if params.use_beam_search:  # one sequence (the prompt) that forks into the beams
            seq = Sequence(request_id=request_id, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
                           priority=prio, arrival_time=arrival)
            self.scheduler.add(seq)
            self._requests[request_id] = self.beams.start(seq).live
            return self._requests[request_id]
        seqs = []
        for index in range(params.n):
            gen = make_generator(params.seed + index) if params.seed is not None else None
            seq = Sequence(
                request_id=request_id, prompt_ids=list(prompt_ids), params=params, max_tokens=max_tokens,
                index=index, priority=prio, arrival_time=arrival, generator=gen,
                hold_after_prefill=hold_after_prefill, mm=mm,
            )
            seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = seqs
        return seqs

    def _multimodal_state(self, prompt_ids: list[int], images: list[ImageItem], hold_after_prefill: bool):
        mc = self.model_config
        if not mc.is_multimodal:
            raise ValueError(f"model {self.model_path} is text-only ({mc.architecture}); it cannot take images")
        if hold_after_prefill:
            # The decode side would need the images' M-RoPE positions and hash ids: not carried.
            raise ValueError("a P/D hand-off of a request with images is not supported; serve it on one worker")
        return build_multimodal_state(list(prompt_ids), list(images), mc.image_token_id, mc.merge_size,
                                      mc.hidden_size)

    def validate_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> int:
        """Checks shared by add_request and ``handoff.reserve_transfer``; returns the resolved max_tokens."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in flight")
        params.validate()
        validate_prompt_ids(prompt_ids, self.vocab_size)
        params.validate_for_model(len(prompt_ids), self.max_model_len, self.vocab_size)
        max_tokens = params.resolved_max_tokens(len(prompt_ids), self.max_model_len)
        pages = -(-(len(prompt_ids) + max_tokens) // self.page_size)
        if params.use_beam_search:  # the beams share the prompt's pages; each needs its own for the rest
            pages = len(prompt_ids) // self.page_size + params.n * (-(-max_tokens // self.page_size) + 1)
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
        self.handoff.forget(request_id)
        self.beams.forget(request_id)
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

    def adopt(self, seq: Sequence) -> None:
        """Track a one-sequence request that is in no queue yet (its KV is arriving from elsewhere)."""
        self._requests[seq.request_id] = [seq]

    def requests_of(self, request_id: str) -> list[Sequence]:
        """The sequences of a request in flight here (none when unknown)."""
        return list(self._requests.get(request_id, ()))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # ---- the step -----------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        t0 = time.perf_counter()
        # Overlap on: the batch planned beside the last step, if it still holds (common.engine.overlap).
        batch = self.pipeline.take_planned() if self.pipeline is not None else None
        if batch is None:
            batch = self.scheduler.schedule()
            if not batch and self.beams.release_parked():
                batch = self.scheduler.schedule()  # parked beams' pages were all that blocked the queue
        if not batch:
            return []
        sampled = self.pipeline.run(batch) if self.pipeline is not None else self.runner.run(batch)
        outputs = self._postprocess(batch, sampled)
        if self.experts is not None:
            self.experts.after_step()  # a step boundary: the only place experts are re-placed
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
            if not samples:
                self.block_manager.commit(seq.seq_id, seq.hash_token_ids, seq.num_computed)
                continue
            if seq.params.use_beam_search:  # no token sampled: its log-probs go to its beam group
                self.block_manager.commit(seq.seq_id, seq.hash_token_ids, seq.num_computed)
                self.beams.collect(seq, sampled.beam_logprobs[seq.seq_id])
                self.stats.generated_tokens += 1
                continue
            rows = 1 + len(item.draft)
            tokens = sampled.token_ids[k : k + rows]
            lps = sampled.logprobs[k : k + rows]
            k += rows
            if item.draft:
                # The accepted drafts, then the target's own token after them.
                tokens = tokens[: accepted_length(item.draft, tokens) + 1]
                self.speculator.record(seq, len(item.draft), len(tokens) - 1)
            new_tokens: list[int] = []
            new_lps: list[TokenLogprobs] = []
            reason = None
            for token, lp in zip(tokens, lps):
                seq.token_ids.append(token)
                new_tokens.append(token)
                if lp is not None:
                    seq.logprobs.append(lp)
                    new_lps.append(lp)
                reason = self._stop_reason(seq, token)
                if reason is not None:  # a stop inside an accepted run drops what follows it
                    break
            # The KV of every emitted token but the last was written this step (as a draft).
            seq.num_computed += len(new_tokens) - 1
            self.block_manager.commit(seq.seq_id, seq.hash_token_ids, seq.num_computed)
            if item.draft and reason is None:
                self.block_manager.trim(seq.seq_id, seq.num_tokens)  # rejected drafts' pages
            if seq.first_token_time is None:
                seq.first_token_time = now
            self.stats.generated_tokens += len(new_tokens)
            held = False
            if reason is not None:
                self._finish(seq, reason)
            elif seq.hold_after_prefill:
                self.handoff.hold(seq)
                held = True
            outputs.append(
                SequenceOutput(
                    request_id=seq.request_id, index=seq.index, new_token_ids=new_tokens,
                    new_logprobs=new_lps or None, finish_reason=reason,
                    num_prompt_tokens=seq.num_prompt_tokens, num_output_tokens=seq.num_output_tokens,
                    num_cached_tokens=seq.num_cached_prompt, held=held,
                )
            )
            if reason is not None:
                self._forget_if_done(seq.request_id)
        for group in self.beams.advance():
            outputs.extend(self._beam_outputs(group))
        return outputs

    def _beam_outputs(self, group: BeamGroup) -> list[SequenceOutput]:
        """A finished beam request's beams, best first, as choices 0..n-1 (each in one piece)."""
        self._forget_if_done(group.request_id)
        first = group.live[0]
        return [
            SequenceOutput(
                request_id=group.request_id, index=index, new_token_ids=list(beam.token_ids), new_logprobs=None,
                finish_reason=beam.finish_reason, num_prompt_tokens=first.num_prompt_tokens,
                num_output_tokens=len(beam.token_ids), num_cached_tokens=first.num_cached_prompt,
                cumulative_logprob=beam.cumulative_logprob,
            )
            for index, beam in enumerate(group.results or [])
        ]

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if token in params.stop_token_ids:
                return "stop"
            if not params.ignore_eos and token in self.eos_token_ids:
                return "stop"
        if seq.grammar is not None and seq.grammar.is_stopped():
            return "stop"  # structured output complete: nothing but EOS could follow
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        if self.speculator is not None:
            self.speculator.finished(seq)
        self.handoff.discard(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self._requests.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self._requests[request_id]

    # ---- the KV layout ------------------------------------------------------------------

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

    # ---- introspection ------------------------------------------------------------------

    def load_stats(self) -> dict[str, Any]:
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
            **self.handoff.stats(),
            **(self.speculator.load_stats() if self.speculator is not None else {}),
            **(self.pipeline.stats() if self.pipeline is not None else {}),
            "prefix_cache": bm,
            **({"expert_load": self.experts.stats()} if self.experts is not None else {}),
        }

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
