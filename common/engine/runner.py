"""Model runner: turns a scheduled batch into tensors, runs the model, samples.

It owns the device-side state: the model, the KV page pool and the sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from common.engine.beam_search import beam_logprobs
from common.engine.grammar_mask import GrammarMasker
from common.engine.multimodal import MultimodalChunk, batch_inputs, encode_missing
from common.engine.sampler import Sampler, SamplerOutput
from common.engine.scheduler import ScheduledBatch
from common.engine.speculative.rows import expand_draft_rows
from kernels.attention import build_attention_metadata
from kernels.linear import bf16_gemms

logger = logging.getLogger(__name__)

__all__ = ["ModelRunner"]


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        page_size: int,
        sampler: Sampler,
        page_tables: Callable[[int], list[int]],
        device: torch.device | str = "cpu",
        grammar: GrammarMasker | None = None,
        w8a8_prompts: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.sampler = sampler
        self._page_table = page_tables
        self.device = torch.device(device)
        self.grammar = grammar  # token masks of structured outputs; None: the engine has none
        self.w8a8_prompts = w8a8_prompts
        # Called instead of the model for text batches when set: CUDA graphs (common/engine/cuda_graphs.py).
        self.decode_graphs: Callable | None = None

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Compute every scheduled chunk; sample one token for each chunk that ends its sequence,
        plus one after each of its speculative drafts (``1 + len(draft)`` tokens, in row order)."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sampled_seqs = []
        beam_rows: list[int] = []  # beam-search rows: log-probs for the engine's beam groups, not a sample
        beam_seqs = []
        mm_chunks: list[MultimodalChunk] = []
        drafts: list[list[int]] = []
        for item in batch.items:
            seq, n, draft = item.seq, item.num_new_tokens, item.draft
            start = seq.num_computed
            if seq.mm is not None:
                mm_chunks.append(MultimodalChunk(len(input_ids), seq.mm, start, n))
            input_ids.extend(seq.token_ids[start : start + n])
            input_ids.extend(draft)
            positions.extend(range(start, start + n + len(draft)))
            query_lens.append(n + len(draft))
            context_lens.append(start + n + len(draft))
            tables.append(self._page_table(seq.seq_id))
            if item.samples and seq.params.use_beam_search:
                beam_rows.append(len(input_ids) - 1)
                beam_seqs.append(seq)
            elif item.samples:
                # A speculating row samples after its last real token and after every draft.
                sample_rows.extend(range(len(input_ids) - 1 - len(draft), len(input_ids)))
                sampled_seqs.append(seq)
                drafts.append(draft)

        draft_rows = expand_draft_rows(sampled_seqs, drafts)
        sampled_seqs = draft_rows.seqs
        # Structured rows: their masks are filled on a thread while the forward pass runs.
        mask_job = self.grammar.start(sampled_seqs, self.device) if self.grammar is not None and sampled_seqs else None
        meta = build_attention_metadata(query_lens, context_lens, tables, self.page_size, self.device)
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        # Prompt tokens skip the W8A8 GEMMs: every later token reads their KV (see kernels.linear).
        has_prompt = not self.w8a8_prompts and any(it.seq.num_computed < it.seq.num_prompt_tokens for it in batch.items)
        with bf16_gemms(has_prompt):
            if mm_chunks:
                encode_missing(self.model, mm_chunks, self.device)
                pos_t, image_rows, image_embeds = batch_inputs(mm_chunks, positions, self.device)
                hidden = self.model(ids_t, pos_t, meta, self.kv_caches, image_rows=image_rows,
                                    image_embeds=image_embeds)
            else:
                pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
                hidden = (self.decode_graphs or self.model)(ids_t, pos_t, meta, self.kv_caches)
        if not sampled_seqs and not beam_seqs:
            return None
        sample_rows = sample_rows + beam_rows  # the beam rows' logits come last
        if len(sample_rows) != hidden.shape[0]:
            # Only the rows that sample reach the lm head. index_select: aten::index (hidden[rows])
            # is far slower on CPU.
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            hidden = hidden.index_select(0, rows)
        logits = self.model.compute_logits(hidden)
        beam_out: dict[int, torch.Tensor] = {}
        if beam_seqs:
            beam_lp = beam_logprobs(logits[len(sampled_seqs):], [s.params.allowed_token_ids for s in beam_seqs])
            beam_out = {s.seq_id: row for s, row in zip(beam_seqs, beam_lp)}
            logits = logits[: len(sampled_seqs)]
        token_mask = self.grammar.wait(mask_job) if mask_job is not None else None
        out = self.sampler(
            logits,
            [s.params for s in sampled_seqs],
            [s.prompt_ids for s in sampled_seqs],
            draft_rows.output_ids,
            draft_rows.generators,
            token_mask=token_mask,
        )
        if token_mask is not None:
            self.grammar.advance(sampled_seqs, out.token_ids)
        out.beam_logprobs = beam_out
        return out
