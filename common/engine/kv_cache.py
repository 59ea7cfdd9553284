"""The KV page pool: sizing it and allocating it.

One tensor per layer shaped ``[2, num_kv_heads, num_pages, page_size, row]`` (K then V), where a
row is ``head_dim`` values, or for an int8 pool ``head_dim`` int8 values and their inline fp32
scale (``kernels/kv_quant.py``). The layout is fixed because ``kernels/attention.py`` reads it. Which page belongs to which
sequence is the block manager's business (``common/engine/block_manager.py``); this module
only owns the memory.
"""

from __future__ import annotations

import logging
import math
import mmap
import os

import torch

from common.settings import parse_memory_size
from kernels.kv_quant import kv_row_width

__all__ = [
    "kv_page_bytes",
    "num_pages_for_budget",
    "default_kv_budget",
    "parse_memory_size",
    "allocate_kv_caches",
]

logger = logging.getLogger(__name__)

_DTYPES_BY_NAME: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    name = dtype.removeprefix("torch.").lower()
    if name not in _DTYPES_BY_NAME:
        raise ValueError(f"unsupported KV cache dtype {dtype!r}; use one of {sorted(_DTYPES_BY_NAME)}")
    return _DTYPES_BY_NAME[name]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def kv_page_bytes(
    num_layers: int, num_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype | str
) -> int:
    """Bytes one page takes across all layers, K and V together."""
    _check_positive(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, page_size=page_size)
    dtype = _resolve_dtype(dtype)
    return 2 * num_layers * page_size * num_kv_heads * kv_row_width(head_dim, dtype) * dtype.itemsize


def num_pages_for_budget(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype | str,
) -> int:
    """How many whole pages fit in ``budget_bytes`` (0 when not even one does)."""
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    return budget_bytes // kv_page_bytes(num_layers, num_kv_heads, head_dim, page_size, dtype)


def _available_host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except OSError:
        pass
    # Not Linux (or no MemAvailable on very old kernels): free physical pages is the closest.
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def default_kv_budget(fraction: float = 0.3, device: torch.device | str = "cpu") -> int:
    """A fraction of the memory free right now: host MemAvailable, or free memory on a CUDA device."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
    else:
        free = _available_host_memory()
    budget = int(free * fraction)
    logger.debug("KV budget %d bytes (%.0f%% of %d free on %s)", budget, fraction * 100, free, device)
    return budget


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A zeroed tensor; on the CPU from an anonymous mmap, whose pages the kernel zeroes on first
    touch: ``torch.zeros`` writes every byte of a multi-GiB pool at start (measured 13.7 s for
    3.4 GiB on a loaded 2-core box), the mmap costs nothing until a page is used."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    # Private: a shared anonymous map is shmem, which transparent huge pages leave alone.
    buf = mmap.mmap(-1, max(1, numel * torch.empty((), dtype=dtype).element_size()),
                    flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if os.environ.get("XLLM_KV_HUGEPAGES", "0") == "1":
        _advise_huge_pages(buf)
    return torch.frombuffer(buf, dtype=dtype, count=numel).view(shape)  # the tensor keeps buf alive


def _advise_huge_pages(buf: mmap.mmap) -> None:
    """Ask for 2 MiB pages (transparent huge pages; most distributions enable them on request only),
    with ``XLLM_KV_HUGEPAGES=1``. Decode attention reads each context page by page, and a context's
    pages lie anywhere in the pool: with 4 KiB pages more of those reads miss the TLB (64 scattered
    contexts: 0.97 ms per layer against 0.80 with huge pages). But a huge page's first touch zeroes
    all 2 MiB, one per layer, K/V and KV head that a prefill reaches, and on a VM whose host backs
    memory lazily that ran at ~1 GB/s: a fresh engine's 64-stream offline run (prompt 200, output 128)
    was 8% slower with them (1,010 against 1,094 tok/s, alternating runs), the prompt steps' KV
    writes taking ~1 s. So they are off unless asked for: a server that has touched its pool once
    gains the TLB hits back."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return
    try:
        buf.madvise(advice)
    except OSError:  # a kernel without transparent huge pages: 4 KiB pages, as before
        pass


def allocate_kv_caches(
    num_pages: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype | str,
    device: torch.device | str = "cpu",
) -> list[torch.Tensor]:
    """One zeroed ``[2, num_kv_heads, num_pages, page_size, row]`` tensor per layer (row: see the module doc)."""
    _check_positive(
        num_pages=num_pages,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=page_size,
    )
    dtype = _resolve_dtype(dtype)
    shape = (2, num_kv_heads, num_pages, page_size, kv_row_width(head_dim, dtype))
    caches = [_zeros(shape, dtype, device) for _ in range(num_layers)]
    total = kv_page_bytes(num_layers, num_kv_heads, head_dim, page_size, dtype) * num_pages
    logger.info(
        "allocated KV cache: %d layers x %d pages x %d tokens (%.1f MiB, %s, %s)",
        num_layers, num_pages, page_size, total / 2**20, dtype, device,
    )
    return caches

