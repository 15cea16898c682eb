"""Model identity: a cache built for another model (another architecture, configuration or any weight) is
refused; the hash is streamed and kept until a weight changes."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_squeeze import SqueezedCache
from hf_squeeze.integrations import fingerprint as fp

from .conftest import TINY, tiny_model


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
