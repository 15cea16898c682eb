"""`SqueezedLayer`, the storage of a request: crop, reset, fixed-capacity mode, in-place growth, and
refusals of what does not fit (batch, dtype, device)."""

import pytest
import torch

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs

from .conftest import QUESTION, full_prompt, generate, tiny_model


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


def test_crop_and_reset(llama, context):
    request = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False).fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, request))
    request.crop(-4)
    assert request.get_seq_length() == context.numel() + QUESTION.numel() - 4
    with pytest.raises(ValueError, match="fixed context"):
        request.crop(-(QUESTION.numel()))
    request.reset()
    assert request.get_seq_length() == context.numel() and request.stats()["selections"] == 0


def test_crop_follows_the_cache_contract(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3), progress=False)
    fork = cache.fork()
    generate(llama, full_prompt(context), fork, max_new_tokens=6)
    n = context.numel()
    held = fork.get_seq_length()
    fork.crop(0)  # nothing (assisted generation calls it when every candidate is accepted)
    assert fork.get_seq_length() == held
    fork.crop(-3)  # three tokens
    assert fork.get_seq_length() == held - 3
    fork.crop(held)  # an absolute length at or above the current one (transformers < 5.18): nothing
    assert fork.get_seq_length() == held - 3
    fork.crop(n + 2)  # an absolute length (transformers < 5.18)
    assert fork.get_seq_length() == n + 2
    with pytest.raises(ValueError, match="fixed context, which cannot be cropped"):
        fork.crop(-3)
    with pytest.raises(ValueError, match="fixed context, which cannot be cropped"):
        fork.crop(n - 1)


def test_reserved_layer_masks_unwritten_slots(llama, context):
    """Poison the unwritten slots of the reserved buffers: the logits must not change."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3), progress=False)
    eager, reserved = cache.fork(), cache.fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, eager))
        llama(QUESTION[None], **cache_kwargs(llama, reserved))
        reserved.reserve(QUESTION.numel() + 8)
        for layer in reserved.layers:
            layer._key_buffer[:, :, QUESTION.numel():] = 1e4
            layer._value_buffer[:, :, QUESTION.numel():] = float("nan")
        position = torch.tensor([[context.numel() + QUESTION.numel()]])
        token = torch.tensor([[7]])
        want = llama(token, position_ids=position, **cache_kwargs(llama, eager)).logits
        got = llama(token, position_ids=position, **cache_kwargs(llama, reserved)).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert int(reserved.layers[0].device_length) == QUESTION.numel() + 1
    reserved.layers[1].device_length.sub_(1)  # (layers read at once: each must get its own length back)
    reserved.release()
    assert reserved.get_seq_length() == eager.get_seq_length()
    assert [layer.length for layer in reserved.layers][:2] == [QUESTION.numel() + 1, QUESTION.numel()]
    assert all(layer.device_length is None for layer in reserved.layers)


def test_dynamic_part_grows_in_place(llama, context):
    """Decode steps write into the same buffer until it is full (no copy per step)."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3), progress=False)
    ids = torch.cat([context, QUESTION])[None]
    fork = cache.fork()
    generate(llama, ids, fork, max_new_tokens=3, min_new_tokens=3)
    layer = fork.layers[0]
    buffer = layer._key_buffer.data_ptr()
    assert layer._key_buffer.shape[2] >= 256 > layer.length
    generate(llama, torch.cat([ids, torch.tensor([[5, 6, 7]])], 1), fork, max_new_tokens=3, min_new_tokens=3)
    assert layer._key_buffer.data_ptr() == buffer
