"""Where work runs when a model is spread over several GPUs.

Triton launches a kernel on the *current* CUDA device, whatever device its tensors are on, and
accelerate's `device_map` hooks move a layer's inputs to its GPU without making that GPU current.
Work on a layer's state therefore runs under `on_device(its device)`.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch


def on_device(device):
    """A context in which `device` is the current CUDA device (a no-op for the CPU, or when it already is)."""
    device = torch.device(device)
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return nullcontext()
    return torch.cuda.device(device)
