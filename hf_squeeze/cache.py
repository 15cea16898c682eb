"""`SqueezedCache`: a transformers `Cache` whose past is a squeezed fixed context.

The fixed part (a `FixedContext`: per-layer `LayerIndex`, selection rule, context ids, model
fingerprint) is immutable and shared by every `fork()` and `copy.deepcopy` of a cache. What a request
adds (the user input and generated tokens, the "dynamic" part) lives in each `SqueezedLayer`, which
behaves like transformers' `DynamicLayer` for it.

Logical length = fixed tokens + dynamic tokens, so `generate(full_ids, cache=cache)` feeds
only the new tokens and numbers positions from the full length. Masks are built for the dynamic
part only (`get_mask_sizes` returns the fixed length as offset): nothing per step scales with the
context beyond the selected keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .attention import LAYER_ATTR, causal_mask, merge_partials, partial_attention
from .config import SqueezeConfig
from .devices import on_device
from .index import LayerIndex, build_indices, calibrate
from .integrations import transformers as integration
from .integrations.fingerprint import check_fingerprint, model_fingerprint
from .integrations.generate import cache_kwargs, check_guarded, install_guard
from .lookup import SelectionRule, expand_ranges, lookup

try:  # the kernels need Triton; without it every device uses the torch reference path
    from . import kernels
except ImportError:  # pragma: no cover - platforms without Triton
    kernels = None


@dataclass(frozen=True, eq=False)
class FixedContext:
    """Everything a squeezed cache knows about its fixed context. Never mutated; never copied."""

    layers: tuple[LayerIndex, ...]
    rules: tuple[SelectionRule, ...]  # one per layer
    config: SqueezeConfig
    context_ids: torch.Tensor  # [N] int64, on the CPU
    fingerprint: dict
    # Per layer, the kernels' device view of its index, by device: derived once for every fork.
    kernel_views: dict = field(default_factory=dict, repr=False)

    def __deepcopy__(self, memo):
        return self

    @property
    def num_tokens(self) -> int:
        return self.context_ids.numel()


class SqueezedLayer(CacheLayerMixin):
    """One layer: a shared `LayerIndex` for the fixed context plus the dynamic keys/values."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    # Set by `update`, cleared when the registered attention reads this layer: still set at the next
    # layer's update means the model's attention bypassed the squeezed context (SqueezedCache.update).
    awaiting_attention = False

    def __init__(self, index: LayerIndex, rule: SelectionRule, fixed_tokens: int, kernel_views: dict | None = None):
        super().__init__()
        self.index = index
        self.rule = rule
        self.fixed_tokens = fixed_tokens
        # Device views of the index for the Triton kernels, built on first use; a cache shares one
        # dict per layer among its forks, so a request does not rebuild them.
        self.kernel_views = {} if kernel_views is None else kernel_views
        self.length, self.device_length = 0, None  # dynamic tokens; see `reserve`
        self._reset_stats()

    def _reset_stats(self):
        # Tensors, not Python numbers: accumulating them needs no host sync per step.
        self.read_fraction_sum = torch.zeros((), dtype=torch.float64)
        self.scored_sum = torch.zeros((), dtype=torch.float64)
        self.kernel_keys = torch.zeros(1, dtype=torch.int64)  # keys read by the kernel path
        self.kernel_scored = 0  # centroids scored by the kernel path: all of them (flat) or all coarse ones
        self.kernel_fine_scored = torch.zeros(1, dtype=torch.int64)  # two-level: fine centroids scored
        self.last_selections = 0
        self.selections = 0

    # ---- the CacheLayerMixin contract -------------------------------------------------------
    def lazy_initialization(self, key_states, value_states):
        fixed = self.index.keys
        if key_states.dtype != fixed.dtype:
            raise TypeError(
                f"the SqueezedCache holds {fixed.dtype} keys but the model computes {key_states.dtype}: "
                "build or load the cache with the model in the dtype it will generate in"
            )
        if key_states.device != fixed.device:
            raise RuntimeError(
                f"this layer of the SqueezedCache is on {fixed.device} but the model runs it on {key_states.device}: "
                "call cache.to(device), or cache.to(hf_squeeze.layer_devices(model)) for a model spread over "
                "several devices (or build/load the cache after moving the model)"
            )
        if key_states.shape[1] != fixed.shape[0] or key_states.shape[3] != fixed.shape[2]:
            raise ValueError(
                f"the SqueezedCache has {fixed.shape[0]} KV heads of dim {fixed.shape[2]}, the model produced "
                f"{key_states.shape[1]} of dim {key_states.shape[3]}: this cache was built for another model"
            )
        self.dtype, self.device = key_states.dtype, key_states.device
        old = getattr(self, "_key_buffer", None)
        if old is not None and old.shape[:2] == key_states.shape[:2] and old.dtype == key_states.dtype \
                and old.device == key_states.device and self._value_buffer.shape[-1] == value_states.shape[-1]:
            self._set_length(0)  # a reset layer keeps its buffers for the next request of the same shape
        else:
            self._store(key_states[:, :, :0], value_states[:, :, :0])
        self.is_initialized = True

    # The dynamic part lives in buffers with room to grow (doubling), so a decode step writes one
    # token in place instead of copying the whole dynamic part (torch.cat) and allocating anew.
    # `reserve` fixes the capacity and keeps the length on the device: the step then has fixed
    # shapes and no host work that depends on the length, which is what a CUDA graph needs.
    _MIN_CAPACITY = 256

    def _store(self, keys: torch.Tensor, values: torch.Tensor, capacity: int | None = None):
        """Replace the dynamic part by `keys`/`values` [B, H, L, D], with room for `capacity` tokens."""
        batch, heads, length, _ = keys.shape
        capacity = max(capacity or 0, length)
        self._key_buffer = keys.new_empty(batch, heads, capacity, keys.shape[-1])
        self._value_buffer = values.new_empty(batch, heads, capacity, values.shape[-1])
        self._key_buffer[:, :, :length] = keys
        self._value_buffer[:, :, :length] = values
        self._set_length(length)

    def _set_length(self, length: int):
        self.length = length
        self.keys = self._key_buffer[:, :, :length]
        self.values = self._value_buffer[:, :, :length]

    def _tagged(self, keys: torch.Tensor) -> torch.Tensor:
        keys = keys.view_as(keys)  # a fresh view carries the link to this layer
        setattr(keys, LAYER_ATTR, self)
        return keys

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.keys.shape[0]:
            raise ValueError(
                f"this SqueezedCache holds {self.keys.shape[0]} sequences but got a batch of {key_states.shape[0]}: "
                "use cache.fork() to start a new request"
            )
        self.awaiting_attention = True
        new = key_states.shape[-2]
        if self.device_length is not None:
            return self._update_reserved(key_states, value_states)
        start, stop = self.length, self.length + new
        if stop > self._key_buffer.shape[2]:
            self._store(self.keys, self.values, capacity=max(stop, 2 * self._key_buffer.shape[2], self._MIN_CAPACITY))
        self._key_buffer[:, :, start:stop] = key_states
        self._value_buffer[:, :, start:stop] = value_states
        self._set_length(stop)
        return self._tagged(self.keys), self.values

    def reserve(self, capacity: int):
        """Fix the dynamic part's capacity at `capacity` tokens and count its length on the device.

        Afterwards `update` takes one token at a time, writes it in place and returns the whole
        buffers; attention masks the unwritten slots from the device length. Every step then has
        the same shapes and launches, so it can be captured in a CUDA graph and replayed. Call
        `release()` to read the length back and return to ordinary updates.
        """
        if not self.is_initialized:
            raise RuntimeError("reserve() needs a started request: run the prompt through the model first")
        if capacity < self.length:
            raise ValueError(f"capacity {capacity} is below the {self.length} dynamic tokens already cached")
        if capacity > self._key_buffer.shape[2]:
            self._store(self.keys, self.values, capacity=capacity)
        self.capacity = capacity
        self.device_length = torch.full((1,), self.length, dtype=torch.int64, device=self.device)
        self._slots = torch.arange(capacity, device=self.device)

    def release(self):
        """Leave reserved mode; the tokens written meanwhile become the dynamic part (one host sync)."""
        if self.device_length is not None:
            length = int(self.device_length)
            self.device_length = None
            self._set_length(length)

    def _update_reserved(self, key_states, value_states):
        if key_states.shape[-2] != 1:
            raise ValueError(
                f"a reserved SqueezedCache layer takes one token per step, got {key_states.shape[-2]}: "
                "run the prompt before cache.reserve(), or cache.release() first"
            )
        # The write position comes from the device; a step past the capacity would be silently lost,
        # so index_copy_ (which raises on out-of-range indices) is used rather than clamping.
        self._key_buffer.index_copy_(2, self.device_length, key_states)
        self._value_buffer.index_copy_(2, self.device_length, value_states)
        self.device_length.add_(1)
        buffers = self._key_buffer[:, :, : self.capacity], self._value_buffer[:, :, : self.capacity]
        return self._tagged(buffers[0]), buffers[1]

    def reserved_valid(self) -> torch.Tensor | None:
        """In reserved mode, the written slots of the dynamic buffers [1, capacity] (else None)."""
        if self.device_length is None:
            return None
        return (self._slots < self.device_length)[None]

    def dynamic_length(self) -> int:
        return self.length if self.is_initialized else 0

    def get_seq_length(self) -> int:
        return self.fixed_tokens + self.dynamic_length()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        if self.device_length is not None:
            return self.capacity, self.fixed_tokens
        return self.dynamic_length() + query_length, self.fixed_tokens

    def get_max_length(self) -> int:
        return -1

    def reset(self):
        self.keys = self.values = None
        self.length, self.device_length = 0, None
        self.is_initialized = False
        self.awaiting_attention = False
        self._reset_stats()

    def crop(self, tokens_to_remove: int):
        """Remove tokens from the end of the dynamic part: `-n` removes n tokens, 0 removes nothing (assisted
        generation calls it when every candidate was accepted); a positive value is an absolute length to
        keep, as transformers < 5.18 passed it (a length at or above the current one removes nothing)."""
        if tokens_to_remove <= 0:
            remove = -tokens_to_remove
        else:
            remove = max(self.get_seq_length() - tokens_to_remove, 0)
        if remove == 0:
            return
        if remove > self.dynamic_length():
            raise ValueError(
                f"cannot crop {remove} tokens: only {self.dynamic_length()} were added after the "
                f"{self.fixed_tokens}-token fixed context, which cannot be cropped"
            )
        self._set_length(self.length - remove)

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self._store(self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor):
        if self.is_initialized:
            self._store(self.keys[indices], self.values[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor):
        if self.is_initialized:
            beam_idx = beam_idx.to(self.keys.device)
            self._store(self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx))

    def offload(self):
        raise NotImplementedError("SqueezedCache does not support offloading")

    # ---- attention ------------------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """What the registered attention function calls: the checks every request passes, then `attend`."""
        check_guarded(module)
        self.awaiting_attention = False
        return self.attend(module, query, key, value, attention_mask, scaling)

    def select_ranges(self, q, scaling, q_weight):
        """The key ranges of the clustered context that queries `q` [B, H, G, T, D] read (a `Selection`).

        The centroid lookup of the method; evaluation baselines (hf_squeeze.eval) override it to
        select the same ranges by other rules over the same cache machinery.
        """
        return lookup(q, self.index, scaling, self.rule, q_weight)

    def attend(self, module, query, key, value, attention_mask, scaling) -> torch.Tensor:
        """Exact attention over the selected fixed keys + sinks + window + all dynamic tokens.

        query [B, Hq, T, D]; key/value: the dynamic part [B, H, Ld, D] (what `update` returned);
        attention_mask: boolean [B, 1, T, Ld] over the dynamic part, or None (causal, no padding).
        Returns [B, T, Hq, D]. Triton kernels on CUDA, the torch reference elsewhere.
        """
        if kernels is not None and kernels.supports(self.index, query) is None:
            with on_device(query.device):  # a layer of a model spread over GPUs may not be on the current one
                return self.attend_kernels(query, key, value, attention_mask, scaling)
        return self.attend_reference(query, key, value, attention_mask, scaling)

    def attend_kernels(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        # A two-level view sizes its level-2 room for one coarse budget (forks may read another).
        l1_budget = None if self.rule.keep_all or self.index.l1_counts is None else self.rule.l1_budget
        view = self.kernel_views.get((query.device, l1_budget))
        if view is None:
            view = self.kernel_views[query.device, l1_budget] = kernels.kernel_index(self.index, l1_budget=l1_budget)
        key_valid = q_valid = None
        reserved = self.reserved_valid()
        if reserved is not None:  # one query token: it sees every written slot
            key_valid = reserved.expand(query.shape[0], -1)
        elif attention_mask is not None:
            # The masks registered for "squeezed" are causal AND key padding: the last query row
            # sees every valid key.
            mask, q_valid = _padding(attention_mask, query.shape[2], key.shape[2])
            key_valid = mask[:, 0, -1, :]
        self.kernel_keys = self.kernel_keys.to(query.device)
        self.kernel_fine_scored = self.kernel_fine_scored.to(query.device)
        self.count_selections(query.shape[0] * self.index.keys.shape[0])
        return kernels.attend(
            query, key, value, view, self.rule, scaling, key_valid, q_valid, self.kernel_keys,
            scored=self.kernel_fine_scored,
        )

    def count_selections(self, selections: int, times: int = 1):
        """Host-side statistics of the kernel path (a replayed CUDA graph calls `attend` only once,
        so the replay loop adds the other steps with `times`)."""
        self.selections += selections * times
        # all centroids of a flat index; of a two-level one all coarse ones (the fine ones scored
        # are counted on the device, in kernel_fine_scored)
        first = self.index.counts if self.index.l1_counts is None else self.index.l1_counts
        self.kernel_scored += selections * first.shape[1] * times
        self.last_selections = selections

    def attend_reference(self, query, key, value, attention_mask, scaling) -> torch.Tensor:
        index = self.index
        batch, q_heads, tokens, dim = query.shape
        heads = index.keys.shape[0]
        q = query.view(batch, heads, q_heads // heads, tokens, dim).float()
        reserved = self.reserved_valid()
        if reserved is not None:
            dyn_mask, q_weight = reserved[:, None, None, None, :], None
            value = value.masked_fill(~reserved[:, None, :, None], 0)  # unwritten slots hold garbage
        else:
            dyn_mask, q_weight = _dynamic_mask(attention_mask, tokens, key.shape[-2], query.device)

        selection = self.select_ranges(q, scaling, q_weight)
        rows, valid = expand_ranges(selection.starts, selection.lengths)
        head_ids = torch.arange(heads, device=query.device)[None, :, None]
        parts = [
            partial_attention(
                q,
                index.keys[head_ids, rows].float(),
                index.values[head_ids, rows].float(),
                valid[:, :, None, None, :],
                scaling,
            ),
            partial_attention(q, index.dense_keys[None].float(), index.dense_values[None].float(), None, scaling),
            partial_attention(q, key.float(), value.float(), dyn_mask, scaling),
        ]
        out = merge_partials(parts)

        read = selection.lengths.sum(-1).double() / index.clustered_tokens
        self.read_fraction_sum = self.read_fraction_sum.to(read.device) + read.sum()
        self.scored_sum = self.scored_sum.to(read.device) + selection.scored.double().sum()
        self.selections += batch * heads
        return out.view(batch, q_heads, tokens, dim).transpose(1, 2).to(query.dtype).contiguous()


def _dynamic_mask(attention_mask, tokens: int, dyn_len: int, device):
    """Mask over the dynamic keys, broadcastable to [B, H, G, T, Ld], and the valid query tokens [B, T]."""
    if attention_mask is None:
        if tokens == 1:
            return None, None
        return causal_mask(tokens, dyn_len, device), None
    mask, q_valid = _padding(attention_mask, tokens, dyn_len)
    return mask[:, :, None], q_valid  # [B, 1, 1, T, Ld]


def _padding(attention_mask, tokens: int, dyn_len: int):
    """The boolean mask [B, 1, T, Ld] (True = attend) and the real query tokens [B, T]."""
    if attention_mask.dtype != torch.bool:  # additive float mask: 0 where attended
        attention_mask = attention_mask == 0
    # A query token is real (not padding) iff it may attend to itself.
    t = torch.arange(tokens, device=attention_mask.device)
    return attention_mask, attention_mask[:, 0, t, dyn_len - tokens + t]


class SqueezedCache(Cache):
    """A KV cache over a fixed context squeezed by clustering its keys (Squeezed Attention).

    Build it once per context with `from_context` (or `load` a saved one), then pass `cache.fork()`
    as `cache=` (or `past_key_values=`) to each `generate` call whose prompt starts with that context.

    One fork serves one request at a time in one thread: a second thread is refused, and a `generate`
    call on a fork that already served a request starts it over from the fixed context (exactly as a
    fresh fork would).
    """

    build_stats: dict | None = None  # set by from_context: time and peak GPU memory of each step
    _owner: int | None = None  # the thread whose forward passes this cache serves (set at first use)
    _busy: bool = False  # inside a generate() call

    def __init__(self, fixed: FixedContext):
        self.fixed = fixed
        views = [fixed.kernel_views.setdefault(i, {}) for i in range(len(fixed.layers))]
        layers = [
            SqueezedLayer(index, rule, fixed.num_tokens, view)
            for index, rule, view in zip(fixed.layers, fixed.rules, views)
        ]
        super().__init__(layers=layers)

    # ---- building and reusing --------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_context(cls, model, context_ids, config: SqueezeConfig | None = None, *, progress: bool = True,
                     storage=None):
        """Prefill `context_ids` (1-D, or [1, N]) once and build its squeezed index.

        The prefill runs in chunks of `config.prefill_chunk` tokens into K/V buffers allocated once;
        K-means runs where each layer computes, a group of layers at a time, and each layer's index
        stays on its layer's device (a model dispatched with `device_map="auto"` over several GPUs
        gets its index spread the same way). `storage="cpu"` keeps the
        finished index in pinned CPU memory (for contexts whose index should not stay on the GPU
        between requests): bring it back with `cache.to(model.device, non_blocking=True)`.
        `cache.build_stats` reports the time of each step and, on GPUs, the peak memory (summed over
        the GPUs the model uses; this resets their peak-memory statistics).
        """
        config = config or SqueezeConfig()
        if not isinstance(config, SqueezeConfig):
            raise TypeError(f"config must be a SqueezeConfig, got {type(config).__name__}")
        integration.check_model(model)
        ids = _context_ids(context_ids, model, config)
        devices = integration.layer_devices(model)  # one per layer: a model may span several GPUs
        gpus = sorted({d for d in devices if d.type == "cuda"}, key=str)
        stats = {"context_tokens": ids.numel()}
        _reset_peaks(gpus)
        start = time.perf_counter()
        keys, values, queries, scalings = _prefill_context(model, ids, config, progress)
        stats["prefill_seconds"] = _elapsed(start, gpus)
        if gpus:
            stats["prefill_peak_gpu_bytes"] = _reset_peaks(gpus)
        start = time.perf_counter()
        # Each layer's index is built and kept where the layer computes (its keys are there already).
        indices = build_indices(keys, values, config, device=devices, storage=storage, progress=progress)
        del keys, values
        if storage is not None:  # calibrate where the index is: it needs only the centroids and queries
            queries = [q.to(storage) for q in queries]
        rules = calibrate(indices, queries, scalings, config)
        stats["index_seconds"] = _elapsed(start, gpus)
        if gpus:
            stats["index_peak_gpu_bytes"] = _reset_peaks(gpus)
        fixed = FixedContext(tuple(indices), tuple(rules), config, ids.cpu(), model_fingerprint(model))
        install_guard(model)
        cache = cls(fixed)
        cache.build_stats = stats
        return cache

    def fork(self, keep: float | None = None) -> "SqueezedCache":
        """A fresh cache for a new request, sharing (not copying) the fixed context.

        `keep` sets another top-k budget for this request (the same index read at another
        sparsity); thresholds are calibrated when the cache is built, so a threshold cache cannot
        change its keep here.
        """
        if keep is None or keep == self.fixed.config.keep:
            return type(self)(self.fixed)
        config = self.fixed.config
        if config.selection != "topk":
            raise ValueError(
                f"fork(keep={keep}) needs selection='topk'; this cache's thresholds were calibrated for "
                f"keep={config.keep}: build one with SqueezeConfig(keep={keep}, selection='threshold') instead"
            )
        config = dataclasses.replace(config, keep=keep)  # validates keep
        rules = calibrate(list(self.fixed.layers), None, None, config)
        fixed = dataclasses.replace(self.fixed, rules=tuple(rules), config=config)
        return type(self)(fixed)

    def reserve(self, capacity: int) -> None:
        """Fix every layer's dynamic capacity (see `SqueezedLayer.reserve`): afterwards a one-token
        step has fixed shapes and no host synchronisation, so it can be captured in a CUDA graph
        (`hf_squeeze.generate_greedy` does)."""
        for layer in self.layers:
            layer.reserve(capacity)

    def release(self) -> None:
        """Back to ordinary updates after `reserve`, keeping the tokens written meanwhile."""
        for layer in self.layers:
            layer.release()

    def save(self, path, *, progress: bool = True) -> Path:
        """Write the fixed context to `path` (safetensors with a JSON header; never pickled).

        Progress bars show for files of a gigabyte or more."""
        from .artifact import save_fixed_context

        return save_fixed_context(self.fixed, path, progress)

    @classmethod
    def load(cls, path, model, *, progress: bool = True) -> "SqueezedCache":
        """Load a saved cache for `model` (each layer onto its layer's device); refuses a file built for another model
        or corrupted. Progress bars show for files of a gigabyte or more."""
        from .artifact import load_fixed_context

        integration.check_model(model)
        fixed = load_fixed_context(path, model, FixedContext, progress)
        install_guard(model)
        return cls(fixed)

    def bind(self, model) -> "SqueezedCache":
        """This cache for another model object holding the same model (say, loaded again, or a copy on
        other devices): checks the model (architecture, configuration, every weight), guards its
        `generate`, and returns a fresh cache placed on its layers' devices."""
        integration.check_model(model)
        check_fingerprint(self.fixed.fingerprint, model)
        install_guard(model)
        return self.to(integration.layer_devices(model))

    def to(self, device, non_blocking: bool = False) -> "SqueezedCache":
        """A fresh (forked) cache whose fixed context lives on `device`, or on one device per layer
        (a list, e.g. `hf_squeeze.layer_devices(model)` for a model spread over several GPUs).

        Moved to the CPU from a GPU, the fixed context is pinned, so that `to("cuda",
        non_blocking=True)` later copies it back without blocking the host.
        """
        fixed = self.fixed
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(fixed.layers)
        if len(devices) != len(fixed.layers):
            raise ValueError(f"got {len(devices)} devices for a cache of {len(fixed.layers)} layers: give one per layer")
        moved = FixedContext(tuple(ix.to(d, non_blocking) for ix, d in zip(fixed.layers, devices)), fixed.rules,
                             fixed.config, fixed.context_ids, fixed.fingerprint)
        return type(self)(moved)

    # ---- requests ----------------------------------------------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if layer_idx == 0:
            self._claim_thread()
        # Layers run in order, so the previous layer (for layer 0: the last one, in the previous
        # forward pass) must have been read by the squeezed attention since its update.
        previous = self.layers[layer_idx - 1]
        if previous.awaiting_attention:
            raise RuntimeError(
                f"layer {(layer_idx - 1) % len(self.layers)} stored its keys in this SqueezedCache but its attention "
                "never read them: the model's attention is not the squeezed one, so it would ignore the fixed "
                "context. Load the model with attn_implementation='squeezed' (after `import hf_squeeze`) or call "
                "model.set_attn_implementation('squeezed'); then use a fresh cache.fork()."
            )
        return self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)

    def _claim_thread(self):
        me = threading.get_ident()
        if self._owner == me:
            return
        with _CLAIM:
            if self._owner is None:
                self._owner = me
        if self._owner != me:
            raise RuntimeError(
                "this SqueezedCache is already serving a request in another thread; one cache serves one request at "
                "a time: give each request (and each thread) its own cache.fork() (forks share the fixed context)"
            )

    @contextlib.contextmanager
    def serving(self):
        """Bracket one request (a `generate` call): refuse a second one meanwhile, and start a cache that
        already served a request over from its fixed context."""
        with _CLAIM:
            if self._busy:
                raise RuntimeError(
                    "this SqueezedCache is serving another generate() call (from another thread?): give each request "
                    "its own cache.fork() (forks share the fixed context, so they cost nothing)"
                )
            self._busy = True
        try:
            self.reset()
            yield self
        finally:
            self._busy = False

    def reset(self):
        """Drop what requests added: back to the fixed context alone, as a fresh fork."""
        super().reset()
        self._owner = None

    def stats(self) -> dict:
        """Size of the index, and what attention read since this cache was forked."""
        first = self.fixed.layers[0]
        selections = sum(layer.selections for layer in self.layers)
        read = sum(
            float(layer.read_fraction_sum) + float(layer.kernel_keys.sum()) / layer.index.clustered_tokens
            for layer in self.layers
        )
        scored = sum(
            float(layer.scored_sum) + layer.kernel_scored + float(layer.kernel_fine_scored.sum()) for layer in self.layers
        )
        return {
            "fixed_tokens": self.fixed.num_tokens,
            "clustered_tokens": first.clustered_tokens,
            "dense_tokens": first.dense_keys.shape[1],
            "layers": len(self.layers),
            "kv_heads": first.keys.shape[0],
            "clusters": first.centroids.shape[1],
            "l1_clusters": 0 if first.l1_centroids is None else first.l1_centroids.shape[1],
            "keep": self.fixed.config.keep,
            "selection": self.fixed.config.selection,
            "dynamic_tokens": self.layers[0].dynamic_length(),
            "selections": selections,
            "attended_fraction": read / selections if selections else math.nan,
            "centroids_scored": scored / selections if selections else math.nan,
        }

    def __repr__(self):
        s = self.stats()
        return (
            f"SqueezedCache(fixed_tokens={s['fixed_tokens']}, layers={s['layers']}, clusters={s['clusters']}, "
            f"keep={s['keep']}, selection={s['selection']!r}, dynamic_tokens={s['dynamic_tokens']})"
        )


_CLAIM = threading.Lock()  # guards the hand-over of a cache between threads and requests


def _elapsed(start: float, gpus) -> float:
    for gpu in gpus:
        torch.cuda.synchronize(gpu)
    return time.perf_counter() - start


def _reset_peaks(gpus) -> int:
    """Sum over `gpus` of the peak memory allocated since the last reset; resets the peaks."""
    peak = 0
    for gpu in gpus:
        peak += torch.cuda.max_memory_allocated(gpu)
        torch.cuda.reset_peak_memory_stats(gpu)
    return peak


def _context_ids(context_ids, model, config: SqueezeConfig) -> torch.Tensor:
    ids = torch.as_tensor(context_ids)
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
    ratio = config.l1_ratio if config.hierarchical else config.centroid_ratio
    needed = math.ceil(0.5 / ratio)
    if clustered < needed:
        raise ValueError(
            f"the context has {clustered} tokens beyond the sinks and observation window, fewer than the {needed} needed for "
            f"one {'level-1 ' if config.hierarchical else ''}cluster at ratio {ratio}: use a longer context, a "
            "smaller window, or a larger ratio."
        )
    return ids.long().to(model.device)


class _ContextRecorder(DynamicLayer):
    """Prefill-time layer: keeps the context's keys/values in buffers allocated once for the whole
    context (growing them with torch.cat would copy O(N^2 / chunk) bytes), and the last `window`
    queries."""

    def __init__(self, total_tokens: int, window: int):
        super().__init__()
        self.total_tokens = total_tokens
        self.window = window
        self.filled = 0
        self.queries = None
        self.scaling = None

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        shape = (batch, heads, self.total_tokens, value_states.shape[-1])
        self._key_buffer = key_states.new_empty(shape[:3] + (dim,))
        self._value_buffer = value_states.new_empty(shape)

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
        keys = self.keys.view_as(self.keys)
        setattr(keys, LAYER_ATTR, self)
        return keys, self.values

    def attention(self, module, query, key, value, attention_mask, scaling):
        q = query[0, :, -self.window :].float()
        self.queries = q if self.queries is None else torch.cat([self.queries, q], 1)[:, -self.window :]
        self.scaling = scaling
        # The context is one sequence without padding, so its mask is causal, aligned to the end of
        # the keys. Saying so (instead of passing the [T, L] boolean mask) lets SDPA pick a fused
        # kernel that never holds the T x L scores, which at 128K tokens would not fit.
        q_len, kv_len = query.shape[-2], key.shape[-2]
        out = F.scaled_dot_product_attention(
            query, key, value,
            attn_mask=None if q_len == kv_len else causal_lower_right(q_len, kv_len),
            is_causal=q_len == kv_len,
            scale=scaling,
            enable_gqa=key.shape[1] != query.shape[1],
        )
        return out.transpose(1, 2).contiguous()


def _prefill_context(model, ids: torch.Tensor, config: SqueezeConfig, progress: bool):
    """Dense chunked prefill of the context through the base model (no logits over the context).

    Memory is the context's K/V (allocated once) plus one chunk's activations.
    """
    num_layers = len(integration.attention_modules(model))
    recorder = Cache(layers=[_ContextRecorder(ids.numel(), config.window) for _ in range(num_layers)])
    base = model.base_model
    chunks = ids.split(config.prefill_chunk)
    for chunk in tqdm(chunks, desc="prefill context", unit="chunk", disable=not progress or len(chunks) < 2):
        base(input_ids=chunk[None], use_cache=True, **cache_kwargs(base, recorder))
    keys = [layer.keys[0] for layer in recorder.layers]
    values = [layer.values[0] for layer in recorder.layers]
    queries = [layer.queries for layer in recorder.layers]
    scalings = [layer.scaling for layer in recorder.layers]
    return keys, values, queries, scalings
