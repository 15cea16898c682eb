"""Model checks: only decoder-only models with full attention, loaded with the squeezed attention and
resident on a device, get a squeezed cache."""

import pytest
import torch
from transformers import (
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from hf_squeeze import SqueezedCache

from .conftest import TINY, tiny_model


def test_model_not_using_squeezed_attention(context):
    model = tiny_model("llama")
    model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="attn_implementation='squeezed'"):
        SqueezedCache.from_context(model, context, progress=False)


def test_sliding_window_models_are_refused(context):
    mistral = MistralForCausalLM(MistralConfig(**TINY, sliding_window=64)).eval()
    mistral.set_attn_implementation("squeezed")
    with pytest.raises(NotImplementedError, match="sliding"):
        SqueezedCache.from_context(mistral, context, progress=False)
    qwen = Qwen2ForCausalLM(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64, max_window_layers=1))
    qwen.set_attn_implementation("squeezed")
    with pytest.raises(NotImplementedError, match="sliding"):
        SqueezedCache.from_context(qwen.eval(), context, progress=False)


def test_offloaded_layers_are_refused(llama):
    import copy

    from hf_squeeze import layer_devices

    assert layer_devices(llama) == [torch.device("cpu")] * llama.config.num_hidden_layers
    offloaded = copy.deepcopy(llama)
    offloaded.model.layers[1].self_attn.to("meta")  # how accelerate leaves a layer offloaded to CPU or disk
    with pytest.raises(NotImplementedError, match="layer 1 has its weights offloaded.*device_map"):
        SqueezedCache.from_context(offloaded, torch.arange(400) % 250, progress=False)
