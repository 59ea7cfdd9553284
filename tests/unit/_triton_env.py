"""Where the Triton kernel tests run: a CUDA GPU when there is one, else the CPU interpreter.

Imported before anything from ``kernels.triton``: ``@triton.jit`` reads ``TRITON_INTERPRET`` when
a kernel is defined (and triton's own lazy imports read it again later), so without a GPU it is
set for the rest of the test process. Processes that other tests start inherit it, harmlessly:
CPU tensors never reach ``kernels.triton`` unless a test forces the Triton backend.
"""

from __future__ import annotations

import importlib.util
import os

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
if HAS_TRITON and not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
