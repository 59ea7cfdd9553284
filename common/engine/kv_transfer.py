"""Moving KV pages in and out of the page pool: the wire formats, and the tiered KV store's hooks.

Two wire formats, both over the fixed pool layout ``[2, kv_heads, num_pages, page_size, row]``
per layer (``row`` = head_dim, or for int8 pages head_dim values and the row's inline scale, so the
scales move with the pages in both formats; see ``kernels/kv_quant.py``):

* **hand-off, per layer**: one sequence's pages of one layer, ``[2, kv_heads, n_pages, page_size,
  head_dim]`` (``index_select`` on the page dim), so a transfer can stream layer by layer;
* **store payload, per page**: one page across all layers, ``[num_layers, 2, kv_heads, page_size,
  head_dim]`` in the cache dtype, viewed as flat ``uint8`` — the unit the store tiers keep under
  the page's chained prefix hash.

Everything here runs on the engine thread, between steps: the pool is only consistent there.
The P/D hand-off's state (held and incoming sequences) is in :mod:`common.engine.handoff`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.engine.block_manager import BlockManager, prefix_hashes
from common.engine.sampler import TokenLogprobs

logger = logging.getLogger(__name__)

KvEventHook = Callable[[str, list[bytes]], None]  # ("stored" | "evicted", hashes)
OffloadHook = Callable[[list[bytes], list[torch.Tensor]], None]  # (hashes, page payloads)

__all__ = [
    "KvExport",
    "KvStoreHooks",
    "KvEventHook",
    "OffloadHook",
    "logprobs_to_plain",
    "logprobs_from_plain",
    "scatter_layers",
    "page_payload_bytes",
    "pack_pages",
    "unpack_pages",
    "payload_as_uint8",
]


@dataclass
class KvExport:
    """A held sequence's state and a handle on its KV pages, for sending to a decode worker.

    :meth:`layer` reads the live pool: call it on the engine thread, before ``release_held``.
    """

    request_id: str
    prompt_ids: list[int]
    output_ids: list[int]
    logprobs: list[dict[str, Any]] | None
    num_tokens: int  # tokens whose KV is in the pages (seq.num_computed)
    num_cached_tokens: int
    page_ids: list[int]
    num_layers: int
    # torch.Generator state of a seeded sequence, so sampling continues the same stream remotely.
    generator_state: bytes | None = None  # unused since seeded sampling is counter-based (kept for old peers)
    _caches: list[torch.Tensor] = field(default_factory=list, repr=False)
    _index: torch.Tensor | None = field(default=None, repr=False)

    def layer(self, i: int) -> torch.Tensor:
        """A contiguous copy of layer ``i``'s pages: ``[2, kv_heads, len(page_ids), page_size, head_dim]``."""
        if not 0 <= i < self.num_layers:
            raise IndexError(f"layer {i} out of range for {self.num_layers} layers")
        return self._caches[i].index_select(2, self._index)

    def layers(self, start: int, stop: int) -> list[torch.Tensor]:
        return [self.layer(i) for i in range(start, stop)]


def logprobs_to_plain(logprobs: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    return [
        {"token_id": lp.token_id, "logprob": lp.logprob, "rank": lp.rank, "top": [list(t) for t in lp.top]}
        for lp in logprobs
    ]


def logprobs_from_plain(items: Sequence[TokenLogprobs | dict[str, Any]]) -> list[TokenLogprobs]:
    out = []
    for item in items:
        if isinstance(item, TokenLogprobs):
            out.append(item)
        else:
            top = [(int(t), float(v)) for t, v in item.get("top", [])]
            out.append(TokenLogprobs(int(item["token_id"]), float(item["logprob"]), int(item["rank"]), top))
    return out


def scatter_layers(
    caches: Sequence[torch.Tensor],
    page_ids: Sequence[int],
    layer_start: int,
    tensors: Sequence[torch.Tensor],
) -> None:
    """Copy per-layer page blocks into ``page_ids`` of layers ``layer_start + j``; all checked first."""
    num_layers = len(caches)
    if layer_start < 0 or layer_start + len(tensors) > num_layers:
        raise ValueError(f"layers {layer_start}..{layer_start + len(tensors) - 1} out of range for {num_layers}")
    cache = caches[0]
    two, kv_heads, _, page_size, head_dim = cache.shape
    want = (two, kv_heads, len(page_ids), page_size, head_dim)
    for j, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"layer {layer_start + j}: expected a tensor, got {type(t).__name__}")
        if tuple(t.shape) != want:
            raise ValueError(f"layer {layer_start + j}: KV block shape {tuple(t.shape)}, expected {want}")
        if t.dtype != cache.dtype and torch.int8 in (t.dtype, cache.dtype):
            # int8 rows carry their scales (kernels/kv_quant.py): a cast would turn them into garbage.
            raise ValueError(f"layer {layer_start + j}: KV block dtype {t.dtype} cannot go into a {cache.dtype} pool")
    index = torch.tensor(list(page_ids), dtype=torch.long, device=cache.device)
    for j, t in enumerate(tensors):
        target = caches[layer_start + j]
        # .to() copies across device/dtype; index_copy_ copies again into the pool, so the
        # (possibly read-only, foreign-buffer) source is never aliased.
        target.index_copy_(2, index, t.to(device=target.device, dtype=target.dtype))


def page_payload_bytes(caches: Sequence[torch.Tensor]) -> int:
    """Bytes of one page across all layers (the store payload size)."""
    c = caches[0]
    two, kv_heads, _, page_size, head_dim = c.shape
    return len(caches) * two * kv_heads * page_size * head_dim * c.element_size()


def pack_pages(caches: Sequence[torch.Tensor], page_ids: Sequence[int]) -> list[torch.Tensor]:
    """Store payloads of ``page_ids``: one gather per layer, then per-page flat uint8 views of
    one fresh buffer (a copy: the pool may overwrite the pages right after)."""
    if not page_ids:
        return []
    device = caches[0].device
    index = torch.tensor(list(page_ids), dtype=torch.long, device=device)
    stacked = torch.stack([c.index_select(2, index) for c in caches])  # [L, 2, H, n, P, D]
    per_page = stacked.permute(3, 0, 1, 2, 4, 5).contiguous()  # [n, L, 2, H, P, D]
    flat = per_page.view(len(page_ids), -1).view(torch.uint8)
    return list(flat.unbind(0))


def payload_as_uint8(payload: torch.Tensor | bytes | bytearray | memoryview) -> torch.Tensor:
    """A flat uint8 view (or copy, for buffers) of one payload."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    if not isinstance(payload, torch.Tensor):
        raise ValueError(f"payload must be a tensor or bytes, got {type(payload).__name__}")
    t = payload.contiguous().reshape(-1)
    return t if t.dtype == torch.uint8 else t.view(torch.uint8)


def unpack_pages(caches: Sequence[torch.Tensor], page_ids: Sequence[int], payloads: Sequence[torch.Tensor]) -> None:
    """Write store payloads (already validated, flat uint8) into ``page_ids`` of every layer."""
    if not page_ids:
        return
    c = caches[0]
    two, kv_heads, _, page_size, head_dim = c.shape
    device = c.device
    data = torch.stack([p.to(device) for p in payloads])  # [n, bytes]
    data = data.view(c.dtype).view(len(page_ids), len(caches), two, kv_heads, page_size, head_dim)
    index = torch.tensor(list(page_ids), dtype=torch.long, device=device)
    for i, cache in enumerate(caches):
        cache.index_copy_(2, index, data[:, i].permute(1, 2, 0, 3, 4))


class KvStoreHooks:
    """The engine's side of the tiered KV store (``engine.store_hooks``): prefix-cache events out,
    page payloads out on eviction, payloads back in as cached pages on reload.

    Installs itself as the block manager's ``on_event`` and ``on_reclaim``. Calls run on the
    engine thread; :meth:`prefix_hashes` touches no state and may run anywhere.
    """

    def __init__(self, block_manager: BlockManager, kv_caches: list[torch.Tensor]) -> None:
        self.block_manager = block_manager
        self.kv_caches = kv_caches
        self.payload_bytes = page_payload_bytes(kv_caches)
        self._event_hook: KvEventHook | None = None
        self._offload_hook: OffloadHook | None = None
        block_manager.on_event = self._on_event
        block_manager.on_reclaim = self._on_reclaim

    def set_kv_event_hook(self, fn: KvEventHook | None) -> None:
        """``fn("stored"|"evicted", hashes)`` as full pages enter / leave the local prefix cache."""
        self._event_hook = fn

    def set_offload_hook(self, fn: OffloadHook | None) -> None:
        """``fn(hashes, payloads)`` when cached pages are evicted for reuse, before they are
        overwritten; payloads as :meth:`page_payload`."""
        self._offload_hook = fn

    def _on_event(self, kind: str, hashes: list[bytes]) -> None:
        if self._event_hook is None:
            return
        # Called from inside block-manager operations (mid-schedule): a failing listener must not
        # leave a step half planned, so it is logged, not raised.
        try:
            self._event_hook(kind, hashes)
        except Exception:
            logger.exception("KV event hook failed on %s of %d pages", kind, len(hashes))

    def _on_reclaim(self, pages: list[int], hashes: list[bytes]) -> None:
        """Cached pages are about to be reused; their KV is still intact."""
        if self._offload_hook is None:
            return
        # Offloading is best effort and runs mid-schedule: a failure loses the copy, not the step.
        try:
            self._offload_hook(hashes, pack_pages(self.kv_caches, pages))
        except Exception:
            logger.exception("offload hook failed for %d pages", len(pages))

    def page_payload(self, page_id: int) -> torch.Tensor:
        """A copy of one page across all layers as flat uint8 (``[L, 2, kv_heads, page_size, head_dim]``)."""
        if not 0 <= page_id < self.block_manager.num_pages:
            raise ValueError(f"page {page_id} out of range for {self.block_manager.num_pages} pages")
        return pack_pages(self.kv_caches, [page_id])[0]

    def prefix_hashes(self, token_ids: Sequence[int]) -> list[bytes]:
        """The store keys of ``token_ids``' full pages (chained hashes in this engine's namespace)."""
        bm = self.block_manager
        return prefix_hashes(token_ids, bm.page_size, bm.namespace)

    def cached_hashes(self) -> list[bytes]:
        """Every hash in the local prefix cache (a prefix index's resync)."""
        return self.block_manager.cached_hashes()

    def cached_prefix_pages(self, token_ids: Sequence[int]) -> int:
        """Leading full pages of ``token_ids`` in the local prefix cache; changes nothing."""
        return self.block_manager.cached_prefix_pages(token_ids)

    def insert_cached_pages(
        self, token_ids: Sequence[int], start_page: int, payloads: Sequence[torch.Tensor | bytes]
    ) -> int:
        """Load pages ``start_page ..`` of ``token_ids`` from a store tier into the prefix cache
        (evictable); returns pages inserted (see :meth:`BlockManager.insert_cached`)."""
        flat = [payload_as_uint8(p) for p in payloads]
        for j, p in enumerate(flat):
            if p.numel() != self.payload_bytes:
                raise ValueError(
                    f"payload {j} (page {start_page + j}) has {p.numel()} bytes, expected {self.payload_bytes}"
                )
        if start_page < 0:
            raise ValueError(f"start_page must be >= 0, got {start_page}")

        def write(indices: list[int], pages: list[int]) -> None:
            unpack_pages(self.kv_caches, pages, [flat[i - start_page] for i in indices])

        return self.block_manager.insert_cached(token_ids, start_page, len(flat), write)
