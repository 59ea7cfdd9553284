"""Store new keys/values ``[T, KVH, D]`` into their flat page slots; a negative slot is skipped.

The skip is what lets a CUDA graph pad a decode batch to its bucket: padding rows carry slot
-1 and write nothing, so no real page is touched (``common/engine/cuda_graphs.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton._compat import round_to

__all__ = ["store_kv"]


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, cache_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_c_kv, stride_c_h, stride_c_slot, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        mask = d < HEAD_DIM
        dst = cache_ptr + h * stride_c_h + slot * stride_c_slot + d
        k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
        tl.store(dst, round_to(k.to(tl.float32), cache_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + stride_c_kv, round_to(v.to(tl.float32), cache_ptr.dtype.element_ty), mask=mask)


def store_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write ``k``/``v [T, KVH, D]`` at ``slot_mapping [T]`` of ``kv_cache [2, KVH, P, S, D]``."""
    T, KVH, D = k.shape
    if not kv_cache.is_contiguous():
        raise ValueError("store_kv: the KV cache must be contiguous")
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if T == 0:
        return
    _store_kv_kernel[(T, KVH)](
        k, v, kv_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(3), HEAD_DIM=D,
        BLOCK_D=triton.next_power_of_2(D), num_warps=1,
    )
