"""Where work runs when a model is spread over several GPUs, and clocks and peaks over those GPUs.

Triton launches a kernel on the *current* CUDA device, whatever device its tensors are on, and
accelerate's `device_map` hooks move a layer's inputs to its GPU without making that GPU current.
Work on a layer's state therefore runs under `on_device(its device)`.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch


def on_device(device):
    """A context in which `device` is the current CUDA device (a no-op for the CPU, or when it already is)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device)


def synchronized_clock(gpus) -> float:
    """`time.perf_counter()` once the work this thread queued on each GPU in `gpus` (its current
    stream there) has finished. Not the whole device: threads of one process answering side by
    side on their own streams do not wait for each other, and a thread capturing a CUDA graph is
    not disturbed by another's clock."""
    for gpu in gpus:
        torch.cuda.current_stream(gpu).synchronize()
    return time.perf_counter()


def reset_peaks(gpus) -> int:
    """Sum over `gpus` of the peak memory allocated since the last reset; resets the peaks."""
    peak = 0
    for gpu in gpus:
        peak += torch.cuda.max_memory_allocated(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
    return peak
