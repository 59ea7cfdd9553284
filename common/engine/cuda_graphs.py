"""Decode steps replayed from CUDA graphs, one per batch-size bucket (the multi-graph cache).

A decode step of a small model on a GPU is mostly kernel launch overhead: a few hundred small
launches whose sum of launch latencies exceeds their run time. A CUDA graph records the whole
forward once and replays it with one launch. A graph replays fixed shapes and fixed addresses,
so each bucket size ``B`` (1, 2, 4, ... up to ``max_num_seqs``) gets its own graph over slices of
one set of static input buffers; a decode batch of ``n <= B`` sequences is copied into them and
the rows ``n .. B-1`` are padding that computes harmlessly and writes nothing:

* token id 0 at position 0 (any valid row of the embedding and rotary tables);
* KV slot -1, which the Triton K/V store skips, so no real page is touched;
* context length 1 over whatever page ids the row already holds (every stored id is a valid page).

The attention metadata of a graph is a decode-only :class:`AttentionMetadata` over the same
buffers: the Triton decode kernel reads ``token_pages``/``token_k_len`` and loops only up to each
row's own length, so one page-table width (the model's longest context) serves every step.

Batches that are not decode-only (prefill chunks, speculative verify rows), larger than the
largest bucket, or multimodal, run eagerly. Graphs need the Triton backend (slot -1 skipping,
no host syncs) and a bf16/fp16/fp32 KV cache; a model whose forward cannot be captured (e.g. an
MoE layer that reads routing back to the host) logs why and runs eagerly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kernels.attention import AttentionGroup, AttentionMetadata
from kernels.backend import backend_for

logger = logging.getLogger(__name__)

__all__ = ["graph_buckets", "pick_bucket", "DecodeInputs", "CudaGraphRunner", "maybe_cuda_graphs"]


def graph_buckets(max_batch: int) -> list[int]:
    """Powers of two below ``max_batch``, then ``max_batch`` itself: ``64 -> [1, 2, 4, ..., 64]``,
    ``48 -> [1, 2, ..., 32, 48]``. A batch pads to the next bucket, so at most half its rows (and
    for the last bucket less) are padding."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets = []
    b = 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    buckets.append(max_batch)
    return buckets


def pick_bucket(n: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket that holds ``n`` rows, or None when none does (``buckets`` ascending)."""
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass
class DecodeInputs:
    """The static buffers every graph reads; graph ``B`` reads rows ``[:B]``."""

    input_ids: torch.Tensor  # [max_batch] long
    positions: torch.Tensor  # [max_batch] long
    slot_mapping: torch.Tensor  # [max_batch] long, -1 on padding rows
    pages: torch.Tensor  # [max_batch, max_pages] long
    k_len: torch.Tensor  # [max_batch] long, 1 on padding rows
    token_index: torch.Tensor  # [max_batch, 1] = arange: row i is query i (fixed)
    query_valid: torch.Tensor  # [max_batch, 1] all True (fixed)
    page_size: int

    @classmethod
    def allocate(cls, max_batch: int, max_pages: int, page_size: int, device: torch.device | str) -> DecodeInputs:
        long = dict(dtype=torch.long, device=device)
        return cls(
            input_ids=torch.zeros(max_batch, **long),
            positions=torch.zeros(max_batch, **long),
            slot_mapping=torch.full((max_batch,), -1, **long),
            pages=torch.zeros(max_batch, max_pages, **long),
            k_len=torch.ones(max_batch, **long),
            token_index=torch.arange(max_batch, **long)[:, None],
            query_valid=torch.ones(max_batch, 1, dtype=torch.bool, device=device),
            page_size=page_size,
        )

    @property
    def max_batch(self) -> int:
        return self.input_ids.shape[0]

    def metadata(self, bucket: int) -> AttentionMetadata:
        """The decode-only metadata graph ``bucket`` is captured with (views of the buffers)."""
        group = AttentionGroup(
            token_index=self.token_index[:bucket], query_valid=self.query_valid[:bucket],
            pages=self.pages[:bucket], q_pos=self.positions[:bucket, None], k_len=self.k_len[:bucket],
            page_size=self.page_size,
        )
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], num_tokens=bucket, decode=group, prefill=None,
            token_pages=self.pages[:bucket], token_k_len=self.k_len[:bucket],
        )

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata, bucket: int) -> None:
        """Copy one decode batch of ``n`` rows in and pad rows ``n .. bucket-1`` (device copies,
        no host sync)."""
        n = input_ids.shape[0]
        width = meta.token_pages.shape[1]
        if width > self.pages.shape[1]:
            raise ValueError(f"a page table of {width} pages exceeds the graphs' {self.pages.shape[1]}")
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.pages[:n, :width].copy_(meta.token_pages, non_blocking=True)
        self.k_len[:n].copy_(meta.token_k_len, non_blocking=True)
        if bucket > n:
            self.input_ids[n:bucket].zero_()
            self.positions[n:bucket].zero_()
            self.slot_mapping[n:bucket].fill_(-1)
            self.k_len[n:bucket].fill_(1)


class CudaGraphRunner:
    """Called like the model (``runner(ids, positions, meta, kv_caches) -> hidden``): replays a
    captured graph for decode batches that fit a bucket, runs the model eagerly otherwise."""

    def __init__(self, model: nn.Module, kv_caches: list[torch.Tensor], page_size: int, max_model_len: int,
                 max_batch: int) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buckets = graph_buckets(max_batch)
        device = kv_caches[0].device
        self.inputs = DecodeInputs.allocate(self.buckets[-1], -(-max_model_len // page_size), page_size, device)
        # bucket -> (replay, static output); filled by capture()
        self.graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        self.replays = 0
        self.eager_steps = 0

    def is_graphable(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> int | None:
        """The bucket this step replays, or None when it runs eagerly."""
        n = input_ids.shape[0]
        if meta.prefill is not None or meta.num_tokens != n or n == 0:
            return None
        if meta.token_pages.shape[1] > self.inputs.pages.shape[1]:
            return None  # a table reserved past max_model_len: rare, and fine eagerly
        bucket = pick_bucket(n, self.buckets)
        return bucket if bucket in self.graphs else None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor], **kwargs) -> torch.Tensor:
        bucket = None if kwargs or kv_caches is not self.kv_caches else self.is_graphable(input_ids, meta)
        if bucket is None:
            self.eager_steps += 1
            return self.model(input_ids, positions, meta, kv_caches, **kwargs)
        self.inputs.load(input_ids, positions, meta, bucket)
        replay, out = self.graphs[bucket]
        replay()
        self.replays += 1
        return out[: input_ids.shape[0]]

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first so the shared memory pool is sized once."""
        reserve = getattr(self.model, "reserve_positions", None)
        if reserve is not None:
            # Rotary tables built now: a lookup inside a graph must not grow them (host sync).
            reserve(self.inputs.pages.shape[1] * self.inputs.page_size)
        start = time.perf_counter()
        pool = None
        for bucket in reversed(self.buckets):
            ids, pos = self.inputs.input_ids[:bucket], self.inputs.positions[:bucket]
            meta = self.inputs.metadata(bucket)
            # Warm up off the capture (lazy inits, autotuning, Triton compiles) on a side stream.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.model(ids, pos, meta, self.kv_caches)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = self.model(ids, pos, meta, self.kv_caches)
            pool = graph.pool()
            self.graphs[bucket] = (graph.replay, out)
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch buckets %s) in %.1f s", len(self.graphs), self.buckets,
                    time.perf_counter() - start)


def maybe_cuda_graphs(model: nn.Module, kv_caches: list[torch.Tensor], page_size: int, max_model_len: int,
                      max_batch: int, enabled: bool) -> CudaGraphRunner | None:
    """A captured :class:`CudaGraphRunner` for a CUDA engine, or None (eager) with the reason logged."""
    if not enabled or not kv_caches or kv_caches[0].device.type != "cuda":
        return None
    if kv_caches[0].dtype == torch.int8:
        logger.info("CUDA graphs off: the int8 KV cache runs the reference attention")
        return None
    if backend_for(kv_caches[0]) != "triton":
        logger.warning("CUDA graphs off: they need the Triton kernels (is triton installed?)")
        return None
    runner = CudaGraphRunner(model, kv_caches, page_size, max_model_len, max_batch)
    try:
        runner.capture()
    except Exception as exc:  # a forward that syncs with the host cannot be captured
        logger.warning("CUDA graphs off: capturing the decode forward failed (%s); running eagerly", exc)
        torch.cuda.synchronize()
        return None
    return runner
