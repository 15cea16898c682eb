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
        self._held = weakref.WeakKeyDictionary()  # owner -> {name: (key, tensor)}, given back when it dies
        # Reentrant: a collection inside `adopt` (any allocation may start one) can run a finalizer,
        # `_give_back`, on this thread while it holds the lock.
        self._lock = threading.RLock()

    def __deepcopy__(self, memo):  # shared, like the fixed context it belongs to
        return self

    def __len__(self) -> int:
        return len(self._free)

    def adopt(self, owner, tensors: dict[tuple, torch.Tensor | None], constant=()) -> dict[tuple, torch.Tensor | None]:
        """Each tensor of `tensors` (by name), or its values in the spare of its name if there is one
        (for the names in `constant`, whose values follow from their shape, the spare as it is); the
        tensors returned become the spares of their names again once `owner` is garbage collected.
        The caller uses the returned tensors from now on; a tensor `owner` adopted earlier under one
        of these names (and no longer uses) goes back to the spares at once. One call per owner and
        request: the copies are launched together."""
        streams = {}
        adopted, targets, sources = {}, [], []
        with self._lock:
            held = self._held.get(owner)
            if held is None:
                held = self._held[owner] = {}
                weakref.finalize(owner, self._give_back, held).atexit = False
            for name, tensor in tensors.items():
                adopted[name] = tensor
                if not isinstance(tensor, torch.Tensor):  # (a counter not kept on the device)
                    continue
                earlier = held.pop(name, None)
                if earlier is not None and earlier[1] is tensor:
                    held[name] = earlier
                    continue
                if earlier is not None:
                    self._free[earlier[0]] = earlier[1]
                device = tensor.device
                if device not in streams:
                    streams[device] = _stream(device)
                key = (*name, device, streams[device])
                spare = self._free.get(key)
                if spare is not None and (spare.shape, spare.stride(), spare.dtype) == (
                        tensor.shape, tensor.stride(), tensor.dtype):
                    del self._free[key]
                    if name not in constant:
                        targets.append(spare)
                        sources.append(tensor)
                    adopted[name] = tensor = spare
                held[name] = (key, tensor)
        if targets:
            torch._foreach_copy_(targets, sources)
        return adopted

    def clear(self) -> None:
        """Free the spares (the memory of finished requests kept for the next ones)."""
        with self._lock:
            self._free.clear()

    def _give_back(self, held: dict) -> None:
        with self._lock:
            for key, tensor in held.values():
                self._free[key] = tensor  # the last one handed back: an earlier spare is freed
            held.clear()
