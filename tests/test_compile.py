"""torch.compile over a squeezed decode step: what transformers' compile path and CUDA graphs need.

A reserved cache (`SqueezedCache.reserve`, fixed capacity, length on the device) gives one-token
steps of fixed shapes with no host synchronisation. Here the torch path of such a step (the
attention's reference implementation, the cache's in-place writes) is traced by dynamo as one graph
with no break, and the compiled step gives the eager step's logits, step after step.
"""

import pytest
import torch
import torch._dynamo as dynamo

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs

from .conftest import PAPER, full_prompt
from .test_cache import padded_batch


def started(model, context, config):
    """A fork that served its prompt's prefill (eagerly, as generate does), then reserved."""
    fork = SqueezedCache.from_context(model, context, config, progress=False).fork()
    ids = full_prompt(context)
    with torch.no_grad():
        logits = model(ids[:, context.numel():], **cache_kwargs(model, fork)).logits
    fork.reserve(fork.layers[0].length + 8)
    return fork, logits[:, -1:].argmax(-1), torch.tensor([[ids.shape[1]]])


@pytest.mark.parametrize(("config", "path"), [(SqueezeConfig(keep=0.2), "torch"), (SqueezeConfig(keep=0.2, **PAPER), "torch"),
                                              (SqueezeConfig(keep=0.2), "kernels")], ids=["default", "paper", "default-kernels"])
def test_a_reserved_decode_step_compiles_as_one_graph(llama, context, config, path, monkeypatch):
    """The torch path is traced op by op; the kernels (the interpreter here) enter the graph as one
    custom operator, `hf_squeeze::attend` (kernels/ops.py)."""
    tiny = llama
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if path == "kernels" else "0")
    if path == "kernels":  # (the interpreter runs each kernel: a shorter context keeps the test short)
        context = context[:200]
    eager, token, position = started(tiny, context, config)
    compiled, _, _ = started(tiny, context, config)

    def step(cache, token, position):
        return tiny(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(tiny, cache)).logits

    with torch.no_grad():
        explained = dynamo.explain(step)(started(tiny, context, config)[0], token, position)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        dynamo.reset()
        fast = torch.compile(step, backend="aot_eager", fullgraph=True)
        for _ in range(3):
            want, got = step(eager, token, position), fast(compiled, token, position)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token, position = want[:, -1:].argmax(-1), position + 1
    assert int(compiled.layers[0].device_length) == int(eager.layers[0].device_length) > 0
    served = [int(fork.layers[0].attention.kernel_keys.sum()) for fork in (eager, compiled)]
    assert (served[0] == served[1] > 0) if path == "kernels" else served == [0, 0]


@pytest.mark.parametrize("sampling", [False, True], ids=["greedy", "sampling"])
def test_generate_takes_transformers_compile_path(llama, context, sampling):
    """model.generate with a fork and a compile_config plans the decode's capacity and reports the
    cache compileable, so transformers compiles the decode step (forced here on the CPU, with a
    backend that runs the traced graph as is): the tokens of the eager generate, for a padded batch (sampling: two
    sequences per prompt); the fork is back to ordinary updates afterwards, holding every token but the last."""
    from transformers import CompileConfig
    from torch._dynamo.utils import counters

    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    g = torch.Generator().manual_seed(3)
    ids, mask = padded_batch(context, [torch.randint(3, 256, (n,), generator=g) for n in (9, 5)])
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=sampling,
                  **(dict(top_k=20, num_return_sequences=2) if sampling else {}))
    compile_config = CompileConfig(backend="aot_eager", fullgraph=True)
    compile_config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    outputs = []
    for options in (dict(disable_compile=True), dict(compile_config=compile_config)):
        torch.manual_seed(0)
        fork = cache.fork()
        assert fork.is_compileable is False  # until generate plans the request
        dynamo.reset()
        counters.clear()
        outputs.append(llama.generate(ids, **cache_kwargs(llama, fork), **kwargs, **options))
        graphs = counters["stats"]["unique_graphs"]
        # none when disabled; compiled: the first step, then (the 2D mask grows) one with a dynamic
        # length, not one per step
        assert graphs == 0 if "disable_compile" in options else 1 <= graphs <= 2
        assert fork.layers[0].device_length is None and fork.get_seq_length() == outputs[-1].shape[1] - 1
        if "compile_config" in options and not sampling:
            # a request of another length reserves the same (rounded) capacity: nothing compiles again
            again = cache.fork()
            llama.generate(ids, **cache_kwargs(llama, again), **{**kwargs, "max_new_tokens": 5}, **options)
            assert again.layers[0]._slots.shape == fork.layers[0]._slots.shape
            assert counters["stats"]["unique_graphs"] == graphs
    assert torch.equal(outputs[0], outputs[1])


def test_forks_of_one_keep_run_one_compiled_step(llama, context, monkeypatch):
    """Requests of forks at a keep other than the cache's own (each fork resolves its own rule objects)
    find one handle per layer (`hf_squeeze::attend`'s int constant), so the second request's
    decode steps run the first one's compiled graph: nothing compiles again (a handle per fork used
    to recompile the second request, tens of seconds on a GPU)."""
    from transformers import CompileConfig
    from torch._dynamo.utils import counters

    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1")  # the handle is the kernels' (the interpreter here)
    context = context[:200]
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    compile_config = CompileConfig(backend="eager", fullgraph=True)
    compile_config._compile_all_devices = True
    g = torch.Generator().manual_seed(5)
    dynamo.reset()
    counters.clear()
    graphs, forks = [], []
    for _ in range(2):
        forks.append(cache.fork(keep=0.1))
        ids = full_prompt(context, torch.randint(3, 256, (7,), generator=g))
        llama.generate(ids, **cache_kwargs(llama, forks[-1]), max_new_tokens=4, do_sample=False,
                       compile_config=compile_config)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[1] == graphs[0]
    assert forks[0].layers[0].attention.rule is not forks[1].layers[0].attention.rule
    assert forks[0].layers[0].attention._op_handle is forks[1].layers[0].attention._op_handle


@pytest.mark.parametrize("path", ["torch", "kernels"])
def test_a_finished_requests_step_tensors_serve_the_next_fork(llama, context, path, monkeypatch):
    """A fork that reserves after an earlier fork of the cache was garbage collected holds its step
    tensors (dynamic K/V, device length, pins, counters) at that fork's addresses, so a compiled
    step's CUDA graph need not be recorded again; a fork still alive lends nothing. The values are
    the new request's own: its steps give the logits of a fork in fresh memory."""
    import gc

    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if path == "kernels" else "0")
    if path == "kernels":  # (the interpreter runs each kernel: a shorter context keeps the test short)
        context = context[:200]
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    questions = [torch.randint(3, 256, (9,), generator=torch.Generator().manual_seed(s)) for s in (7, 8)]

    def request(fork, question):
        ids = full_prompt(context, question)
        with torch.no_grad():
            logits = [llama(ids[:, context.numel():], **cache_kwargs(llama, fork)).logits[:, -1:]]
            fork.reserve(fork.layers[0].length + 8)
            position = torch.tensor([[ids.shape[1]]])
            for step in range(3):
                token = logits[-1].argmax(-1)
                logits.append(llama(input_ids=token, position_ids=position + step, use_cache=True,
                                    **cache_kwargs(llama, fork)).logits)
        held = [(layer, layer.attention) for layer in fork.layers]
        addresses = [t.data_ptr() for layer, attention in held
                     for t in (layer._key_buffer, layer._value_buffer, layer.device_length, layer._slots,
                               attention.pinned.rows, attention.pinned.count, attention.pinned.mask,
                               attention.kernel_counts)]
        return torch.cat(logits, 1), addresses, fork.stats()

    first = cache.fork()
    _, first_addresses, _ = request(first, questions[0])
    alive = cache.fork()
    want, alive_addresses, want_stats = request(alive, questions[1])
    assert not set(first_addresses) & set(alive_addresses)
    del first
    gc.collect()
    again = cache.fork()
    got, again_addresses, got_stats = request(again, questions[1])
    assert again_addresses == first_addresses
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert got_stats == want_stats


def test_generate_greedy_compiles_its_decode_step(llama, context):
    """generate_greedy(compile=...): the decode step through torch.compile gives the tokens of the
    uncompiled loop (a squeezed fork, then a dense StaticCache), compiled once for the model."""
    from transformers import StaticCache

    from hf_squeeze import generate_greedy
    from hf_squeeze.generation import compiled_forward

    options = dict(backend="aot_eager", fullgraph=True, dynamic=False)
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    ids = full_prompt(context)
    dynamo.reset()
    forks = cache.fork(), cache.fork()
    want = generate_greedy(llama, ids, forks[0], 10, cuda_graph=False)
    got = generate_greedy(llama, ids, forks[1], 10, cuda_graph=False, compile=options)
    assert torch.equal(got, want)
    # compiled steps count themselves on the device; the statistics are those of the eager loop
    stats = [fork.stats() for fork in forks]
    assert stats[0]["selections"] == stats[1]["selections"] == 10 * 2 * 2  # steps x layers x KV heads
    assert stats[1]["attended_fraction"] == pytest.approx(stats[0]["attended_fraction"], abs=1e-9)
    assert compiled_forward(llama, options) is compiled_forward(llama, options)  # kept on the model
    llama.set_attn_implementation("sdpa")
    try:
        dense = [generate_greedy(llama, ids, StaticCache(config=llama.config, max_cache_len=ids.shape[1] + 10), 6,
                                 cuda_graph=False, compile=flag) for flag in (False, options)]
    finally:
        llama.set_attn_implementation("squeezed")
    assert torch.equal(dense[0], dense[1])


def test_a_plain_generate_finds_the_fork_compileable(llama, context):
    """As with transformers' StaticCache, a plain generate (no compile_config) meets a compileable
    fork during its decode steps, so that on a GPU transformers compiles them; disable_compile=True
    keeps it eager. (On the CPU transformers runs the steps eagerly either way.)"""
    from transformers import LogitsProcessor, LogitsProcessorList

    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)

    class Seen(LogitsProcessor):
        def __init__(self, fork):
            self.fork, self.values = fork, []

        def __call__(self, input_ids, scores):
            self.values.append(self.fork.is_compileable)
            return scores

    for options, expected in ((dict(), True), (dict(disable_compile=True), False)):
        fork = cache.fork()
        seen = Seen(fork)
        llama.generate(full_prompt(context), **cache_kwargs(llama, fork), max_new_tokens=4, do_sample=False,
                       logits_processor=LogitsProcessorList([seen]), **options)
        assert seen.values == [expected] * 4 and fork.is_compileable is False


def test_the_plan_of_a_request_compiles_on_one_device_only(llama, context):
    """decode_plan: compileable unless disable_compile or a cache spread over devices (a model with
    device_map="auto" keeps its eager steps); the capacity rounded up only where transformers will
    compile (an accelerator, or a compile_config told to compile on every device)."""
    import dataclasses

    from transformers import CompileConfig

    from hf_squeeze.integrations.generate import decode_plan

    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    ids = full_prompt(context)
    new = ids.shape[1] - context.numel()
    assert decode_plan(llama, cache, ids, dict(max_new_tokens=10)) == (new + 10, new, True)
    assert decode_plan(llama, cache, ids, dict(max_new_tokens=10, disable_compile=True)) == (new + 10, new, False)
    everywhere = CompileConfig()
    everywhere._compile_all_devices = True
    assert decode_plan(llama, cache, ids, dict(max_new_tokens=10, compile_config=everywhere)) == (256, new, True)
    spread = dataclasses.replace(cache.fixed, layers=(cache.fixed.layers[0], dataclasses.replace(
        cache.fixed.layers[1], keys=cache.fixed.layers[1].keys.to("meta"))))
    cache.fixed = spread
    assert decode_plan(llama, cache, ids, dict(max_new_tokens=10, compile_config=everywhere)) == (new + 10, new, False)
