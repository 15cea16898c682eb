"""Saving and loading a fixed context: one safetensors file, its JSON header in the metadata.

Nothing is ever unpickled. The header records the format version, the `SqueezeConfig`, the resolved
selection rule, the model fingerprint, the sha256 of the context's token ids and a CRC32 of every
tensor, so that a file for another model, another context, or a corrupted/truncated file is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SqueezeConfig
from .index import LayerIndex
from .integrations.transformers import check_fingerprint
from .lookup import SelectionRule

FORMAT = "hf_squeeze.fixed_context"
VERSION = 1


def _crc(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())


def context_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().long().contiguous().numpy().tobytes()).hexdigest()


def save_fixed_context(fixed, path) -> Path:
    path = Path(path)
    tensors = {"context_ids": fixed.context_ids.cpu().long().contiguous()}
    for i, layer in enumerate(fixed.layers):
        for name, tensor in layer.tensors().items():
            tensors[f"layers.{i}.{name}"] = tensor.detach().cpu().contiguous()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "num_layers": len(fixed.layers),
        "config": fixed.config.to_dict(),
        "rules": [dataclasses.asdict(rule) for rule in fixed.rules],
        "fingerprint": fixed.fingerprint,
        "context_tokens": fixed.num_tokens,
        "context_sha256": context_sha256(fixed.context_ids),
        "crc32": {name: _crc(t) for name, t in tensors.items()},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={"hf_squeeze": json.dumps(header)})
    tmp.replace(path)  # a crash mid-write never leaves a half-written file under the final name
    return path


def _bad_file(path, why) -> ValueError:
    return ValueError(f"{path} is not a usable hf_squeeze cache file: {why}. Rebuild it with SqueezedCache.from_context "
                      "and save it again.")


def load_fixed_context(path, model, fixed_cls):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hf_squeeze cache file at {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _bad_file(path, f"it is truncated or not a safetensors file ({error})") from None
    with handle:
        raw = (handle.metadata() or {}).get("hf_squeeze")
        if raw is None:
            raise _bad_file(path, "it has no hf_squeeze header (is it a cache file?)")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as error:
            raise _bad_file(path, f"its header is not valid JSON ({error})") from None
        if header.get("format") != FORMAT:
            raise _bad_file(path, f"unknown format {header.get('format')!r}")
        if header.get("version") != VERSION:
            raise _bad_file(path, f"format version {header.get('version')} (this hf_squeeze reads {VERSION})")
        check_fingerprint(header["fingerprint"], model)
        names = set(handle.keys())
        if set(header["crc32"]) != names:
            raise _bad_file(path, "its tensors do not match its header")
        try:
            tensors = {name: handle.get_tensor(name) for name in names}
        except (SafetensorError, OSError, RuntimeError) as error:
            raise _bad_file(path, f"a tensor could not be read ({error})") from None
    for name, tensor in tensors.items():
        if _crc(tensor) != header["crc32"][name]:
            raise _bad_file(path, f"tensor {name} is corrupted (CRC mismatch)")
    ids = tensors.pop("context_ids")
    if context_sha256(ids) != header["context_sha256"] or ids.numel() != header["context_tokens"]:
        raise _bad_file(path, "its context ids do not match their recorded hash")

    device = model.device
    field_names = {f.name for f in dataclasses.fields(LayerIndex)}
    layers = []
    for i in range(header["num_layers"]):
        prefix = f"layers.{i}."
        parts = {k[len(prefix):]: v.to(device) for k, v in tensors.items() if k.startswith(prefix)}
        if not {"keys", "values", "centroids", "counts", "offsets", "dense_keys", "dense_values"} <= set(parts) \
                or not set(parts) <= field_names:
            raise _bad_file(path, f"layer {i} is incomplete")
        layers.append(LayerIndex(**parts))
    config = SqueezeConfig.from_dict(header["config"])
    rules = tuple(SelectionRule(**rule) for rule in header["rules"])
    if len(rules) != len(layers):
        raise _bad_file(path, "it has a selection rule count that does not match its layers")
    return fixed_cls(tuple(layers), rules, config, ids, header["fingerprint"])
