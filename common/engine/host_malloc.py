"""Keep freed host memory for reuse instead of handing it back to the kernel after every step.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh ``mmap`` pages and
returns them on free, and trims the heap top past its trim threshold. An engine step allocates the
same large tensors every time (a 64-row step's logits are 12.6 MB, its int32 GEMM results as
much), so each step paid the page faults of touching them anew: measured on SmolLM2 at 64 streams
on 2 cores, ~6 ms of a ~50 ms decode step, and 8% of the offline benchmark's throughput.
Raising both thresholds once at start keeps those pages mapped and reused.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

logger = logging.getLogger(__name__)

__all__ = ["keep_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit; larger blocks (rare: a long prompt's logits) are mapped.
MMAP_THRESHOLD = 32 << 20
# Free memory at the heap top kept before trimming: well above one step's temporaries.
TRIM_THRESHOLD = 512 << 20
# glibc's own environment variables: a user who set them chose, so they win.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where it is not glibc or the
    user set them through the environment."""
    if any(name in os.environ for name in _USER_SETTINGS):
        return False
    path = ctypes.util.find_library("c")
    if path is None:
        return False
    try:
        mallopt = ctypes.CDLL(path).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        logger.debug("mallopt refused the thresholds")
    return ok
