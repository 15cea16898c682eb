import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs

from .conftest import TINY, tiny_model


def test_context_shorter_than_the_window(llama):
    with pytest.raises(ValueError, match="observation window.*nothing is left to cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (90,)), SqueezeConfig(), progress=False)


def test_context_too_short_for_one_cluster(llama):
    with pytest.raises(ValueError, match="fewer than the 10 needed for one cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (110,)), SqueezeConfig(), progress=False)
    with pytest.raises(ValueError, match="level-1 cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (130,)), SqueezeConfig(hierarchical=True),
                                   progress=False)


@pytest.mark.parametrize("keep", [0.0, 1.01, -1.0])
def test_keep_outside_the_unit_interval(keep):
    with pytest.raises(ValueError, match=r"SqueezeConfig\.keep=.*\(0, 1\]"):
        SqueezeConfig(keep=keep)


def test_context_batch_and_bad_ids(llama, context):
    with pytest.raises(ValueError, match="one fixed context"):
        SqueezedCache.from_context(llama, context.repeat(2, 1), progress=False)
    with pytest.raises(ValueError, match=r"token ids in \[0, 256\)"):
        SqueezedCache.from_context(llama, context + 1000, progress=False)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        SqueezedCache.from_context(llama, context.float(), progress=False)
    with pytest.raises(TypeError, match="SqueezeConfig"):
        SqueezedCache.from_context(llama, context, {"keep": 0.1}, progress=False)


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


@pytest.fixture
def saved(llama, context, tmp_path):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    return cache, cache.save(tmp_path / "ctx.squeeze")


def test_prompt_not_starting_with_the_context(llama, context, saved):
    cache, _ = saved
    wrong = torch.cat([context, torch.tensor([5, 6, 7])])[None].clone()
    wrong[0, 123] = (wrong[0, 123] + 1) % 256
    with pytest.raises(ValueError, match="differs at token 123"):
        llama.generate(wrong, **cache_kwargs(llama, cache.fork()), max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one new token"):
        llama.generate(context[None], **cache_kwargs(llama, cache.fork()), max_new_tokens=2)


def test_padding_inside_the_context(llama, context, saved):
    cache, _ = saved
    ids = torch.cat([context, torch.tensor([5, 6, 7])])[None]
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with pytest.raises(ValueError, match="cannot be padded"):
        llama.generate(ids, attention_mask=mask, **cache_kwargs(llama, cache.fork()), max_new_tokens=2)


def test_batch_mismatch_within_a_request(llama, saved):
    cache, _ = saved
    request = cache.fork()
    with torch.no_grad():
        llama(torch.tensor([[5, 6, 7]]), **cache_kwargs(llama, request))
        with pytest.raises(ValueError, match="holds 1 sequences but got a batch of 2.*fork"):
            llama(torch.tensor([[5], [6]]), **cache_kwargs(llama, request))


def test_dtype_mismatch(llama, saved):
    cache, path = saved
    half = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 but the model is now bfloat16"):
        SqueezedCache.load(path, half)
    with torch.no_grad(), pytest.raises(TypeError, match="holds torch.float32 keys but the model computes torch.bfloat16"):
        half(torch.tensor([[5, 6, 7]]), **cache_kwargs(half, cache.fork()))


def test_device_mismatch(llama, saved):
    cache, _ = saved
    elsewhere = cache.to("meta")  # stands in for a GPU: any device other than the model's
    assert elsewhere.layers[0].index.keys.device.type == "meta"
    with torch.no_grad(), pytest.raises(RuntimeError, match="SqueezedCache is on meta but the model runs it on cpu.*cache.to"):
        llama(torch.tensor([[5, 6, 7]]), **cache_kwargs(llama, elsewhere))
    # One device per layer (a model spread over GPUs): only the misplaced layer is refused, by its device.
    n = len(cache.fixed.layers)
    split = cache.to(["cpu"] * (n - 1) + ["meta"])
    assert [ix.keys.device.type for ix in split.fixed.layers] == ["cpu"] * (n - 1) + ["meta"]
    with torch.no_grad(), pytest.raises(RuntimeError, match="on meta but the model runs it on cpu.*layer_devices"):
        llama(torch.tensor([[5, 6, 7]]), **cache_kwargs(llama, split))
    with pytest.raises(ValueError, match="one per layer"):
        cache.to(["cpu"] * (n + 1))


def test_offloaded_layers_are_refused(llama):
    import copy

    from hf_squeeze import layer_devices

    assert layer_devices(llama) == [torch.device("cpu")] * llama.config.num_hidden_layers
    offloaded = copy.deepcopy(llama)
    offloaded.model.layers[1].self_attn.to("meta")  # how accelerate leaves a layer offloaded to CPU or disk
    with pytest.raises(NotImplementedError, match="layer 1 has its weights offloaded.*device_map"):
        SqueezedCache.from_context(offloaded, torch.arange(400) % 250, progress=False)
