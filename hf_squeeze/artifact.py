"""Saving and loading a fixed context: one safetensors file, its JSON header in the metadata.

Nothing is ever unpickled. The header records the format version, the `SqueezeConfig`, the resolved
selection rules, the model fingerprint, the sha256 of the context's token ids and, for every tensor,
its dtype, shape and CRC32. The header itself is covered by a sha256 stored beside it, so every
part of the file is checked: the header by its sha256, the tensors' layout against the header, and
their bytes by their CRC32s. A file for another model or context, edited, corrupted or truncated is
refused. (Checksums catch accidents, not forgery: whoever can edit the file can recompute them.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import SqueezeConfig
from .context import FixedContext
from .index import LayerIndex
from .integrations.fingerprint import check_fingerprint
from .integrations.transformers import kv_heads_held, layer_devices
from .selection import SelectionRule

_PROGRESS_BYTES = 1 << 30

FORMAT = "hf_squeeze.fixed_context"
VERSION = 2  # 2: header sha256, tensor dtypes and shapes, fingerprint over every weight
_HEADER_KEY, _HEADER_SHA_KEY = "hf_squeeze", "hf_squeeze_sha256"


def _crc(tensor: torch.Tensor) -> int:
    # zlib reads the tensor's memory directly (no bytes copy) and releases the GIL while it does.
    data = tensor.detach().contiguous().cpu()
    return zlib.crc32(data.view(-1).view(torch.uint8).numpy()) if data.numel() else zlib.crc32(b"")


def _crcs(tensors: dict[str, torch.Tensor], progress: bool, desc: str) -> dict[str, int]:
    """CRC32 of every tensor, in parallel threads (zlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(_crc, t) for name, t in tensors.items()}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        with tqdm(total=total, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar:
            out = {}
            for name, future in futures.items():
                out[name] = future.result()
                bar.update(tensors[name].numel() * tensors[name].element_size())
    return out


def _show_progress(tensors, progress: bool) -> bool:
    """Progress bars only where a step can take seconds: files of a gigabyte or more."""
    return progress and sum(t.numel() * t.element_size() for t in tensors) >= _PROGRESS_BYTES


def context_sha256(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.detach().cpu().long().contiguous().numpy().tobytes()).hexdigest()


def save_fixed_context(fixed, path, progress: bool = True) -> Path:
    """Write `fixed` to `path`. A tensor-parallel rank's fixed context (a slice of the KV heads) is
    gathered over the ranks first and written whole by rank 0, so that one file serves any split."""
    path = Path(path)
    held, total = fixed.layers[0].keys.shape[0], fixed.fingerprint.get("num_key_value_heads")
    if total is not None and held != total:
        fixed = _gathered(fixed, held, total)
        if torch.distributed.get_rank() == 0:
            save_fixed_context(fixed, path, progress)
        torch.distributed.barrier()
        return path
    progress = _show_progress([t for layer in fixed.layers for t in layer.tensors().values()], progress)
    tensors = {"context_ids": fixed.context_ids.cpu().long().contiguous()}
    for i, layer in enumerate(tqdm(fixed.layers, desc="copy to host", unit="layer", disable=not progress)):
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
        "tensors": _layout(tensors),
        "crc32": _crcs(tensors, progress, "checksum"),
    }
    text = json.dumps(header)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if progress:
        print(f"writing {path} ...", flush=True)
    save_file(tensors, tmp, metadata={_HEADER_KEY: text, _HEADER_SHA_KEY: _sha256(text)})
    tmp.replace(path)  # a crash mid-write never leaves a half-written file under the final name
    return path


def _gathered(fixed, held: int, total: int):
    """The whole fixed context, from the slices of the KV heads that the ranks of a tensor-parallel
    model hold (rank r: heads r * held ...), gathered on every rank."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world * held != total:
        raise ValueError(
            f"this cache holds {held} of the model's {total} KV heads, but {world} processes cannot hold them all: "
            "save from a tensor-parallel model whose ranks are every process (tp_plan over the whole world)"
        )
    if any(rule.threshold is not None or rule.coarse_threshold is not None for rule in fixed.rules):
        raise ValueError(
            "this cache's thresholds were calibrated on one rank's KV heads, so they do not hold for the others: "
            "under tensor parallelism save caches built with SqueezeConfig(selection='topk') (the default)"
        )

    def gather(tensor):
        parts = [torch.empty_like(tensor) for _ in range(world)]
        torch.distributed.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    layers = tuple(type(layer)(**{name: gather(t) for name, t in layer.tensors().items()}) for layer in fixed.layers)
    return dataclasses.replace(fixed, layers=layers, kernel_views={})


def _held_heads(model, total: int) -> slice:
    """The KV heads of a saved cache that `model` computes: all of them, or a tensor-parallel rank's."""
    ranks = getattr(model, "tp_size", None) or 1
    if total % ranks:
        raise ValueError(
            f"the model runs on {ranks} tensor-parallel ranks, which cannot split its {total} KV heads evenly, so "
            f"no rank holds whole heads of this cache: use a tensor-parallel size that divides {total}"
        )
    first, _ = kv_heads_held(model, total // ranks)
    return slice(first, first + total // ranks)


def _layout(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Per tensor, [dtype, shape]: what the bytes mean, which their CRC32 alone does not cover."""
    return {name: [str(t.dtype).removeprefix("torch."), list(t.shape)] for name, t in tensors.items()}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _bad_file(path, why) -> ValueError:
    return ValueError(f"{path} is not a usable hf_squeeze cache file: {why}. Rebuild it with SqueezedCache.from_context "
                      "and save it again.")


def _read_header(path, metadata: dict) -> dict:
    raw = metadata.get(_HEADER_KEY)
    if raw is None:
        raise _bad_file(path, "it has no hf_squeeze header (is it a cache file?)")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as error:
        raise _bad_file(path, f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise _bad_file(path, f"unknown format {header.get('format') if isinstance(header, dict) else header!r}")
    if header.get("version") != VERSION:
        raise _bad_file(path, f"it has format version {header.get('version')}, and this hf_squeeze reads version "
                              f"{VERSION} only (version 1 files left their header unchecked)")
    if metadata.get(_HEADER_SHA_KEY) != _sha256(raw):
        raise _bad_file(path, "its header was edited or corrupted (its sha256 does not match)")
    return header


def read_header(path) -> dict:
    """The checked JSON header of a saved cache (what `hf-squeeze info` prints)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hf_squeeze cache file at {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return _read_header(path, handle.metadata() or {})
    except (SafetensorError, OSError) as error:
        raise _bad_file(path, f"it is truncated or not a safetensors file ({error})") from None


def load_fixed_context(path, model, progress: bool = True) -> FixedContext:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no hf_squeeze cache file at {path}")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise _bad_file(path, f"it is truncated or not a safetensors file ({error})") from None
    with handle:
        header = _read_header(path, handle.metadata() or {})
        check_fingerprint(header["fingerprint"], model)
        names = set(handle.keys())
        if set(header["crc32"]) != names or set(header["tensors"]) != names:
            raise _bad_file(path, "its tensors do not match its header")
        progress = progress and path.stat().st_size >= _PROGRESS_BYTES
        try:
            # safetensors memory-maps the file; each tensor is read from the mapping once.
            tensors = {name: handle.get_tensor(name)
                       for name in tqdm(sorted(names), desc="read", unit="tensor", disable=not progress)}
        except (SafetensorError, OSError, RuntimeError) as error:
            raise _bad_file(path, f"a tensor could not be read ({error})") from None
    layout = _layout(tensors)
    for name in sorted(tensors):
        if layout[name] != header["tensors"][name]:
            raise _bad_file(path, f"tensor {name} is {layout[name]} but its header says {header['tensors'][name]}")
    crcs = _crcs(tensors, progress, "checksum")
    for name in sorted(tensors):
        if crcs[name] != header["crc32"][name]:
            raise _bad_file(path, f"tensor {name} is corrupted (CRC mismatch)")
    ids = tensors.pop("context_ids")
    if context_sha256(ids) != header["context_sha256"] or ids.numel() != header["context_tokens"]:
        raise _bad_file(path, "its context ids do not match their recorded hash")

    devices = layer_devices(model)  # the fingerprint check guarantees one per saved layer
    heads = _held_heads(model, header["fingerprint"]["num_key_value_heads"])
    field_names = {f.name for f in dataclasses.fields(LayerIndex)}
    layers = []
    where = ", ".join(sorted({str(d) for d in devices}))
    for i in tqdm(range(header["num_layers"]), desc=f"to {where}", unit="layer", disable=not progress):
        prefix = f"layers.{i}."
        parts = {k[len(prefix):]: v[heads].to(devices[i]) for k, v in tensors.items() if k.startswith(prefix)}
        if not {"keys", "values", "centroids", "counts", "offsets", "dense_keys", "dense_values"} <= set(parts) \
                or not set(parts) <= field_names:
            raise _bad_file(path, f"layer {i} is incomplete")
        layers.append(LayerIndex(**parts))
    config = SqueezeConfig.from_dict(header["config"])
    rules = tuple(SelectionRule(**rule) for rule in header["rules"])
    if len(rules) != len(layers):
        raise _bad_file(path, "it has a selection rule count that does not match its layers")
    return FixedContext(tuple(layers), rules, config, ids, header["fingerprint"])
