"""The fixed context: its token ids are checked, and its chunked prefill equals one pass."""

import pytest
import torch
from transformers import DynamicCache

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.context import prefill_context


def test_context_shorter_than_the_window(llama):
    with pytest.raises(ValueError, match="observation window.*nothing is left to cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (90,)), SqueezeConfig(), progress=False)


def test_context_too_short_for_one_cluster(llama):
    with pytest.raises(ValueError, match="fewer than the 10 needed for one cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (110,)), SqueezeConfig(), progress=False)
    with pytest.raises(ValueError, match="coarse cluster"):
        SqueezedCache.from_context(llama, torch.randint(3, 256, (130,)), SqueezeConfig(hierarchical=True),
                                   progress=False)


def test_context_batch_and_bad_ids(llama, context):
    with pytest.raises(ValueError, match="one fixed context"):
        SqueezedCache.from_context(llama, context.repeat(2, 1), progress=False)
    with pytest.raises(ValueError, match=r"token ids in \[0, 256\)"):
        SqueezedCache.from_context(llama, context + 1000, progress=False)
    with pytest.raises(ValueError, match="1-D integer tensor"):
        SqueezedCache.from_context(llama, context.float(), progress=False)
    with pytest.raises(TypeError, match="SqueezeConfig"):
        SqueezedCache.from_context(llama, context, {"keep": 0.1}, progress=False)


def test_chunked_prefill_equals_one_pass(llama, context):
    # Chunks of 64 tokens write into buffers allocated once; the keys/values and the window
    # queries must be those of one dense pass over the whole context.
    with torch.no_grad():
        chunked = prefill_context(llama, context, SqueezeConfig(prefill_chunk=64), progress=False)
        whole = prefill_context(llama, context, SqueezeConfig(prefill_chunk=10_000), progress=False)
        dense = DynamicCache()
        llama.base_model(input_ids=context[None], **cache_kwargs(llama.base_model, dense), use_cache=True)
    for layer, (k, v) in enumerate(zip(chunked[0], chunked[1])):
        assert k.shape == (2, context.numel(), 16)
        torch.testing.assert_close(k, whole[0][layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(v, whole[1][layer], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(k, dense.layers[layer].keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(chunked[2][layer], whole[2][layer], atol=1e-5, rtol=1e-5)
        assert chunked[2][layer].shape[1] == SqueezeConfig().window
