"""Paged attention against a naive per-query loop, on a mixed batch with scattered pages."""

import pytest
import torch

import kernels.attention as attention
from kernels.attention import build_attention_metadata, paged_attention, write_kv
from kernels.cpu_ext import paged_decode_module

H, KVH, D, PAGE = 4, 2, 8, 4


def naive(q_tok, keys, values, pos, scale, window, cap):
    k = keys[: pos + 1].repeat_interleave(H // KVH, 1)
    v = values[: pos + 1].repeat_interleave(H // KVH, 1)
    scores = torch.einsum("hd,lhd->hl", q_tok, k) * scale
    if cap:
        scores = torch.tanh(scores / cap) * cap
    if window:
        scores[:, : max(0, pos + 1 - window)] = float("-inf")
    return torch.einsum("hl,lhd->hd", scores.softmax(-1), v)


@pytest.fixture(params=["cpp", "torch"])
def decode_path(request, monkeypatch):
    """Run each case through the C++ kernel (every token a query) and through the PyTorch fallback."""
    if request.param == "cpp":
        # The C++ kernel is the default CPU decode path: it must build wherever the tests run.
        assert paged_decode_module() is not None
    else:
        monkeypatch.setattr(attention, "paged_decode_module", lambda: None)
    return request.param


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("cap", [None, 5.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_batch_matches_naive(window, cap, dtype, decode_path):
    torch.manual_seed(0)
    # A fresh 7-token prefill, a decode at context 10, and a 3-token chunk after 5 cached tokens.
    query_lens, context_lens = [7, 1, 3], [7, 10, 8]
    tables = [[3, 5], [1, 7, 9], [11, 2]]
    cache = torch.zeros(2, KVH, 16, PAGE, D, dtype=dtype)
    keys = [torch.randn(c, KVH, D) for c in context_lens]
    values = [torch.randn(c, KVH, D) for c in context_lens]
    for i, c in enumerate(context_lens):
        for p in range(c - query_lens[i]):  # the cached part
            page, off = tables[i][p // PAGE], p % PAGE
            cache[0, :, page, off], cache[1, :, page, off] = keys[i][p], values[i][p]
    meta = build_attention_metadata(query_lens, context_lens, tables, PAGE)
    new_k = torch.cat([keys[i][c - n:] for i, (n, c) in enumerate(zip(query_lens, context_lens))])
    new_v = torch.cat([values[i][c - n:] for i, (n, c) in enumerate(zip(query_lens, context_lens))])
    write_kv(cache, new_k, new_v, meta.slot_mapping)
    q = torch.randn(sum(query_lens), H, D)
    out = paged_attention(q.to(dtype), cache, meta, 0.3, window, cap).float()

    expected, t = [], 0
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        kf, vf = keys[i].to(dtype).float(), values[i].to(dtype).float()
        for j in range(n):
            expected.append(naive(q[t].to(dtype).float(), kf, vf, c - n + j, 0.3, window, cap))
            t += 1
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert (out - torch.stack(expected)).abs().max() < tol


def test_slot_mapping_follows_page_tables():
    meta = build_attention_metadata([2, 1], [5, 3], [[6, 2], [4]], PAGE)
    # seq 0 writes positions 3, 4 -> page 6 slot 3, page 2 slot 0; seq 1 writes position 2 -> page 4 slot 2
    assert meta.slot_mapping.tolist() == [6 * PAGE + 3, 2 * PAGE + 0, 4 * PAGE + 2]
    assert meta.num_tokens == 3
    assert meta.decode is not None and meta.prefill is not None


@pytest.mark.parametrize("max_splits", [1, 3])
def test_prefill_runs_share_rows_exactly(max_splits):
    """The bf16 kernel attends up to four consecutive tokens of a prefill chunk together; every
    token must still see exactly its own prefix. Two decodes that share a prefix page, with
    consecutive lengths, look like such a run but read different pages after it."""
    ext = paged_decode_module()
    assert ext is not None
    torch.manual_seed(1)
    heads, kv_heads, dim, page = 9, 3, 64, 4
    # A fresh 11-token prefill, a 6-token chunk after 5 cached tokens, then two decodes at contexts
    # 9 and 10 whose first two pages are shared (a common prompt) and whose third differs.
    query_lens, context_lens = [11, 6, 1, 1], [11, 11, 9, 10]
    tables = [[3, 5, 8], [1, 7, 9], [11, 12, 2], [11, 12, 6]]
    cache = torch.randn(2, kv_heads, 16, page, dim).to(torch.bfloat16)
    meta = build_attention_metadata(query_lens, context_lens, tables, page)
    q = torch.randn(sum(query_lens), heads, dim).to(torch.bfloat16)
    out = ext.paged_decode_attention(q, cache[0], cache[1], meta.token_pages, meta.token_k_len, 0.125, -1, 0.0,
                                     max_splits=max_splits).float()
    expected, t = [], 0
    for i, (n, c) in enumerate(zip(query_lens, context_lens)):
        slots = [tables[i][p // page] * page + p % page for p in range(c)]
        k = cache[0].reshape(kv_heads, -1, dim)[:, slots].float().repeat_interleave(heads // kv_heads, 0)
        v = cache[1].reshape(kv_heads, -1, dim)[:, slots].float().repeat_interleave(heads // kv_heads, 0)
        for j in range(n):
            pos = c - n + j
            scores = torch.einsum("hd,hld->hl", q[t].float(), k[:, : pos + 1]) * 0.125
            expected.append(torch.einsum("hl,hld->hd", scores.softmax(-1), v[:, : pos + 1]))
            t += 1
    assert (out - torch.stack(expected)).abs().max() < 2e-2
