"""Small helpers the kernel launchers share."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# exp(x) = exp2(x * LOG2E), log(x) = log2(x) * LN2: the kernels' softmax runs in base 2 (one multiply
# less per score)
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact for float32 inputs, TF32 otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


def empty(dev, dtype, *shape):
    return torch.empty(*shape, device=dev, dtype=dtype)
