"""Small helpers the kernel launchers share."""

from __future__ import annotations

import torch
import triton


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact for float32 inputs, TF32 otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"


def pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


def empty(dev, dtype, *shape):
    return torch.empty(*shape, device=dev, dtype=dtype)
