"""Small helpers the kernel launchers share."""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

try:  # grid dependency control: triton 3.4 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

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


# Programmatic dependent launch (Hopper and later): the kernels of a lookup and its attention are
# launched so that each may start while the one before it finishes. A program first lets the next
# kernel launch, then waits for the previous one to complete (`_chain`), so launches overlap and no
# read or write moves before the data it needs.
PDL = os.environ.get("HF_SQUEEZE_PDL", "1") != "0" and gdc_wait is not None


@functools.cache
def _pdl_device(index: int) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (9, 0)


def pdl(device: torch.device) -> bool:
    """Whether the kernels on `device` are chained by programmatic dependent launch (an NVIDIA GPU of
    compute capability 9.0 or more and triton 3.4 or later, not the interpreter; HF_SQUEEZE_PDL=0
    turns it off)."""
    return PDL and device.type == "cuda" and _pdl_device(device.index if device.index is not None else
                                                         torch.cuda.current_device())


def launch_options(device: torch.device, chain: bool = True) -> dict:
    """The launch keywords and the `CHAIN` constexpr of a kernel on `device` (chained unless `chain` is
    False). Multiplies and adds are fused (FMA) as the kernels' arithmetic counts on, whatever
    triton's default."""
    chained = chain and pdl(device)
    return dict(CHAIN=chained, launch_pdl=True, enable_fp_fusion=True) if chained else dict(
        CHAIN=False, enable_fp_fusion=True)


if gdc_wait is not None:

    @triton.jit
    def _chain(CHAIN: tl.constexpr):
        """Let the next kernel launch now, and wait until the previous kernel has completed (its writes
        visible). A chained kernel calls this before it reads what another kernel wrote or writes
        anything."""
        if CHAIN:
            gdc_launch_dependents()
            gdc_wait()

else:  # an older triton: nothing is chained (`PDL` is False)

    @triton.jit
    def _chain(CHAIN: tl.constexpr):
        pass
