"""Saved caches: every byte of the file is checked, and a file for another model is refused."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_squeeze import SqueezeConfig, SqueezedCache
from hf_squeeze.cli import main
from hf_squeeze.integrations import fingerprint as fp

from .conftest import full_prompt, generate


def read(path):
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def test_round_trip(llama, context, saved):
    cache, path = saved
    loaded = SqueezedCache.load(path, llama)
    for a, b in zip(cache.fixed.layers, loaded.fixed.layers):
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name
    assert loaded.fixed.rules == cache.fixed.rules and loaded.fixed.config == cache.fixed.config
    assert torch.equal(loaded.fixed.context_ids, cache.fixed.context_ids)


def test_an_edited_header_is_refused(llama, saved, tmp_path):
    """The header decides what is read (budgets, thresholds): an edit must not load."""
    _, path = saved
    tensors, metadata = read(path)
    header = json.loads(metadata["hf_squeeze"])
    header["rules"][0]["budget"] = 1  # the cache would read another budget than stats() reports
    edited = tmp_path / "edited.squeeze"
    save_file(tensors, edited, metadata={**metadata, "hf_squeeze": json.dumps(header)})
    with pytest.raises(ValueError, match="header was edited or corrupted"):
        SqueezedCache.load(edited, llama)
    assert main(["info", str(edited)]) == 1
    missing = tmp_path / "nosum.squeeze"
    save_file(tensors, missing, metadata={"hf_squeeze": metadata["hf_squeeze"]})
    with pytest.raises(ValueError, match="header was edited or corrupted"):
        SqueezedCache.load(missing, llama)


def test_a_reinterpreted_tensor_is_refused(llama, saved, tmp_path):
    """Same bytes (so the same CRC32), another dtype: the layout recorded in the header catches it."""
    _, path = saved
    tensors, metadata = read(path)
    tensors["layers.0.counts"] = tensors["layers.0.counts"].view(torch.float64)
    edited = tmp_path / "retyped.squeeze"
    save_file(tensors, edited, metadata=metadata)
    with pytest.raises(ValueError, match=r"layers.0.counts is \['float64'.*header says \['int64'"):
        SqueezedCache.load(edited, llama)
    tensors, _ = read(path)
    tensors["layers.1.offsets"] = tensors["layers.1.offsets"].reshape(-1)
    reshaped = tmp_path / "reshaped.squeeze"
    save_file(tensors, reshaped, metadata=metadata)
    with pytest.raises(ValueError, match="layers.1.offsets is"):
        SqueezedCache.load(reshaped, llama)


def test_a_file_of_format_version_1_is_refused(llama, saved, tmp_path):
    _, path = saved
    tensors, metadata = read(path)
    header = json.loads(metadata["hf_squeeze"])
    header["version"] = 1
    text = json.dumps(header)
    old = tmp_path / "v1.squeeze"
    save_file(tensors, old, metadata={"hf_squeeze": text, "hf_squeeze_sha256": fp.hashlib.sha256(text.encode()).hexdigest()})
    with pytest.raises(ValueError, match="format version 1"):
        SqueezedCache.load(old, llama)


def test_corrupted_and_truncated_files(llama, saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    truncated = tmp_path / "truncated.squeeze"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a usable hf_squeeze cache file.*truncated"):
        SqueezedCache.load(truncated, llama)
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF  # inside the tensor data
    corrupted = tmp_path / "corrupted.squeeze"
    corrupted.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupted"):
        SqueezedCache.load(corrupted, llama)
    garbage = tmp_path / "garbage.squeeze"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a usable hf_squeeze cache file"):
        SqueezedCache.load(garbage, llama)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="no hf_squeeze header"):
        SqueezedCache.load(other, llama)
    with pytest.raises(FileNotFoundError):
        SqueezedCache.load(tmp_path / "missing.squeeze", llama)


def test_save_load_round_trip(tiny, context, tmp_path):
    for config in (SqueezeConfig(keep=0.2), SqueezeConfig(keep=0.1, hierarchical=True)):
        cache = SqueezedCache.from_context(tiny, context, config, progress=False)
        path = cache.save(tmp_path / "ctx.squeeze")
        loaded = SqueezedCache.load(path, tiny)
        assert loaded.fixed.config == config and loaded.fixed.rules == cache.fixed.rules
        a, b = cache.fork(), loaded.fork()
        ids = full_prompt(context)
        assert torch.equal(generate(tiny, ids, a), generate(tiny, ids, b))
        assert a.stats() == b.stats()
