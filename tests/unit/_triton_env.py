"""Where the Triton kernel tests run: a CUDA GPU when there is one, else the CPU interpreter.

Without a GPU, ``TRITON_INTERPRET=1`` must be set before anything imports triton: ``@triton.jit``
reads it when a function is defined, triton's own library functions included, which are defined
when triton is first imported (transformers imports it). ``tests/conftest.py`` sets it first
thing; this module checks that it did. Processes that other tests start inherit it, harmlessly:
CPU tensors never reach ``kernels.triton`` unless a test forces the Triton backend.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if HAS_TRITON and not ON_GPU and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("TRITON_INTERPRET=1 must be set before triton is imported (tests/conftest.py sets it)")
