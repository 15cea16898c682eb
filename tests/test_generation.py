"""`generate_greedy` and the reserved (fixed-capacity) mode of the cache behind it.

CUDA graphs need a GPU; here the same step runs eagerly (cuda_graph=False), which exercises
everything the graph replays: in-place writes at a device position, attention masked by the device
length, the position and token advanced on the device.
"""

import copy

import pytest
import torch
from transformers import DynamicCache, StaticCache

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs, generate_greedy
from hf_squeeze.generation import GenerationTimes

QUESTION = torch.randint(3, 256, (9,), generator=torch.Generator().manual_seed(5))


def reference(model, ids, cache, new):
    return model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new, do_sample=False, min_new_tokens=new)


@pytest.mark.parametrize("keep", [1.0, 0.2])
def test_greedy_matches_generate(tiny, context, keep):
    cache = SqueezedCache.from_context(tiny, context, SqueezeConfig(keep=keep), progress=False)
    ids = torch.cat([context, QUESTION])[None]
    times = GenerationTimes()
    fork = cache.fork()
    got = generate_greedy(tiny, ids, fork, 12, cuda_graph=False, times=times)
    assert torch.equal(got, reference(tiny, ids, cache.fork(), 12))
    assert times.decode_tokens == 11 and times.prefill > 0
    # After the reserved steps the cache is an ordinary one again, holding every token but the last.
    assert fork.get_seq_length() == got.shape[1] - 1
    assert fork.layers[0].device_length is None
    if keep == 1.0:
        assert torch.equal(got, reference(tiny, ids, DynamicCache(), 12))


def test_kernel_path_in_reserved_mode(llama, context, monkeypatch):
    """The Triton path (the interpreter on a CPU, compiled on a GPU) reads the dynamic part from the
    full reserved buffers, masked by the device length: it must give the tokens of the eager generate."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if device == "cpu" else "auto")
    context = context[:200]  # (on a CPU the interpreter runs each kernel)
    model = copy.deepcopy(llama).to(device)  # the session fixture stays on the CPU for the other tests
    cache = SqueezedCache.from_context(model, context.to(device), SqueezeConfig(keep=0.3), progress=False)
    ids = torch.cat([context, QUESTION])[None].to(device)
    fork = cache.fork()
    got = generate_greedy(model, ids, fork, 4, cuda_graph=False)
    assert torch.equal(got, reference(model, ids, cache.fork(), 4))
    # the kernels served every layer (keys read on the kernel path, none on the torch path)
    assert all(int(layer.attention.kernel_keys.sum()) > 0 for layer in fork.layers)
    assert all(float(layer.attention.read_fraction_sum) == 0 for layer in fork.layers)


def test_static_cache_dense_baseline(llama, context):
    """The dense baseline of the benchmarks: a transformers StaticCache through the same loop."""
    ids = torch.cat([context, QUESTION])[None]
    static = StaticCache(config=llama.config, max_cache_len=ids.shape[1] + 8)
    got = generate_greedy(llama, ids, static, 6, cuda_graph=False)
    assert torch.equal(got, reference(llama, ids, DynamicCache(), 6))


def test_bad_requests(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3), progress=False)
    ids = torch.cat([context, QUESTION])[None]
    with pytest.raises(ValueError, match=r"one prompt of shape \[1, L\]"):
        generate_greedy(llama, ids.expand(2, -1), cache.fork(), 4, cuda_graph=False)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        generate_greedy(llama, ids, cache.fork(), 4, cuda_graph=True)
    with pytest.raises(TypeError, match="SqueezedCache or a transformers StaticCache"):
        generate_greedy(llama, ids, DynamicCache(), 4, cuda_graph=False)
    with pytest.raises(ValueError, match="does not start with the context"):
        generate_greedy(llama, torch.cat([context + 1, QUESTION])[None] % 256, cache.fork(), 4, cuda_graph=False)
    small = StaticCache(config=llama.config, max_cache_len=ids.shape[1])
    with pytest.raises(ValueError, match="StaticCache holds"):
        generate_greedy(llama, ids, small, 4, cuda_graph=False)
    fork = cache.fork()
    with pytest.raises(RuntimeError, match="needs a started request"):
        fork.reserve(10)


@pytest.mark.parametrize("at", [0, 5])
def test_greedy_stops_after_a_stop_token(tiny, context, at):
    """stop_tokens: the host looks every `check_every` tokens and stops once one was produced; what
    came before is what an unstopped run produces."""
    cache = SqueezedCache.from_context(tiny, context, SqueezeConfig(keep=0.2), progress=False)
    ids = torch.cat([context, QUESTION])[None]
    full = generate_greedy(tiny, ids, cache.fork(), 20, cuda_graph=False)
    new = full[0, ids.shape[1] :].tolist()
    first = new.index(new[at])  # where that token first appears
    got = generate_greedy(tiny, ids, cache.fork(), 20, cuda_graph=False, stop_tokens=[new[at], 10_000], check_every=4)
    produced = 1 if first == 0 else 1 + min(19, -(-first // 4) * 4)
    assert torch.equal(got, full[:, : ids.shape[1] + produced])
    with pytest.raises(ValueError, match="check_every"):
        generate_greedy(tiny, ids, cache.fork(), 20, cuda_graph=False, stop_tokens=[1], check_every=0)
