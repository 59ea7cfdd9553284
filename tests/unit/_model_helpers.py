"""Helpers for model tests: tiny random HF checkpoints and a paged-KV driver for our models."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import transformers

from kernels.attention import build_attention_metadata
from kernels.kv_quant import kv_row_width

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# HF config class and model class per family name used in the tests
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, unit_offset_norms: bool = False) -> None:
    """Weights large enough that attention is sharp and every component moves the logits.

    HF's default init (std 0.02) leaves attention nearly uniform, which would hide rotary or
    masking mistakes; norms get random scales so a wrong norm convention shows too.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if "norm" in name:
            base = 0.0 if unit_offset_norms else 1.0
            p.copy_(base + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.5 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:
            p.copy_(noise * (1.5 / math.sqrt(p.shape[-1])))


def make_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A tiny random fp32 HF causal LM of ``family`` (eval mode, sdpa attention)."""
    config_cls, model_cls = FAMILIES[family]
    kwargs = {**TINY, **overrides}
    config = config_cls(**kwargs)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    randomize_(model, seed, unit_offset_norms=(family == "gemma3"))
    return model


def save_hf_model(model: transformers.PreTrainedModel, path: Path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@torch.no_grad()
def hf_logits(model: transformers.PreTrainedModel, tokens: list[int]) -> torch.Tensor:
    """Full-sequence logits ``[T, vocab]`` from transformers (no cache)."""
    out = model(torch.tensor([tokens]), use_cache=False)
    return out.logits[0].float()


class PagedDriver:
    """Runs one of our models step by step over a paged KV cache, vLLM style.

    Pages are handed out from the top of the pool downwards, so every sequence's pages are
    non-contiguous and in reverse physical order, and sequences that grow together interleave.
    """

    def __init__(self, model, num_pages: int = 64, page_size: int = 4, dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        self.model = model
        self.page_size = page_size
        dtype = dtype or next(model.parameters()).dtype
        self.kv_caches = [
            torch.zeros(2, cfg.num_key_value_heads, num_pages, page_size, kv_row_width(cfg.head_dim, dtype), dtype=dtype)
            for _ in range(cfg.num_hidden_layers)
        ]
        self.free_pages = list(range(num_pages))
        self.block_tables: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    def _reserve(self, seq: int, new_len: int) -> None:
        table = self.block_tables.setdefault(seq, [])
        while len(table) * self.page_size < new_len:
            table.append(self.free_pages.pop())

    @torch.no_grad()
    def step(self, chunks: list[tuple[int, list[int]]]) -> list[torch.Tensor]:
        """Feed new tokens for several sequences in one flat batch; logits ``[n, V]`` per chunk."""
        query_lens, context_lens, tables, ids, positions = [], [], [], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            self._reserve(seq, end)
            self.lengths[seq] = end
            query_lens.append(len(tokens))
            context_lens.append(end)
            tables.append(self.block_tables[seq])
            ids.extend(tokens)
            positions.extend(range(start, end))
        meta = build_attention_metadata(query_lens, context_lens, tables, self.page_size)
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv_caches)
        logits = self.model.compute_logits(hidden)
        return list(torch.split(logits, query_lens))
