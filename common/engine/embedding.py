"""Embeddings from the served model: a prefill-only forward, pooled over the final hidden states.

The model's own `forward` (the one the runner calls) gives the hidden states after the final
norm; nothing samples. Several inputs share one forward (the flat token batch of continuous
batching, packed up to the engine's token budget); an input longer than the budget runs alone in
chunks through its pages, exactly as chunked prefill does. KV pages come from the engine's pool
(fresh, never registered in the prefix cache) and go back the moment the forward is done, so an
embedding keeps no KV and running generations only lose the pages for the time of one call.

Pooling (`POOLINGS`):
- ``last``: the last token's hidden state. The default: in a causal decoder only the last token
  has attended to the whole input, which is why decoder-based embedding models (E5-Mistral,
  GTE-Qwen, vLLM's default pooler for causal LMs) take it.
- ``mean``: the mean over every token of the input.
Pooling is done in float32 whatever the model's dtype; L2 normalisation is on by default.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from common.engine.block_manager import NoFreePagesError
from common.engine.sampling_params import validate_prompt_ids
from kernels.attention import build_attention_metadata

if TYPE_CHECKING:
    from common.engine.engine import LLMEngine

__all__ = ["POOLINGS", "DEFAULT_POOLING", "EmbeddingInputError", "check_embedding_input", "embed_token_lists"]

POOLINGS = ("last", "mean")
DEFAULT_POOLING = "last"

# Page-table keys of the scratch sequences: never equal to a generation's integer seq ids.
_keys = itertools.count()


class EmbeddingInputError(ValueError):
    """An input the model cannot embed (empty, over the context window, outside the vocabulary)."""


def check_embedding_input(engine: LLMEngine, token_ids: Sequence[int]) -> None:
    """Raise `EmbeddingInputError` naming what is wrong with one input; nothing else changes."""
    if not token_ids:
        raise EmbeddingInputError("the input is empty: at least one token is needed")
    if len(token_ids) > engine.max_model_len:
        raise EmbeddingInputError(
            f"the input has {len(token_ids)} tokens but the model's context window is {engine.max_model_len}")
    pages = -(-len(token_ids) // engine.page_size)
    if pages > engine.num_pages:
        raise EmbeddingInputError(
            f"the input ({len(token_ids)} tokens) needs {pages} KV pages but the cache holds {engine.num_pages}")
    try:
        validate_prompt_ids(list(token_ids), engine.vocab_size)
    except ValueError as exc:
        raise EmbeddingInputError(str(exc)) from None


@torch.inference_mode()
def embed_token_lists(engine: LLMEngine, token_lists: Sequence[Sequence[int]], pooling: str = DEFAULT_POOLING,
                      normalize: bool = True) -> torch.Tensor:
    """``[len(token_lists), hidden]`` float32 embeddings (on the CPU), in input order.

    `engine` is an `LLMEngine` (its model, KV pool, block manager and token budget are used);
    call it on the engine's thread, between steps. Raises `EmbeddingInputError` for a bad input
    (before any work) and `NoFreePagesError` when running generations hold the pages an input
    needs right now.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    for ids in token_lists:
        check_embedding_input(engine, ids)
    out: list[torch.Tensor] = []
    for group in _groups(engine, token_lists):
        out.extend(_embed_group(engine, [token_lists[i] for i in group], pooling))
    if not out:
        return torch.empty((0, engine.model_config.hidden_size), dtype=torch.float32)
    result = torch.stack(out).cpu()
    return F.normalize(result, p=2.0, dim=-1) if normalize else result


def _groups(engine: LLMEngine, token_lists: Sequence[Sequence[int]]) -> list[list[int]]:
    """Consecutive inputs packed into forwards of at most the engine's token budget and of the
    pages free now (a longer input is a group of its own, run in chunks)."""
    budget = engine.config.max_num_batched_tokens
    max_seqs = engine.config.max_num_seqs
    free = engine.block_manager.num_free_pages
    page_size = engine.page_size
    groups: list[list[int]] = []
    current: list[int] = []
    tokens = pages = 0
    for i, ids in enumerate(token_lists):
        need = -(-len(ids) // page_size)
        if current and (tokens + len(ids) > budget or pages + need > free or len(current) >= max_seqs):
            groups.append(current)
            current, tokens, pages = [], 0, 0
        current.append(i)
        tokens += len(ids)
        pages += need
    if current:
        groups.append(current)
    return groups


def _embed_group(engine: LLMEngine, inputs: list[Sequence[int]], pooling: str) -> list[torch.Tensor]:
    bm = engine.block_manager
    keys = [("embed", next(_keys)) for _ in inputs]
    try:
        tables = []
        for key, ids in zip(keys, inputs):
            try:
                tables.append(bm.reserve(key, len(ids)))
            except NoFreePagesError as exc:
                raise NoFreePagesError(f"no KV pages free for a {len(ids)}-token input right now ({exc})") from None
        if len(inputs) == 1 and len(inputs[0]) > engine.config.max_num_batched_tokens:
            return [_embed_chunked(engine, inputs[0], tables[0], pooling)]
        lens = [len(ids) for ids in inputs]
        flat = [t for ids in inputs for t in ids]
        positions = [p for n in lens for p in range(n)]
        hidden = _forward(engine, flat, positions, lens, lens, tables).float()
        pooled = []
        for rows in torch.split(hidden, lens):
            pooled.append(rows[-1].clone() if pooling == "last" else rows.mean(dim=0))
        return pooled
    finally:
        for key in keys:
            bm.free(key)


def _embed_chunked(engine: LLMEngine, ids: Sequence[int], table: list[int], pooling: str) -> torch.Tensor:
    chunk = engine.config.max_num_batched_tokens
    total: torch.Tensor | None = None
    last: torch.Tensor | None = None
    for start in range(0, len(ids), chunk):
        end = min(len(ids), start + chunk)
        hidden = _forward(engine, list(ids[start:end]), list(range(start, end)), [end - start], [end], [table])
        hidden = hidden.float()
        last = hidden[-1].clone()
        part = hidden.sum(dim=0)
        total = part if total is None else total + part
    assert total is not None and last is not None
    return last if pooling == "last" else total / len(ids)


def _forward(engine: LLMEngine, input_ids: list[int], positions: list[int], query_lens: list[int],
             context_lens: list[int], tables: list[list[int]]) -> torch.Tensor:
    """The model's forward over one flat batch: hidden states after the final norm."""
    device = engine.runner.device
    meta = build_attention_metadata(query_lens, context_lens, tables, engine.page_size, device)
    ids_t = torch.tensor(input_ids, dtype=torch.long, device=device)
    pos_t = torch.tensor(positions, dtype=torch.long, device=device)
    return engine.model(ids_t, pos_t, meta, engine.kv_caches)
