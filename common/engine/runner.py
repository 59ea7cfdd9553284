"""Model runner: turns a scheduled batch into tensors, runs the model, samples.

It owns the device-side state: the model, the KV page pool and the sampler. A step runs in three
parts, so that the overlap pipeline (:mod:`common.engine.overlap`) can build step N+1's inputs
while step N computes: :meth:`ModelRunner.prepare` (host-side layout: positions, page tables,
attention metadata; for a batch planned ahead, the token ids of its rows are not known yet),
:meth:`ModelRunner.launch` (what needs the previous step's tokens: the input ids, the sampler's
rows, the grammar masks) and :meth:`ModelRunner.execute` (the forward pass and sampling).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from common.engine.beam_search import beam_logprobs
from common.engine.grammar_mask import GrammarMasker, MaskJob
from common.engine.multimodal import MultimodalChunk, batch_inputs, encode_missing
from common.engine.sampler import Sampler, SamplerOutput
from common.engine.scheduler import ScheduledBatch, ScheduledSeq
from common.engine.sequence import Sequence
from common.engine.speculative.rows import DraftRows, expand_draft_rows
from kernels.attention import AttentionMetadata, build_attention_metadata
from kernels.linear import bf16_gemms, mark_prompt_w8a8

logger = logging.getLogger(__name__)

__all__ = ["ModelRunner", "StepInputs"]


@dataclass(eq=False)
class StepInputs:
    """One step's inputs, from :meth:`ModelRunner.prepare` to :meth:`ModelRunner.execute`."""

    items: list[ScheduledSeq]
    input_ids: list[int]
    positions: list[int]
    meta: AttentionMetadata
    sample_rows: list[int]
    sampled_seqs: list[Sequence]
    drafts: list[list[int]]
    beam_rows: list[int]  # beam-search rows: log-probs for the engine's beam groups, not a sample
    beam_seqs: list[Sequence]
    mm_chunks: list[MultimodalChunk]
    has_prompt: bool
    # Planned ahead: (row, sequence, position) of each input token sampled by the step before,
    # read from the sequence at launch.
    pending: list[tuple[int, Sequence, int]] = field(default_factory=list)
    # Filled by launch():
    ids: torch.Tensor | None = None
    rows: DraftRows | None = None
    mask_job: MaskJob | None = None


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
        prompt_w8a8_layers: frozenset[str] = frozenset(),
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.sampler = sampler
        self._page_table = page_tables
        self.device = torch.device(device)
        self.grammar = grammar  # token masks of structured outputs; None: the engine has none
        self.w8a8_prompts = w8a8_prompts
        # Without w8a8_prompts, prompt batches run bf16 GEMMs (bf16_gemms) but for these projections.
        mark_prompt_w8a8(model, prompt_w8a8_layers)
        # Called instead of the model for text batches when set: CUDA graphs (common/engine/cuda_graphs.py).
        self.decode_graphs: Callable | None = None

    def run(self, batch: ScheduledBatch) -> SamplerOutput | None:
        """Compute every scheduled chunk; sample one token for each chunk that ends its sequence,
        plus one after each of its speculative drafts (``1 + len(draft)`` tokens, in row order)."""
        inputs = self.prepare(batch.items)
        self.launch(inputs)
        return self.execute(inputs)

    def prepare(self, items: list[ScheduledSeq], ahead: bool = False) -> StepInputs:
        """Lay the batch out. ``ahead``: every item is a one-token decode of the token that the
        step now running samples (its id is read at :meth:`launch`); see common.engine.overlap."""
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        tables: list[list[int]] = []
        sample_rows: list[int] = []
        sampled_seqs: list[Sequence] = []
        beam_rows: list[int] = []
        beam_seqs: list[Sequence] = []
        mm_chunks: list[MultimodalChunk] = []
        drafts: list[list[int]] = []
        pending: list[tuple[int, Sequence, int]] = []
        for item in items:
            seq, n, draft = item.seq, item.num_new_tokens, item.draft
            if ahead:
                start = seq.num_tokens  # the position of the token being sampled now
                pending.append((len(input_ids), seq, start))
                input_ids.append(0)
            else:
                start = seq.num_computed
                if seq.mm is not None:
                    mm_chunks.append(MultimodalChunk(len(input_ids), seq.mm, start, n))
                input_ids.extend(seq.token_ids[start : start + n])
            input_ids.extend(draft)
            positions.extend(range(start, start + n + len(draft)))
            query_lens.append(n + len(draft))
            context_lens.append(start + n + len(draft))
            tables.append(self._page_table(seq.seq_id))
            if ahead or (item.samples and not seq.params.use_beam_search):
                # A speculating row samples after its last real token and after every draft.
                sample_rows.extend(range(len(input_ids) - 1 - len(draft), len(input_ids)))
                sampled_seqs.append(seq)
                drafts.append(draft)
            elif item.samples:
                beam_rows.append(len(input_ids) - 1)
                beam_seqs.append(seq)
        meta = build_attention_metadata(query_lens, context_lens, tables, self.page_size, self.device)
        # Prompt tokens skip the W8A8 GEMMs: every later token reads their KV (see kernels.linear).
        has_prompt = not ahead and not self.w8a8_prompts and any(
            it.seq.num_computed < it.seq.num_prompt_tokens for it in items)
        return StepInputs(items, input_ids, positions, meta, sample_rows, sampled_seqs, drafts, beam_rows, beam_seqs,
                          mm_chunks, has_prompt, pending)

    def launch(self, inputs: StepInputs) -> None:
        """Fill in what the previous step's tokens decide (on the engine thread, once it is done)."""
        for row, seq, position in inputs.pending:
            inputs.input_ids[row] = seq.token_ids[position]
        inputs.ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=self.device)
        inputs.rows = expand_draft_rows(inputs.sampled_seqs, inputs.drafts)
        # Structured rows: their masks are filled on a thread while the forward pass runs.
        seqs = inputs.rows.seqs
        inputs.mask_job = self.grammar.start(seqs, self.device) if self.grammar is not None and seqs else None

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> SamplerOutput | None:
        """The forward pass and sampling of launched inputs (the overlap pipeline runs it on its
        compute thread, while the engine thread plans the next step)."""
        assert inputs.ids is not None and inputs.rows is not None, "execute() before launch()"
        sampled_seqs, beam_seqs = inputs.rows.seqs, inputs.beam_seqs
        with bf16_gemms(inputs.has_prompt):
            if inputs.mm_chunks:
                encode_missing(self.model, inputs.mm_chunks, self.device)
                pos_t, image_rows, image_embeds = batch_inputs(inputs.mm_chunks, inputs.positions, self.device)
                hidden = self.model(inputs.ids, pos_t, inputs.meta, self.kv_caches, image_rows=image_rows,
                                    image_embeds=image_embeds)
            else:
                pos_t = torch.tensor(inputs.positions, dtype=torch.long, device=self.device)
                hidden = (self.decode_graphs or self.model)(inputs.ids, pos_t, inputs.meta, self.kv_caches)
        if not sampled_seqs and not beam_seqs:
            return None
        sample_rows = inputs.sample_rows + inputs.beam_rows  # the beam rows' logits come last
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
        token_mask = self.grammar.wait(inputs.mask_job) if inputs.mask_job is not None else None
        out = self.sampler(
            logits,
            [s.params for s in sampled_seqs],
            [s.prompt_ids for s in sampled_seqs],
            inputs.rows.output_ids,
            inputs.rows.generators,
            token_mask=token_mask,
        )
        if token_mask is not None:
            self.grammar.advance(sampled_seqs, out.token_ids)
        out.beam_logprobs = beam_out
        return out
