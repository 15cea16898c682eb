"""Where work runs when a model is spread over several GPUs, clocks and peaks over those GPUs, and
where a call makes the host wait for a GPU.

Triton launches a kernel on the *current* CUDA device, whatever device its tensors are on, and
accelerate's `device_map` hooks move a layer's inputs to its GPU without making that GPU current.
Work on a layer's state therefore runs under `on_device(its device)`.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

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


def host_waits(call, packages: tuple[str, ...] = ("hf_squeeze", "transformers")) -> Counter:
    """Run `call()` and count where it made the host wait for a CUDA device (a copy to or from the
    host, an `.item()`, a synchronize: `torch.cuda.set_sync_debug_mode`), by the innermost frame in
    one of `packages` ("package/path/file.py:line function"). A wait stops the host from queueing
    work ahead of the device, so that host and device time add up instead of overlapping. Needs CUDA."""
    sites = Counter()

    def where(frame) -> str:
        parts = Path(frame.filename).parts
        inside = [i for i, part in enumerate(parts) if part in packages]
        path = "/".join(parts[inside[-1]:] if inside else parts[-2:])
        return f"{path}:{frame.lineno} {frame.name}"

    def record(message, category, filename, lineno, file=None, line=None):
        stack = [f for f in traceback.extract_stack()[:-1] if f.filename != warnings.__file__]
        ours = [f for f in stack if any(part in packages for part in Path(f.filename).parts)]
        sites[where((ours or stack)[-1])] += 1

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record  # (restored when the block ends)
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sites
