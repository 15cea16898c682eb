"""A layer's eager decode step replayed as a CUDA graph.

An eager decode step of a squeezed layer launches about ten kernels (the lookup's scoring,
selection and compaction, the attention and its merge), and at batch 1 the host spends longer
preparing and launching them than the GPU spends running them. A request whose dynamic capacity is
fixed (`SqueezedLayer.reserve`) runs every decode step with the same tensors and shapes, so each
layer captures its step once and replays it: a step is then two copies in (the query, the written
slots), one replay and one copy out.

This serves the decode steps that transformers' compile path does not reach:
`generate(..., disable_compile=True)`, models spread over several GPUs, `generate_greedy` without
its whole-step graph. (A compiled step calls the kernels inside transformers' own CUDA graph; a
step captured whole is never captured again layer by layer.)

A graph holds the addresses it was captured with: the dynamic keys and values, the pins, the
counters. Each step compares them (its signature) with the graph's and, when one changed (a new
request, a reordered batch), runs eagerly and captures again at the next step. The first step with
a new signature runs eagerly (it also compiles the Triton kernels), the second is captured and
replayed, the later ones are replayed. The layers of one cache share a memory pool per device: they
run one after another on one stream and each keeps its output, so their scratch buffers may
overlap.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

_ENV = "HF_SQUEEZE_STEP_GRAPHS"  # "0": every eager decode step launches its kernels one by one


def available(device: torch.device) -> bool:
    """Whether a decode step on `device` is replayed: a CUDA device, not turned off, and not itself
    being captured (a step inside a whole-model graph, `generate_greedy`'s or transformers')."""
    return device.type == "cuda" and os.environ.get(_ENV, "1") != "0" and not torch.cuda.is_current_stream_capturing()


def describe(tensor: torch.Tensor | None) -> tuple | None:
    """What a captured graph depends on in a tensor it reads or writes in place: where it is and its layout."""
    if tensor is None:
        return None
    return tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream to capture a graph on: the caller's own if it has one (the eval's threads answer
    each on its own stream), else a new side stream (capture needs one other than the default).
    `torch.cuda.Stream()` hands out a fixed pool's streams in turn, so a new one while threads run
    could be a stream another thread is working on."""
    current = torch.cuda.current_stream(device)
    return torch.cuda.Stream(device) if current == torch.cuda.default_stream(device) else current


def capture(step: Callable, stream: torch.cuda.Stream, pool=None) -> tuple:
    """Capture `step()`'s kernels on `stream` into a CUDA graph (none of them runs): (the graph,
    what `step` returned). Not through `torch.cuda.graph`, whose entry synchronises the whole device
    and empties the allocator's cache; "thread_local": what other threads do meanwhile does not
    disturb the capture."""
    current = torch.cuda.current_stream(stream.device)
    graph = torch.cuda.CUDAGraph()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            out = step()
        finally:
            graph.capture_end()
    current.wait_stream(stream)
    return graph, out


class GraphPools:
    """The memory pool, per device, of one cache's decode-step graphs."""

    def __init__(self):
        self._by_device: dict[torch.device, tuple] = {}

    def get(self, device: torch.device) -> tuple:
        if device not in self._by_device:
            self._by_device[device] = torch.cuda.graph_pool_handle()
        return self._by_device[device]


class DecodeGraph:
    """One layer's decode step: eager, captured, or replayed (see the module's docstring)."""

    def __init__(self, pools: GraphPools):
        self.pools = pools
        self.signature = None
        self.keep = None  # objects the signature names by id, kept alive so that no id is reused
        self.graph = None
        self.query = self.key_valid = self.out = None
        self.captures = self.replays = 0

    def run(self, signature: tuple, keep, launch: Callable, query: torch.Tensor, key_valid: torch.Tensor):
        """`launch(query, key_valid)` (the step's device work, no host synchronisation) for this step."""
        if signature != self.signature:
            self.signature, self.keep, self.graph = signature, keep, None
            self.query = self.key_valid = self.out = None  # (the old graph's buffers go back to the pool)
            return launch(query, key_valid)
        if self.graph is None:
            self._capture(launch, query, key_valid)
        self.query.copy_(query)
        self.key_valid.copy_(key_valid)
        self.graph.replay()
        self.replays += 1
        return self.out.clone()

    def _capture(self, launch, query, key_valid):
        self.query, self.key_valid = query.clone(), key_valid.clone()
        self.graph, self.out = self._record(lambda: launch(self.query, self.key_valid))
        self.captures += 1

    def _record(self, step: Callable) -> tuple:
        """Capture `step()` into a CUDA graph in the cache's pool: (the graph, its output)."""
        device = self.query.device
        return capture(step, capture_stream(device), self.pools.get(device))
