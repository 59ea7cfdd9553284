"""Triton kernels for the GPU path, one op per module, each with a thin Python wrapper.

Each kernel rounds to the activation dtype at the same points as the PyTorch reference it
replaces (``kernels/{norm,rotary,activation,attention}.py``), so bf16 outputs agree with it to
within one rounding. Importing a module here imports ``triton``: callers go through
``kernels.backend`` and import these lazily. On CPU tensors they run in Triton's interpreter
(``TRITON_INTERPRET=1``), which is how the unit tests check them without a GPU.
"""
