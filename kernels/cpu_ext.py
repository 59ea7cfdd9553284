"""CPU kernels in C++ (``kernels/csrc``), built once per machine with torch's extension
loader and cached under ``~/.cache/torch_extensions``. Anything that fails to build falls
back to the PyTorch reference, with one warning; ``XLLM_NO_CPU_EXT=1`` forces the fallback.

All sources go into one module (one compile, one load). It is built with OpenMP so that
``at::parallel_for`` really runs on every intra-op thread: without ``-fopenmp`` the header-only
``parallel_for`` silently degrades to a serial loop.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["paged_decode_module", "cpu_ops_module"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("paged_decode.cpp", "int8_linear.cpp", "w8a8.cpp", "fused_ops.cpp", "module.cpp")


@functools.cache
def cpu_ops_module():
    """The compiled CPU kernel module, or None when it cannot be built here.

    Exposes ``paged_decode_attention``, ``int8_linear``, ``quantize_rows_s8``, ``dequant_rows`` and the fused
    elementwise ops of ``fused_ops.cpp``.
    """
    if os.environ.get("XLLM_NO_CPU_EXT"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="xllm_cpu_ops",
            sources=[str(_CSRC / name) for name in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja: the PyTorch path still works
        logger.warning("C++ CPU kernels unavailable (%s); using the PyTorch path", exc)
        return None


def paged_decode_module():
    """Build (or load) the C++ kernels; kept under this name for the Makefile's prebuild."""
    return cpu_ops_module()
