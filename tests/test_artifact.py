"""Saved caches: every byte of the file is checked, and a file for another model is refused."""

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hf_squeeze import SqueezedCache, SqueezeConfig
from hf_squeeze.cli import main
from hf_squeeze.integrations import fingerprint as fp

from .conftest import TINY, tiny_model


@pytest.fixture
def saved(llama, context, tmp_path):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    return cache, cache.save(tmp_path / "ctx.squeeze")


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


def test_load_for_another_model(saved):
    _, path = saved
    with pytest.raises(ValueError, match="different weights"):
        SqueezedCache.load(path, tiny_model("llama", seed=1))
    with pytest.raises(ValueError, match="another model.*model_type"):
        SqueezedCache.load(path, tiny_model("qwen2"))


@pytest.mark.parametrize("part", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.down_proj", "input_layernorm"])
def test_a_fine_tune_is_refused(llama, saved, part):
    """One weight of the last layer nudged: a fine-tune of the same base model."""
    _, path = saved
    tuned = copy.deepcopy(llama)
    weight = tuned.get_submodule(f"model.layers.1.{part}").weight
    with torch.no_grad():
        weight.view(-1)[0] += 1e-3
    with pytest.raises(ValueError, match="different weights"):
        SqueezedCache.load(path, tuned)


def test_other_rope_settings_are_refused(context, tmp_path):
    """The same weights with another RoPE base compute other keys."""
    def model(theta):
        torch.manual_seed(0)
        config = LlamaConfig(**TINY)
        config.rope_parameters = {"rope_type": "default", "rope_theta": theta}
        m = LlamaForCausalLM(config)
        m.set_attn_implementation("squeezed")
        return m.eval()

    base, other = model(10_000.0), model(500_000.0)
    assert all(torch.equal(a, b) for a, b in zip(base.parameters(), other.parameters()))
    path = SqueezedCache.from_context(base, context, progress=False).save(tmp_path / "c.squeeze")
    with pytest.raises(ValueError, match="another configuration.*rope_parameters"):
        SqueezedCache.load(path, other)
    SqueezedCache.load(path, model(10_000.0))  # the same settings load


def test_fingerprint_is_streamed_in_chunks(llama, monkeypatch):
    """Device tensors are hashed in bounded chunks; the digest must not depend on the chunk size."""
    whole = fp._tensor_digest("w", llama.model.layers[0].mlp.up_proj.weight)
    monkeypatch.setattr(fp, "_CHUNK_BYTES", 1000)
    assert fp._tensor_digest("w", llama.model.layers[0].mlp.up_proj.weight) == whole
    bf16 = llama.model.layers[0].mlp.up_proj.weight.to(torch.bfloat16)
    assert fp._tensor_digest("w", bf16) != whole


def test_fingerprint_is_recomputed_after_an_in_place_change():
    model = tiny_model("llama", seed=3)
    first = fp.model_fingerprint(model)
    assert fp.model_fingerprint(model) == first  # memoised
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 0] += 1.0
    assert fp.model_fingerprint(model)["weights_sha256"] != first["weights_sha256"]


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
