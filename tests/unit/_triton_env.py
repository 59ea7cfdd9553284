"""Where the Triton kernel tests run: a CUDA GPU when there is one, else the CPU interpreter.

Imported before anything from ``kernels.triton``: ``@triton.jit`` reads ``TRITON_INTERPRET`` when
a kernel is defined, so it must be set first.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
