"""Small helpers the kernel launchers and kernels share."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact for float32 inputs, TF32 otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


def empty(dev, dtype, *shape):
    return torch.empty(*shape, device=dev, dtype=dtype)


# The histogram of log p that the decode scoring builds for the selection: the keys per bin of
# `order_key(log p)`, bins 2^HIST_SHIFT images wide from log p = -64 (HIST_LOW = order_key(-64.0)) up
# to -0.25: 128 bins per factor of two of |log p|; what lies beyond falls in the first or last bin.
HIST_BINS = tl.constexpr(2048)
HIST_SHIFT = tl.constexpr(15)
HIST_LOW = tl.constexpr(-1115684865)


@triton.jit
def order_key(x):
    """An int32 image of float32 `x` in the same order (the sign bit flipped into two's complement)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def hist_bin(key):
    """The histogram bin of an `order_key` (exact: integer arithmetic, no rounding)."""
    top = HIST_LOW + (HIST_BINS << HIST_SHIFT) - 1
    return (tl.minimum(tl.maximum(key, HIST_LOW), top) - HIST_LOW) >> HIST_SHIFT
