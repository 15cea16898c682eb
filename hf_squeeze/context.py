"""The fixed context: its token ids checked, its dense prefill, its index built, and the record a
cache keeps of it (`FixedContext`).

The prefill runs the model's base (no logits over the context) in chunks, into K/V buffers
allocated once for the whole context, and keeps the last `window` queries of every layer: the
observation window whose queries calibrate thresholds. Keys are post-RoPE, exactly what attention
sees. `FixedContext` is what every fork of a cache shares: never mutated, never copied.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer

from .attention import PrefillAttention, tagged
from .calibration import calibrate
from .config import SqueezeConfig
from .devices import reset_peaks, synchronized_clock
from .index import build_indices
from .integrations.fingerprint import model_fingerprint
from .integrations.generate import cache_kwargs
from .integrations.transformers import attention_modules, kv_heads_held, layer_devices
from .recycle import Spares


@dataclass(frozen=True, eq=False)
class FixedContext:
    """Everything a squeezed cache knows about its fixed context. Never mutated; never copied."""

    layers: tuple  # per layer, its `LayerIndex`
    rules: tuple  # per layer, its `SelectionRule`
    config: SqueezeConfig
    context_ids: torch.Tensor  # [N] int64, on the CPU
    fingerprint: dict  # the model it was built with (integrations.fingerprint)
    # Per layer, the kernels' device view of its index, by device: derived once for every fork.
    kernel_views: dict = field(default_factory=dict, repr=False)
    # Finished requests' step tensors, for the next request's (`recycle.py`).
    spares: Spares = field(default_factory=Spares, repr=False)

    def __deepcopy__(self, memo):
        return self

    @property
    def num_tokens(self) -> int:
        return self.context_ids.numel()


def context_ids(ids, model, config: SqueezeConfig) -> torch.Tensor:
    """The context's token ids as a 1-D int64 tensor on the model's device, or a clear error."""
    ids = torch.as_tensor(ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise ValueError(
                f"context_ids has a batch of {ids.shape[0]}; a SqueezedCache holds one fixed context. "
                "Build one cache per context (batches of questions share one cache at generate time)."
            )
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"context_ids must be a 1-D integer tensor of token ids, got {tuple(ids.shape)} {ids.dtype}")
    vocab = model.get_input_embeddings().weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(f"context_ids must be token ids in [0, {vocab}); got values in [{int(ids.min())}, {int(ids.max())}]")
    n, dense = ids.numel(), config.dense_tokens
    if n <= dense:
        raise ValueError(
            f"the context has {n} tokens, not more than the {config.sinks} attention sinks + {config.window}-token "
            "observation window that are kept dense: nothing is left to cluster. Use a longer context or a smaller "
            "SqueezeConfig.window."
        )
    clustered = n - dense
    ratio = config.coarse_ratio if config.hierarchical else config.centroid_ratio
    needed = math.ceil(0.5 / ratio)
    if clustered < needed:
        raise ValueError(
            f"the context has {clustered} tokens beyond the sinks and observation window, fewer than the {needed} needed for "
            f"one {'coarse ' if config.hierarchical else ''}cluster at ratio {ratio}: use a longer context, a "
            "smaller window, or a larger ratio."
        )
    return ids.long().to(model.device)


class ContextRecorder(DynamicLayer):
    """Prefill-time cache layer: keeps the context's keys/values in buffers allocated once for the
    whole context (growing them with torch.cat would copy O(N^2 / chunk) bytes); its attention
    (`PrefillAttention`) keeps the last `window` queries."""

    def __init__(self, total_tokens: int, window: int):
        super().__init__()
        self.total_tokens = total_tokens
        self.filled = 0
        self.attention = PrefillAttention(window)

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        self._key_buffer = key_states.new_empty(batch, heads, self.total_tokens, dim)
        self._value_buffer = value_states.new_empty(batch, heads, self.total_tokens, value_states.shape[-1])

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, stop = self.filled, self.filled + key_states.shape[-2]
        if stop > self.total_tokens:
            raise RuntimeError(f"the context prefill wrote {stop} tokens into a {self.total_tokens}-token buffer")
        self._key_buffer[:, :, start:stop] = key_states
        self._value_buffer[:, :, start:stop] = value_states
        self.filled = stop
        self.keys, self.values = self._key_buffer[:, :, :stop], self._value_buffer[:, :, :stop]
        return tagged(self.keys, self.attention), self.values


def prefill_context(model, ids: torch.Tensor, config: SqueezeConfig, progress: bool = False):
    """Dense chunked prefill of the context through the base model (no logits over the context).

    Returns, per layer: keys and values [H, N, D], the observation window's queries [Hq, W, D] and
    the attention scale. Memory is the context's K/V (allocated once) plus one chunk's activations.
    """
    num_layers = len(attention_modules(model))
    recorder = Cache(layers=[ContextRecorder(ids.numel(), config.window) for _ in range(num_layers)])
    base = model.base_model
    chunks = ids.split(config.prefill_chunk)
    for chunk in tqdm(chunks, desc="prefill context", unit="chunk", disable=not progress or len(chunks) < 2):
        base(input_ids=chunk[None], use_cache=True, **cache_kwargs(base, recorder))
    keys = [layer.keys[0] for layer in recorder.layers]
    values = [layer.values[0] for layer in recorder.layers]
    queries = [layer.attention.queries for layer in recorder.layers]
    scalings = [layer.attention.scaling for layer in recorder.layers]
    return keys, values, queries, scalings


def build_fixed_context(model, ids, config: SqueezeConfig, *, storage=None, progress: bool = False):
    """The offline step, once per context: prefill, index (K-means per layer and KV head), selection
    rules. Returns the `FixedContext` and the time and peak GPU memory of each step.

    Each layer's index is built and kept where the layer computes (its keys are there already);
    `storage="cpu"` moves each finished index to pinned CPU memory.
    """
    ids = context_ids(ids, model, config)
    devices = layer_devices(model)  # one per layer: a model may span several GPUs
    gpus = sorted({d for d in devices if d.type == "cuda"}, key=str)
    stats = {"context_tokens": ids.numel()}
    reset_peaks(gpus)
    start = time.perf_counter()
    keys, values, queries, scalings = prefill_context(model, ids, config, progress)
    stats["prefill_seconds"] = synchronized_clock(gpus) - start
    if gpus:
        stats["prefill_peak_gpu_bytes"] = reset_peaks(gpus)
    start = time.perf_counter()
    indices = build_indices(keys, values, config, device=devices, storage=storage, progress=progress,
                            heads_of=kv_heads_held(model, keys[0].shape[0]))
    del keys, values
    if storage is not None:  # calibrate where the index is: it needs only the centroids and queries
        queries = [q.to(storage) for q in queries]
    rules = calibrate(indices, queries, scalings, config)
    stats["index_seconds"] = synchronized_clock(gpus) - start
    if gpus:
        stats["index_peak_gpu_bytes"] = reset_peaks(gpus)
    fixed = FixedContext(tuple(indices), tuple(rules), config, ids.cpu(), model_fingerprint(model))
    return fixed, stats
