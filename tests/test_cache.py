"""`SqueezedCache` through `model.generate`: exact at keep=1, forks and deep copies that share the fixed
part, batches, sampling, beam search, two caches and two threads."""

import copy

import pytest
import torch
from transformers import DynamicCache

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs

from .conftest import PAPER, QUESTION, full_prompt, generate


@pytest.mark.parametrize(
    "config",
    [
        SqueezeConfig(keep=1.0),
        SqueezeConfig(keep=1.0, hierarchical=True),
        SqueezeConfig(keep=1.0, selection="threshold", sinks=0),
        SqueezeConfig(keep=1.0, window=7, prefill_chunk=128),
    ],
    ids=["flat", "hierarchical", "threshold-nosinks", "chunked"],
)
def test_keep_1_is_exact(tiny, context, config):
    cache = SqueezedCache.from_context(tiny, context, config, progress=False)
    ids = full_prompt(context)
    assert torch.equal(generate(tiny, ids, cache.fork()), generate(tiny, ids, DynamicCache()))
    with torch.no_grad():
        squeezed = tiny(QUESTION[None], **cache_kwargs(tiny, cache.fork())).logits
        dense = tiny(ids).logits[:, -QUESTION.numel() :]
    torch.testing.assert_close(squeezed, dense, atol=1e-5, rtol=1e-5)


def test_forked_reuse_equals_fresh_caches(llama, context):
    config = SqueezeConfig(keep=0.2)
    shared = SqueezedCache.from_context(llama, context, config, progress=False)
    questions = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9, 14)]
    for question in questions:
        ids = full_prompt(context, question)
        fresh = SqueezedCache.from_context(llama, context, config, progress=False)
        assert torch.equal(generate(llama, ids, shared.fork()), generate(llama, ids, fresh))


def test_fork_and_deepcopy_share_the_fixed_part(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    request = cache.fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, request))
    clone = copy.deepcopy(request)
    assert clone.fixed is cache.fixed and clone.layers[0].index is cache.layers[0].index
    assert clone.layers[0].keys is not request.layers[0].keys
    assert torch.equal(clone.layers[0].keys, request.layers[0].keys)
    assert clone.get_seq_length() == request.get_seq_length() == context.numel() + QUESTION.numel()
    assert cache.fork().get_seq_length() == context.numel()


def test_two_contexts_used_alternately(llama, context):
    other = torch.randint(3, 256, (500,), generator=torch.Generator().manual_seed(7))
    config = SqueezeConfig(keep=0.2)
    a = SqueezedCache.from_context(llama, context, config, progress=False)
    b = SqueezedCache.from_context(llama, other, config, progress=False)
    alone_a = generate(llama, full_prompt(context), a.fork())
    alone_b = generate(llama, full_prompt(other), b.fork())
    for _ in range(2):
        assert torch.equal(generate(llama, full_prompt(other), b.fork()), alone_b)
        assert torch.equal(generate(llama, full_prompt(context), a.fork()), alone_a)


def padded_batch(context, questions):
    width = max(q.numel() for q in questions)
    ids, mask = [], []
    for q in questions:
        pad = width - q.numel()
        ids.append(torch.cat([context, torch.zeros(pad, dtype=torch.long), q]))
        mask.append(torch.cat([torch.ones(context.numel() + pad), torch.ones(q.numel())]))
        mask[-1][context.numel() : context.numel() + pad] = 0
    return torch.stack(ids), torch.stack(mask).long()


@pytest.mark.parametrize("keep", [1.0, 0.2])
def test_batch_of_questions_with_padding(tiny, context, keep):
    questions = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (4, 11, 7)]
    ids, mask = padded_batch(context, questions)
    cache = SqueezedCache.from_context(tiny, context, SqueezeConfig(keep=keep), progress=False)
    batch = generate(tiny, ids, cache.fork(), attention_mask=mask)
    if keep == 1.0:
        assert torch.equal(batch, generate(tiny, ids, DynamicCache(), attention_mask=mask))
    # every row answers as it would alone: padding neither leaks into nor changes the selection
    for row, question in enumerate(questions):
        alone = generate(tiny, full_prompt(context, question), cache.fork())
        assert torch.equal(batch[row, ids.shape[1] :], alone[0, -10:])


def test_sampling_and_several_return_sequences(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=1.0), progress=False)
    ids = full_prompt(context)
    outs = []
    for past in (cache.fork(), DynamicCache()):
        torch.manual_seed(3)
        outs.append(generate(llama, ids, past, do_sample=True, num_return_sequences=3, top_k=20))
    assert outs[0].shape == (3, ids.shape[1] + 10)
    assert torch.equal(outs[0], outs[1])
    request = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False).fork()
    torch.manual_seed(3)
    assert generate(llama, ids, request, do_sample=True, num_return_sequences=3).shape[0] == 3
    assert request.layers[0].keys.shape[0] == 3
    assert request.layers[0].attention.pinned.rows.shape[0] == 3  # every sequence reads its pins


def test_beam_search_at_keep_1_equals_dense(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=1.0), progress=False)
    ids = full_prompt(context)
    a = generate(llama, ids, cache.fork(), num_beams=3, max_new_tokens=6)
    assert torch.equal(a, generate(llama, ids, DynamicCache(), num_beams=3, max_new_tokens=6))
    # at keep 0.2 the beams carry the question's pins through every reordering
    request = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False).fork()
    assert generate(llama, ids, request, num_beams=3, max_new_tokens=6).shape[0] == 1
    pinned = request.layers[0].attention.pinned
    assert pinned.rows.shape[0] == 3 and all(torch.equal(pinned.mask[0], m) for m in pinned.mask)


def test_two_caches_in_two_threads(llama, context):
    """No global state: two requests on two contexts, concurrently on one model, as if alone."""
    from concurrent.futures import ThreadPoolExecutor

    other = torch.randint(3, 256, (500,), generator=torch.Generator().manual_seed(7))
    caches = {
        "a": (context, SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)),
        "b": (other, SqueezedCache.from_context(llama, other, SqueezeConfig(keep=0.1), progress=False)),
    }
    alone = {k: generate(llama, full_prompt(ctx), c.fork(), max_new_tokens=20) for k, (ctx, c) in caches.items()}
    with ThreadPoolExecutor(2) as pool:
        jobs = [(k, pool.submit(generate, llama, full_prompt(ctx), c.fork(), max_new_tokens=20))
                for _ in range(3) for k, (ctx, c) in caches.items()]
        for k, job in jobs:
            assert torch.equal(job.result(), alone[k])


def test_a_request_chooses_how_its_input_reads_the_context(llama, context):
    """One top-k cache built with the default (the input read exactly, keys pinned from it); a fork
    may read its input by the lookup instead (the paper's prefill: ~keep of the keys, no pins)."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    read, rules = {}, {}
    for name, fork in (("built", cache.fork()), ("lookup", cache.fork(prefill="lookup")),
                       ("lookup, keep 0.4", cache.fork(0.4, prefill="lookup"))):
        assert fork.fixed.layers is cache.fixed.layers  # nothing rebuilt or copied
        with torch.no_grad():
            llama(QUESTION[None], **cache_kwargs(llama, fork))  # the input's prefill alone
        read[name], rules[name] = fork.stats()["attended_fraction"], fork.layers[0].rule
    assert read["built"] == 1.0 and rules["built"].exact_prefill and rules["built"].pin_budget is not None
    assert abs(read["lookup"] - 0.2) < 0.05 and abs(read["lookup, keep 0.4"] - 0.4) < 0.05, read
    assert not rules["lookup"].exact_prefill and rules["lookup"].pin_budget is None  # pin 0 unless given
    with pytest.raises(ValueError, match="pin.*set prefill='exact'"):
        cache.fork(prefill="lookup", pin=0.5)
    with pytest.raises(ValueError, match="prefill"):
        cache.fork(prefill="fast")
    threshold = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3, selection="threshold", pin=0),
                                           progress=False)
    with pytest.raises(ValueError, match=r"fork\(prefill='lookup'\) needs selection='topk'"):
        threshold.fork(prefill="lookup")


def test_fork_with_another_keep(llama, context):
    """One top-k index read at several budgets; the shared fixed part is not copied."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3, **PAPER), progress=False)
    read = {}
    for keep in (0.1, 0.3, 0.6):
        fork = cache.fork(keep=keep)
        assert fork.fixed.layers is cache.fixed.layers and fork.fixed.kernel_views is cache.fixed.kernel_views
        with torch.no_grad():
            llama(QUESTION[None], **cache_kwargs(llama, fork))
        read[keep] = fork.stats()["attended_fraction"]
        assert abs(read[keep] - keep) < 0.05, (keep, read[keep])
    with pytest.raises(ValueError, match="keep"):
        cache.fork(keep=1.5)
    pinned = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3, pin=0.5), progress=False)
    rule = pinned.fork(keep=0.1).layers[0].rule  # the pinned share follows keep
    assert abs(rule.pin_budget - 0.05 * pinned.fixed.layers[0].clustered_tokens) <= 1 and rule.exact_prefill
    threshold = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3, selection="threshold"), progress=False)
    with pytest.raises(ValueError, match="needs selection='topk'"):
        threshold.fork(keep=0.1)
