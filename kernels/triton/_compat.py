"""Two operations that Triton's CPU interpreter (triton 3.8) gets wrong for bfloat16, done right.

* ``x.to(tl.bfloat16)`` rounds to nearest even on a GPU but truncates in the interpreter, which
  would leave every bf16 result of a test up to one unit in the last place off the PyTorch
  reference: :func:`round_to` rounds by hand on the float32 bits first, so the truncation is exact.
* ``tl.dot`` on bfloat16 tiles multiplies their raw 16-bit patterns as integers in the
  interpreter: :func:`mma` widens the tiles to float32 first there. Products of bf16 values are
  exact in float32 and the GPU's bf16 MMA accumulates in float32, so the numbers are the same
  up to summation order.

Compiled for a GPU both are the plain operation: the interpreter branch is a constexpr fixed
when this module is imported, with ``TRITON_INTERPRET`` as ``@triton.jit`` itself reads it.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["INTERPRETED", "round_to", "mma"]

# Read once, as every @triton.jit of this package reads it when the package is imported.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_INTERPRETED = tl.constexpr(INTERPRETED)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """``x`` (float32) as ``dtype``, rounded to nearest even."""
    if _INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, precision: tl.constexpr):
    """``tl.dot(a, b)`` accumulated in float32 (``precision``: "ieee" or "tf32" for fp32 tiles)."""
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=precision)
