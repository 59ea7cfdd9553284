"""CPU kernels in C++ (``kernels/csrc``), built once per machine with torch's extension
loader and cached under ``~/.cache/torch_extensions``. Anything that fails to build falls
back to the PyTorch reference, with one warning; ``XLLM_NO_CPU_EXT=1`` forces the fallback.

All sources go into one module (one compile, one load). It is built with OpenMP so that
``at::parallel_for`` really runs on every intra-op thread: without ``-fopenmp`` the header-only
``parallel_for`` silently degrades to a serial loop.

The module's name carries a hash of its sources and flags: torch keeps one build directory per
name, so two checkouts (or two versions) of xllm on one machine would otherwise rebuild it over
each other on every start (minutes of compiling); with the hash each keeps its own, and a
restarted worker always finds its build. Builds and loads of one module queue on an ``flock`` in its
build folder, which dies with its holder; torch's own ``lock`` file does not, and a build killed
half way left it behind to hang every later start, so one found while holding the flock is stale
and is removed. The hash covers the source folder's path as well: the
build files torch writes name the sources by path, so two checkouts of the same sources sharing
one name would still rebuild each other's.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["paged_decode_module", "cpu_ops_module"]

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = ("paged_decode.cpp", "int8_linear.cpp", "int8_gemm.cpp", "q4_linear.cpp", "q8_linear.cpp", "w8a8.cpp", "fused_ops.cpp", "decoder_stack.cpp", "argmax.cpp", "module.cpp")
# Tuples: torch's load() appends to the flag lists it is given, which changed this module's name.
_CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp")
_LDFLAGS = ("-fopenmp",)


def _module_name() -> str:
    """``xllm_cpu_ops_<hash>``: the sources (and headers beside them), their folder and the flags."""
    digest = hashlib.sha256(" ".join(_CFLAGS + _LDFLAGS).encode() + b"\0" + str(_CSRC).encode())
    for path in sorted(_CSRC.iterdir()):
        if path.suffix in (".cpp", ".h", ".hpp"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"xllm_cpu_ops_{digest.hexdigest()[:12]}"


@functools.cache
def cpu_ops_module():
    """The compiled CPU kernel module, or None when it cannot be built here.

    Exposes ``paged_decode_attention``, ``int8_linear``, ``int8_gemm``, ``argmax_rows``, ``q4_linear``, ``q8_linear``, ``quantize_rows_s8``,
    ``dequant_rows`` and the fused elementwise ops of ``fused_ops.cpp``.
    """
    if os.environ.get("XLLM_NO_CPU_EXT"):
        return None
    try:
        return _build_and_load(_module_name())
    except Exception as exc:  # a missing compiler or ninja: the PyTorch path still works
        logger.warning("C++ CPU kernels unavailable (%s); using the PyTorch path", exc)
        return None


def _build_and_load(name: str):
    from torch.utils.cpp_extension import _get_build_directory, load

    build_dir = Path(_get_build_directory(name, False))
    with open(build_dir / "xllm-build.flock", "a+") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # released by the kernel if this process dies
        baton = build_dir / "lock"
        if baton.exists():
            logger.warning("removing %s, left behind by a build that died", baton)
            baton.unlink(missing_ok=True)
        return load(
            name=name,
            sources=[str(_CSRC / source) for source in _SOURCES],
            extra_cflags=list(_CFLAGS),
            extra_ldflags=list(_LDFLAGS),
            build_directory=str(build_dir),
            verbose=False,
        )


def paged_decode_module():
    """Build (or load) the C++ kernels; kept under this name for the Makefile's prebuild."""
    return cpu_ops_module()
