"""CPU kernels in C++ (``kernels/csrc``), built once per machine with torch's extension
loader and cached under ``~/.cache/torch_extensions``. Anything that fails to build falls
back to the PyTorch reference, with one warning; ``XLLM_NO_CPU_EXT=1`` forces the fallback."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["paged_decode_module"]

_CSRC = Path(__file__).resolve().parent / "csrc"


@functools.cache
def paged_decode_module():
    """The compiled paged decode attention module, or None when it cannot be built here."""
    if os.environ.get("XLLM_NO_CPU_EXT"):
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="xllm_paged_decode",
            sources=[str(_CSRC / "paged_decode.cpp")],
            extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
            verbose=False,
        )
    except Exception as exc:  # a missing compiler or ninja: the PyTorch path still works
        logger.warning("C++ paged decode attention unavailable (%s); using the PyTorch path", exc)
        return None
