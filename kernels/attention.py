"""Attention over the paged KV cache (PyTorch reference, correct for mixed batches).

The batch is a flat run of tokens: each sequence contributes ``query_len`` new tokens
(a prefill chunk, or one token when decoding) whose keys and values are written into the
page pool first; attention then reads the whole context of every sequence back from the
pages. Sequences are split into two groups so neither pays for the other's shape:

* decode group (query_len == 1): the query heads that share a KV head are folded into the
  query axis and the batch runs as two batched matmuls over contiguous gathered pages (the
  flash kernel is slower than that for one-token queries on CPU);
* prefill group (query_len > 1): queries are padded to the longest chunk and masked causally.

With the C++ kernels on CPU the whole batch instead runs as one call of the paged decode
kernel, every token a query of its own over its sequence's pages up to its position: K/V rows
are read in place and shared in cache by a chunk's neighbouring tokens, no padding, masks or
gathers. For 3 x ~170-token prefill chunks that is 1.5 ms per layer against 3.8 ms for the
padded, masked flash SDPA (which does not skip masked blocks at these sizes).

On CUDA (``kernels.backend`` picks ``triton``) the Triton kernels in ``kernels/triton/`` do it: a
decode-only batch is one launch over the per-token page tables (fixed shapes, so CUDA graphs can
capture it), a mixed batch one decode launch and one causal prefill launch; K/V writes skip slot
-1 (a graph's padding rows). An int8 cache keeps the reference path there.

Everything that depends only on the batch layout (gather indices, masks) is built once per
step in :func:`build_attention_metadata` and shared by every layer.

KV cache layout, one tensor per layer: ``[2, num_kv_heads, num_pages, page_size, row]``; a row is
``head_dim`` values, or in an int8 cache ``head_dim`` int8 values and their scale (``kernels/kv_quant.py``):
writes quantize, the C++ kernel dequantizes as it reads, this reference path dequantizes the
gathered pages. Head-major pages make a gather of a batch's pages come out as ``[KVH, B, L, D]``, contiguous
and ready for batched matmuls, without a transposing copy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kernels.backend import backend_for
from kernels.cpu_ext import paged_decode_module
from kernels.kv_quant import dequantize_kv_rows, quantize_kv_rows

__all__ = [
    "AttentionGroup",
    "AttentionMetadata",
    "build_attention_metadata",
    "write_kv",
    "paged_attention",
]


@dataclass
class AttentionGroup:
    """Sequences of one shape class (all decodes, or all prefill chunks)."""

    token_index: torch.Tensor  # [B, Q] index of each query slot in the flat batch (padding -> 0)
    query_valid: torch.Tensor  # [B, Q] bool, False on padding
    pages: torch.Tensor  # [B, P] page ids covering each context (padding -> page 0, masked out)
    q_pos: torch.Tensor  # [B, Q] absolute position of each query
    k_len: torch.Tensor  # [B] context length (cached + new)
    page_size: int
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def is_decode(self) -> bool:
        return self.token_index.shape[1] == 1

    def valid_rows(self) -> torch.Tensor:
        """Flat indices ``[N]`` of the non-padding query slots in ``[B * Q]`` (cached)."""
        cached = self._masks.get("valid_rows")
        if cached is None:
            cached = self._masks["valid_rows"] = self.query_valid.reshape(-1).nonzero().squeeze(1)
        return cached

    def bias(self, sliding_window: int | None = None) -> torch.Tensor:
        """Additive float mask ``[1, B, Q, L]`` (0 = attend, -inf = not), cached per window."""
        key = ("bias", sliding_window)
        cached = self._masks.get(key)
        if cached is None:
            allowed = self.mask(sliding_window)[:, 0]
            cached = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
            cached = cached.masked_fill_(~allowed, float("-inf"))[None]
            self._masks[key] = cached
        return cached

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean mask [B, 1, Q, L] (True = attend), cached per window size."""
        cached = self._masks.get(sliding_window)
        if cached is not None:
            return cached
        L = self.pages.shape[1] * self.page_size
        k_pos = torch.arange(L, device=self.pages.device)
        q_pos = self.q_pos[:, :, None]
        m = (k_pos[None, None, :] <= q_pos) & (k_pos[None, None, :] < self.k_len[:, None, None])
        if sliding_window is not None:
            m &= (q_pos - k_pos[None, None, :]) < sliding_window
        # Padding query rows attend to everything so softmax stays finite; they are dropped.
        m |= ~self.query_valid[:, :, None]
        m = m[:, None]
        self._masks[sliding_window] = m
        return m


@dataclass
class AttentionMetadata:
    """Per-step batch layout shared by every attention layer."""

    slot_mapping: torch.Tensor  # [T] flat cache slot where each new token's K/V is written
    num_tokens: int
    decode: AttentionGroup | None
    prefill: AttentionGroup | None
    token_pages: torch.Tensor  # [T, P] the page table of each token's sequence
    token_k_len: torch.Tensor  # [T] keys each token attends to (its position + 1)


def _build_group(
    seq_ids: list[int],
    query_starts: list[int],
    query_lens: list[int],
    context_lens: list[int],
    page_table: torch.Tensor,
    page_size: int,
    device: torch.device,
) -> AttentionGroup:
    q_max = max(query_lens[i] for i in seq_ids)
    l_max = max(context_lens[i] for i in seq_ids)
    idx = torch.tensor(seq_ids, dtype=torch.long)
    qlens = torch.tensor([query_lens[i] for i in seq_ids], dtype=torch.long)
    qstarts = torch.tensor([query_starts[i] for i in seq_ids], dtype=torch.long)
    klens = torch.tensor([context_lens[i] for i in seq_ids], dtype=torch.long)
    ar = torch.arange(q_max, dtype=torch.long)
    valid = ar[None, :] < qlens[:, None]
    token_index = torch.where(valid, qstarts[:, None] + ar[None, :], 0)
    q_pos = (klens - qlens)[:, None] + ar[None, :]
    pages = page_table[idx, : -(-l_max // page_size)]
    return AttentionGroup(
        token_index=token_index.to(device),
        query_valid=valid.to(device),
        pages=pages.to(device),
        q_pos=q_pos.to(device),
        k_len=klens.to(device),
        page_size=page_size,
    )


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    page_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Lay out one step's batch.

    ``query_lens[i]`` new tokens of sequence ``i`` sit consecutively in the flat batch, in
    sequence order; ``context_lens[i]`` counts cached plus new tokens, so the new tokens have
    positions ``context_lens[i] - query_lens[i] ... context_lens[i] - 1``. ``block_tables[i]``
    lists the pages of sequence ``i`` in logical order and must cover ``context_lens[i]``.
    """
    device = torch.device(device)
    n = len(query_lens)
    max_pages = max(len(bt) for bt in block_tables)
    # One tensor from padded lists: a tensor per sequence cost ~4 us each, 0.25 ms of a 64-row step.
    bt = torch.tensor([[*pages, *[0] * (max_pages - len(pages))] for pages in block_tables], dtype=torch.long)
    slot_tables = (bt[:, :, None] * page_size + torch.arange(page_size)).reshape(n, -1)

    query_starts: list[int] = []
    start = 0
    for i in range(n):
        query_starts.append(start)
        start += query_lens[i]
    qlens_t = torch.tensor(query_lens, dtype=torch.long)
    ctx_t = torch.tensor(context_lens, dtype=torch.long)
    seq_of_token = torch.repeat_interleave(torch.arange(n), qlens_t)
    starts_t = torch.tensor(query_starts, dtype=torch.long)
    offset_in_query = torch.arange(start) - starts_t[seq_of_token]
    positions = (ctx_t - qlens_t)[seq_of_token] + offset_in_query
    slot_mapping = slot_tables[seq_of_token, positions]

    decode_ids = [i for i in range(n) if query_lens[i] == 1]
    prefill_ids = [i for i in range(n) if query_lens[i] > 1]
    decode = (
        _build_group(decode_ids, query_starts, query_lens, context_lens, bt, page_size, device)
        if decode_ids
        else None
    )
    prefill = (
        _build_group(prefill_ids, query_starts, query_lens, context_lens, bt, page_size, device)
        if prefill_ids
        else None
    )
    return AttentionMetadata(
        slot_mapping=slot_mapping.to(device), num_tokens=start, decode=decode, prefill=prefill,
        token_pages=bt.index_select(0, seq_of_token).to(device), token_k_len=(positions + 1).to(device),
    )


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store new keys/values ``[T, KVH, D]`` at their flat slots (quantized in an int8 cache)."""
    if kv_cache.dtype != torch.int8 and backend_for(kv_cache) == "triton":
        from kernels.triton.kv_store import store_kv

        return store_kv(kv_cache, k, v, slot_mapping)  # skips slot -1 (CUDA-graph padding rows)
    flat = kv_cache.view(2, kv_cache.shape[1], -1, kv_cache.shape[-1])  # [2, KVH, slots, row]
    if flat.dtype == torch.int8:
        k, v = quantize_kv_rows(k), quantize_kv_rows(v)
    flat[0].index_copy_(1, slot_mapping, k.transpose(0, 1).to(flat.dtype))
    flat[1].index_copy_(1, slot_mapping, v.transpose(0, 1).to(flat.dtype))


def _softcapped_attention(q, k, v, mask, scale, soft_cap):
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / soft_cap) * soft_cap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)


def _group_attention(
    q: torch.Tensor,
    k_pages: torch.Tensor,
    v_pages: torch.Tensor,
    group: AttentionGroup,
    scale: float,
    sliding_window: int | None,
    soft_cap: float | None,
) -> torch.Tensor:
    """Attention for one group; returns ``[B, Q, H, D]``."""
    B, Q = group.token_index.shape
    H, D = q.shape[1], q.shape[2]
    # index_select, not advanced indexing: aten::index is ~100x slower on CPU for these gathers.
    qg = q.index_select(0, group.token_index.reshape(-1)).view(B, Q, H, D)
    if Q == 1 and k_pages.device.type == "cpu" and (ext := paged_decode_module()) is not None:
        # Reads the pages in place: no gathered copy of every context, every layer.
        out = ext.paged_decode_attention(qg.view(B, H, D), k_pages, v_pages, group.pages, group.k_len, scale,
                                         sliding_window or -1, soft_cap or 0.0)
        return out.view(B, 1, H, D)
    KVH = k_pages.shape[0]
    L = group.pages.shape[1] * group.page_size
    # Gather whole pages (contiguous runs of page_size * D per head), not single slots.
    flat_pages = group.pages.reshape(-1)
    k = k_pages.index_select(1, flat_pages).view(KVH, B, L, -1)
    v = v_pages.index_select(1, flat_pages).view(KVH, B, L, -1)
    if k.dtype == torch.int8:
        k, v = dequantize_kv_rows(k, q.dtype), dequantize_kv_rows(v, q.dtype)
    if Q == 1:
        # Fold the query heads that share a KV head into the query axis: no GQA expansion.
        qh = qg.view(B, KVH, H // KVH, D).transpose(0, 1)  # [KVH, B, G, D]
        scores = torch.matmul(qh, k.transpose(-1, -2)).float() * scale  # [KVH, B, G, L]
        if soft_cap is not None:
            scores = torch.tanh(scores / soft_cap) * soft_cap
        probs = torch.softmax(scores + group.bias(sliding_window), dim=-1).to(v.dtype)
        return torch.matmul(probs, v).transpose(0, 1).reshape(B, 1, H, D)
    mask = group.mask(sliding_window)  # [B, 1, Q, L]
    k, v = k.transpose(0, 1), v.transpose(0, 1)  # [B, KVH, L, D] views
    qh = qg.transpose(1, 2)  # [B, H, Q, D]
    if H != KVH:
        G = H // KVH
        k = k[:, :, None].expand(B, KVH, G, L, D).reshape(B, H, L, D)
        v = v[:, :, None].expand(B, KVH, G, L, D).reshape(B, H, L, D)
    if soft_cap is None:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale)
    else:
        out = _softcapped_attention(qh, k, v, mask, scale, soft_cap)
    return out.transpose(1, 2)


def _triton_paged_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                            sliding_window: int | None, soft_cap: float | None) -> torch.Tensor:
    """Triton kernels (bf16/fp16/fp32 caches; an int8 cache takes the reference path): a decode-only
    batch is one launch over the per-token tables, a mixed one a decode and a prefill launch."""
    from kernels.triton.paged_decode_attention import paged_decode_attention
    from kernels.triton.paged_prefill_attention import paged_prefill_attention

    k_pages, v_pages = kv_cache[0], kv_cache[1]
    if meta.prefill is None:
        return paged_decode_attention(q, k_pages, v_pages, meta.token_pages, meta.token_k_len, scale,
                                      sliding_window, soft_cap)
    out = torch.empty_like(q)
    if (d := meta.decode) is not None:
        paged_decode_attention(q, k_pages, v_pages, d.pages, d.k_len, scale, sliding_window, soft_cap,
                               rows=d.token_index[:, 0], out=out)
    p = meta.prefill
    paged_prefill_attention(q, k_pages, v_pages, p.token_index, p.query_valid, p.q_pos, p.k_len, p.pages,
                            scale, sliding_window, soft_cap, out=out)
    return out


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Causal attention of ``q [T, H, D]`` over each sequence's paged context.

    The new tokens' K/V must already be in the cache (see :func:`write_kv`). Returns
    ``[T, H, D]``. ``sliding_window`` limits each query to that many most recent keys
    (itself included); ``soft_cap`` applies ``tanh`` capping to the scores.
    """
    T, H, D = q.shape
    if kv_cache.dtype != torch.int8:
        q = q.to(kv_cache.dtype)
        if backend_for(kv_cache) == "triton":
            return _triton_paged_attention(q, kv_cache, meta, scale, sliding_window, soft_cap)
    if kv_cache.device.type == "cpu" and (ext := paged_decode_module()) is not None:
        # Every token a query of its own (see the module docstring): the output is already in
        # token order, no gather of q, no scatter of the result.
        return ext.paged_decode_attention(q, kv_cache[0], kv_cache[1], meta.token_pages, meta.token_k_len, scale,
                                          sliding_window or -1, soft_cap or 0.0)
    out = q.new_empty((T, H, D))
    for group in (meta.decode, meta.prefill):
        if group is None:
            continue
        res = _group_attention(q, kv_cache[0], kv_cache[1], group, scale, sliding_window, soft_cap)
        if group.is_decode:
            out.index_copy_(0, group.token_index[:, 0], res[:, 0])
        else:
            rows = group.valid_rows()
            out.index_copy_(0, group.token_index.reshape(-1).index_select(0, rows),
                            res.reshape(-1, H, D).index_select(0, rows))
    return out
