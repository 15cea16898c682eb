"""`SqueezedCache`: a transformers `Cache` whose past is a squeezed fixed context.

The container transformers sees: one `SqueezedLayer` per model layer (the storage of what a request
adds), and the fixed part, a `FixedContext` (per-layer `LayerIndex`, selection rule, context ids,
model fingerprint), immutable and shared by every `fork()` and `copy.deepcopy` of a cache. It builds
(`from_context`), saves and loads the fixed part, and brackets requests (`serving`, the checks of
`update`).

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
from pathlib import Path

import torch
from transformers.cache_utils import Cache

from .artifact import load_fixed_context, save_fixed_context
from .attention import SparseAttention
from .calibration import budget_rules
from .config import SqueezeConfig
from .context import FixedContext, build_fixed_context
from .integrations import transformers as integration
from .integrations.fingerprint import check_fingerprint
from .integrations.generate import install_guard
from .kernels.graphs import GraphPools
from .layer import SqueezedLayer

_CLAIM = threading.Lock()  # guards the hand-over of a cache between threads and requests


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
        pools = GraphPools()  # the layers' decode-step graphs share memory (kernels/graphs.py)
        layers = [
            SqueezedLayer(SparseAttention(index, rule, view, pools), fixed.num_tokens)
            for index, rule, view in zip(fixed.layers, fixed.rules, views)
        ]
        for number, layer in enumerate(layers):
            layer.spares = fixed.spares, number
        super().__init__(layers=layers)

    # ---- building and reusing --------------------------------------------------------------
    @classmethod
    @torch.no_grad()
    def from_context(cls, model, ids, config: SqueezeConfig | None = None, *, progress: bool = True,
                     storage=None):
        """Prefill the context's token ids `ids` (1-D, or [1, N]) once and build its squeezed index.

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
        fixed, stats = build_fixed_context(model, ids, config, storage=storage, progress=progress)
        install_guard(model)
        cache = cls(fixed)
        cache.build_stats = stats
        return cache

    def fork(self, keep: float | None = None, *, prefill: str | None = None,
             pin: float | None = None) -> "SqueezedCache":
        """A fresh cache for a new request, sharing (not copying) the fixed context.

        Without arguments the request reads as the cache was built. A top-k cache also lets each
        request choose (the same index read another way, nothing rebuilt):
        - `keep`: another budget (the same index read at another sparsity);
        - `prefill` / `pin` (`SqueezeConfig`'s): how the request's input reads the context, e.g.
          `fork(prefill="lookup")` for the paper's lookup prefill, which reads `keep` of the keys
          instead of all of them (a shorter time to first token; pins need the exact prefill, so
          `pin` is then 0 unless given).
        A threshold cache's thresholds were calibrated for its keep and pins when it was built: it
        forks as built only.
        """
        config = self.fixed.config
        changes = {name: value for name, value in (("keep", keep), ("prefill", prefill), ("pin", pin))
                   if value is not None and value != getattr(config, name)}
        if prefill == "lookup" and pin is None and config.pin != 0:
            changes["pin"] = 0.0  # nothing to pin without the input's exact attention
        if not changes:
            return type(self)(self.fixed)
        if config.selection != "topk":
            asked = ", ".join(f"{name}={value!r}" for name, value in changes.items())
            raise ValueError(
                f"fork({asked}) needs selection='topk'; this cache's thresholds were calibrated for "
                f"keep={config.keep}, prefill={config.prefill!r}, pin={config.pin}: build one with "
                f"SqueezeConfig({asked}, selection='threshold') instead"
            )
        config = dataclasses.replace(config, **changes)  # validates them
        rules = budget_rules(len(self.fixed.layers), self.fixed.layers[0].clustered_tokens, config)
        fixed = dataclasses.replace(self.fixed, rules=tuple(rules), config=config)
        return type(self)(fixed)

    def reserve(self, capacity: int) -> None:
        """Fix every layer's dynamic capacity (see `SqueezedLayer.reserve`): afterwards a one-token
        step has fixed shapes and no host synchronisation, so it can be captured in a CUDA graph
        (`hf_squeeze.generate_greedy` does)."""
        for layer in self.layers:
            layer.reserve(capacity)

    def plan(self, capacity: int | None, input_tokens: int = 1, compileable: bool = False) -> None:
        """Reserve `capacity` dynamic tokens per layer once the request's `input_tokens` were read
        (see `SqueezedLayer.plan`): `generate` plans a request's decode this way. `compileable`:
        the cache reports itself compileable meanwhile, so that transformers' compile path takes
        the decode steps. None: back to ordinary updates."""
        for layer in self.layers:
            layer.plan(capacity, input_tokens, compileable)

    def release(self) -> None:
        """Back to ordinary updates after `reserve`, keeping the tokens written meanwhile: the layers'
        device lengths are read at once, one host sync per device (not one per layer)."""
        reserved = [layer for layer in self.layers if layer.device_length is not None]
        by_device: dict[torch.device, list] = {}
        for layer in reserved:
            by_device.setdefault(layer.device_length.device, []).append(layer)
        for layers in by_device.values():
            lengths = torch.cat([layer.device_length for layer in layers]).tolist()
            for layer, length in zip(layers, lengths):
                layer.release(length)

    def save(self, path, *, progress: bool = True) -> Path:
        """Write the fixed context to `path` (safetensors with a JSON header; never pickled).

        Progress bars show for files of a gigabyte or more."""
        return save_fixed_context(self.fixed, path, progress)

    @classmethod
    def load(cls, path, model, *, progress: bool = True) -> "SqueezedCache":
        """Load a saved cache for `model` (each layer onto its layer's device); refuses a file built for another model
        or corrupted. Progress bars show for files of a gigabyte or more."""
        integration.check_model(model)
        fixed = load_fixed_context(path, model, progress)
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
        if layer_idx == 0 and not torch.compiler.is_compiling():  # a compiled step follows an eager prefill,
            self._claim_thread()  # which claimed the cache
        # Layers run in order, so the previous layer (for layer 0: the last one, in the previous
        # forward pass) must have been read by the squeezed attention since its update.
        previous = self.layers[layer_idx - 1]
        if previous.attention.pending:
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
        totals = [layer.attention.read_and_scored() for layer in self.layers]  # folds in compiled steps first
        selections = sum(layer.attention.selections for layer in self.layers)
        read, scored = sum(r for r, _ in totals), sum(s for _, s in totals)
        return {
            "fixed_tokens": self.fixed.num_tokens,
            "clustered_tokens": first.clustered_tokens,
            "dense_tokens": first.dense_keys.shape[1],
            "layers": len(self.layers),
            "kv_heads": first.keys.shape[0],
            "clusters": first.centroids.shape[1],
            "coarse_clusters": 0 if first.coarse_centroids is None else first.coarse_centroids.shape[1],
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
