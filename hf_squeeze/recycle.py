"""The same addresses request after request: a finished request's step tensors, handed to the next.

A decode step that torch.compile replays as a CUDA graph reads its tensors (the dynamic keys and
values, the device length, the pins, the counters) at the addresses it was recorded with. A new
request whose tensors sit elsewhere makes the graph record again, in its first decode step (tens
of milliseconds for an 8B model: BENCHMARKS.md, benchmarks/bench_requests.py), as a new
transformers `StaticCache` per request does. Transformers avoids it by keeping one static cache on
the model; a squeezed cache forks per request instead, so its forks hand their step tensors back
when they are garbage collected, and the next fork to reserve (`SqueezedLayer.reserve`) copies its
own into them.

`Spares` belongs to a cache's fixed context (every fork shares it) and keeps, per layer, step
tensor, device and stream, the last one handed back: at most one request's step tensors, whatever
the shapes of the requests before (a spare of another shape than a request's is left for a later
one). A spare only goes to a request on the stream the last one ran on, which ordered its last
work before the new request's copy. `clear()` frees them.
"""

from __future__ import annotations

import threading
import weakref

import torch


def _stream(device: torch.device):
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else None


class Spares:
    """Step tensors of finished requests, by key, for the next request of the same cache."""

    def __init__(self):
        self._free: dict[tuple, torch.Tensor] = {}
        self._held = weakref.WeakKeyDictionary()  # owner -> {name: its finalizer}
        # Reentrant: a collection inside `adopt` (any allocation may start one) can run a finalizer,
        # `_give_back`, on this thread while it holds the lock.
        self._lock = threading.RLock()

    def __deepcopy__(self, memo):  # shared, like the fixed context it belongs to
        return self

    def __len__(self) -> int:
        return len(self._free)

    def adopt(self, owner, name: tuple, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """`tensor`'s values in the spare of `name` if there is one, else `tensor` itself; either way
        the tensor returned becomes the spare of `name` again once `owner` is garbage collected. The
        caller uses the returned tensor from now on; a tensor `owner` adopted earlier under the same
        name (and no longer uses) goes back to the spares at once."""
        if tensor is None:
            return None
        key = (*name, tensor.device, _stream(tensor.device))
        with self._lock:
            held = self._held.setdefault(owner, {})
        earlier = held.get(name)
        if earlier is not None and earlier.alive:
            _, _, (earlier_key, earlier_tensor), _ = earlier.peek()
            if earlier_tensor is tensor:
                return tensor
            earlier.detach()
            self._give_back(earlier_key, earlier_tensor)
        with self._lock:
            spare = self._free.get(key)
            fits = spare is not None and (spare.shape, spare.stride(), spare.dtype) == (
                tensor.shape, tensor.stride(), tensor.dtype)
            if fits:
                del self._free[key]
        if fits:
            spare.copy_(tensor)
            tensor = spare
        held[name] = finalizer = weakref.finalize(owner, self._give_back, key, tensor)
        finalizer.atexit = False
        return tensor

    def clear(self) -> None:
        """Free the spares (the memory of finished requests kept for the next ones)."""
        with self._lock:
            self._free.clear()

    def _give_back(self, key: tuple, tensor: torch.Tensor) -> None:
        with self._lock:
            self._free[key] = tensor  # the last one handed back: an earlier spare is freed
