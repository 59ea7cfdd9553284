"""Model runner: turns a scheduled batch into tensors, runs the model, samples.

It owns the device-side state: the model, the KV page pool and the sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from common.engine.grammar_mask import GrammarMasker
from common.engine.sampler import Sampler, SamplerOutput
from common.engine.scheduler import ScheduledBatch
from common.engine.speculative.rows import expand_draft_rows
from kernels.attention import build_attention_metadata

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
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.page_size = page_size
        self.sampler = sampler
        self._page_table = page_tables
        self.device = torch.device(device)
        self.grammar = grammar  # token masks of structured outputs; None: the engine has none

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
        drafts: list[list[int]] = []
        for item in batch.items:
            seq, n, draft = item.seq, item.num_new_tokens, item.draft
            start = seq.num_computed
            input_ids.extend(seq.token_ids[start : start + n])
            input_ids.extend(draft)
            positions.extend(range(start, start + n + len(draft)))
            query_lens.append(n + len(draft))
            context_lens.append(start + n + len(draft))
            tables.append(self._page_table(seq.seq_id))
            if item.samples:
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
        pos_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden = self.model(ids_t, pos_t, meta, self.kv_caches)
        if not sampled_seqs:
            return None
        if len(sample_rows) != hidden.shape[0]:
            # Only the rows that sample reach the lm head. index_select: aten::index (hidden[rows])
            # is far slower on CPU.
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            hidden = hidden.index_select(0, rows)
        logits = self.model.compute_logits(hidden)
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
        return out
