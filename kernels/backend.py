"""Which implementation of an op runs for a tensor: Triton, torch_npu, or the PyTorch reference.

* ``triton``: CUDA tensors when the ``triton`` package imports (``kernels/triton/``);
* ``npu``: tensors on an Ascend NPU, where ``torch_npu`` (imported behind a guard: most
  machines do not have it) supplies fused ops such as ``npu_rms_norm``;
* ``reference``: everything else (CPU tensors take the C++ kernels where their callers pick them).

``XLLM_KERNEL_BACKEND=triton|reference`` (or :func:`force_backend`) overrides the choice for every
tensor. Forcing ``triton`` on CPU tensors runs the kernels in Triton's interpreter, which must
be on (``TRITON_INTERPRET=1``) when ``kernels.triton`` is first imported: ``@triton.jit`` reads
it when a kernel is defined. That is how the test suite checks the kernels and the dispatch
wiring without a GPU.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

__all__ = ["BACKENDS", "backend_for", "force_backend", "forced_backend", "triton_available", "torch_npu_module"]

BACKENDS = ("triton", "npu", "reference")
_ENV = "XLLM_KERNEL_BACKEND"


def _from_env() -> str | None:
    value = os.environ.get(_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{_ENV}={value!r}: choose auto, {', '.join(BACKENDS)}")
    return value


_forced: str | None = _from_env()


@functools.cache
def triton_available() -> bool:
    """True when ``triton`` imports (it is an optional dependency: the ``gpu`` extra)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising something else
        logger.debug("triton unavailable: %s", exc)
        return False
    return True


@functools.cache
def torch_npu_module() -> ModuleType | None:
    """``torch_npu`` when it is installed (Ascend machines), else None; imported once."""
    try:
        import torch_npu
    except Exception:
        return None
    return torch_npu


def forced_backend() -> str | None:
    """The backend every op is forced onto, or None for the per-device choice."""
    return _forced


@contextlib.contextmanager
def force_backend(name: str | None) -> Iterator[None]:
    """Run every op on ``name`` (None: the per-device choice) inside the block."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {BACKENDS}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def backend_for(x: torch.Tensor) -> str:
    """The backend that computes an op whose main operand is ``x``."""
    if _forced is not None:
        if _forced == "triton" and x.device.type == "cpu" and not _interpreter_on():
            raise RuntimeError("the triton backend on CPU tensors needs TRITON_INTERPRET=1 (set before "
                               "kernels.triton is imported)")
        return _forced
    kind = x.device.type
    if kind == "cuda" and triton_available():
        return "triton"
    if kind == "npu" and torch_npu_module() is not None:
        return "npu"
    return "reference"


def _interpreter_on() -> bool:
    """Whether ``kernels.triton`` was (or, imported now, will be) built for the interpreter."""
    import sys

    compat = sys.modules.get("kernels.triton._compat")
    if compat is not None:
        return bool(compat.INTERPRETED)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
