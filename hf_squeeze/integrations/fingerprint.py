"""Model identity: what a saved or shared fixed context must match before it is used.

A squeezed cache holds the keys and values one model computed over a context. Another model (a
fine-tune of the same base model, the same weights with other RoPE settings, another dtype) would
compute other keys, so the fingerprint covers everything the keys and values depend on:
- every weight of the base model (embeddings, every layer's attention projections, norms and MLPs),
  hashed byte for byte in a stream: GPU tensors travel to the host in bounded chunks, never as a
  copy of the model;
- the configuration fields that change the keys without changing a weight (RoPE parameters and
  scaling, head sizes, norm epsilon, activation, biases);
- the architecture and dtype, reported on their own for a clear message.

Hashing every weight takes a fraction of a second per GB on a few cores; the result is memoised per
model and recomputed only when a parameter is replaced or modified in place (its storage or its
version counter changes), so a check per request costs microseconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from concurrent.futures import ThreadPoolExecutor

import torch

from .transformers import attention_modules

_CHUNK_BYTES = 64 << 20

# Configuration fields that change what attention sees at a given position for the same weights.
# Any field whose name mentions RoPE is added as well (rope_theta, rope_scaling, rope_parameters,
# partial_rotary_factor, ... differ in name across architectures and transformers versions).
_KEY_FIELDS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "layer_norm_eps", "norm_eps",
    "attention_bias", "mlp_bias", "max_position_embeddings", "vocab_size", "use_qk_norm",
    "embedding_multiplier", "attention_multiplier", "residual_multiplier", "query_pre_attn_scalar",
)
_RELEVANT_WORDS = ("rope", "rotary")

_memo: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _key_config(config) -> dict:
    """The configuration fields that change the keys, JSON-normalised (tuples become lists)."""
    fields = config.to_dict()
    chosen = {k: v for k, v in fields.items() if k in _KEY_FIELDS or any(w in k for w in _RELEVANT_WORDS)}
    return json.loads(json.dumps(chosen, sort_keys=True, default=str))


def _tensor_digest(name: str, tensor: torch.Tensor) -> bytes:
    """sha256 of a tensor's name, dtype, shape and bytes; device tensors are read in chunks."""
    digest = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    flat = tensor.detach().reshape(-1)  # a view for the (usual) contiguous parameter
    if flat.numel():
        data = flat.view(torch.uint8)
        for start in range(0, data.numel(), _CHUNK_BYTES):
            chunk = data[start : start + _CHUNK_BYTES]
            if chunk.device.type != "cpu":
                chunk = chunk.cpu()
            digest.update(chunk.numpy())  # hashlib reads the buffer and releases the GIL
    return digest.digest()


def _weights(model) -> list[tuple[str, torch.Tensor]]:
    """Every parameter the keys and values depend on: the base model's (the output head is not)."""
    base = getattr(model, "base_model", model)
    named = list(base.named_parameters())
    offloaded = [name for name, p in named if p.device.type == "meta"]
    if offloaded:
        raise NotImplementedError(
            f"{len(offloaded)} weights of the model are offloaded (on the meta device, e.g. {offloaded[0]}); a "
            "SqueezedCache needs every layer resident on a device: load the model without disk or CPU offload"
        )
    return named


def _weights_sha256(named) -> str:
    # A weight sharded over tensor-parallel ranks (a DTensor) is hashed whole, so that the fingerprint
    # does not depend on how the model is split: its shards are gathered one weight at a time, in
    # the same order on every rank (a collective), on this thread.
    digests = {name: _tensor_digest(name, p.full_tensor()) for name, p in named if _is_distributed(p)}
    local = [(name, p) for name, p in named if name not in digests]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests.update(zip((name for name, _ in local), pool.map(lambda item: _tensor_digest(*item), local)))
    return hashlib.sha256(b"".join(digests[name] for name, _ in named)).hexdigest()


def _is_distributed(tensor) -> bool:
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def model_fingerprint(model) -> dict:
    """What a fixed context built with `model` records about it (JSON-serialisable)."""
    named = _weights(model)
    # Replacing a parameter changes its storage; modifying it in place bumps its version counter.
    state = tuple((p.data_ptr(), p._version, str(p.device)) for _, p in named)
    cached = _memo.get(model)
    if cached is not None and cached[0] == state:
        return dict(cached[1])
    config = model.config
    modules = attention_modules(model)
    fingerprint = {
        "model_class": type(model).__name__,
        "model_type": config.model_type,
        "num_layers": len(modules),
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "hidden_size": config.hidden_size,
        "vocab_size": model.get_input_embeddings().weight.shape[0],
        "dtype": str(model.dtype).removeprefix("torch."),
        "config": _key_config(config),
        "weights": len(named),
        "weights_sha256": _weights_sha256(named),
    }
    _memo[model] = (state, fingerprint)
    return dict(fingerprint)


def check_fingerprint(saved: dict, model) -> None:
    """Refuse a fixed context built for another model: another architecture, dtype, configuration or
    weights (a fine-tune of the same base model included)."""
    current = model_fingerprint(model)
    rebuild = "build one for this model with SqueezedCache.from_context"
    shape_fields = [k for k in current if k not in ("dtype", "config", "weights", "weights_sha256")]
    differ = [k for k in shape_fields if saved.get(k) != current.get(k)]
    if differ:
        detail = ", ".join(f"{k}: cache {saved.get(k)!r} vs model {current.get(k)!r}" for k in differ)
        raise ValueError(f"this cache was built for another model ({detail}); {rebuild}")
    if saved.get("dtype") != current["dtype"]:
        raise ValueError(
            f"this cache was built with the model in {saved.get('dtype')} but the model is now {current['dtype']}: "
            f"load the model with dtype=torch.{saved.get('dtype')}, or rebuild the cache"
        )
    saved_config = saved.get("config") or {}
    fields = sorted(set(saved_config) | set(current["config"]))
    changed = [k for k in fields if saved_config.get(k) != current["config"].get(k)]
    if changed:
        detail = ", ".join(f"{k}: cache {saved_config.get(k)!r} vs model {current['config'].get(k)!r}" for k in changed)
        raise ValueError(
            f"this cache was built for a model with another configuration ({detail}); these settings change the keys "
            f"attention sees, so the cached keys do not fit this model: {rebuild}"
        )
    if saved.get("weights_sha256") != current["weights_sha256"] or saved.get("weights") != current["weights"]:
        raise ValueError(
            "this cache was built for a model with the same architecture but different weights (a fine-tune or another "
            f"checkpoint: the checksum of its {current['weights']} weight tensors differs); {rebuild}"
        )
