import copy

import pytest
import torch
from transformers import DynamicCache

import hf_squeeze.cache as cache_module
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs
from hf_squeeze.attention import partial_attention

QUESTION = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2))


def generate(model, ids, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, **cache_kwargs(model, cache), **kwargs)


def full_prompt(context, question=QUESTION):
    return torch.cat([context, question])[None]


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
def test_keep_all_is_exact(tiny, context, config):
    cache = SqueezedCache.from_context(tiny, context, config, progress=False)
    ids = full_prompt(context)
    assert torch.equal(generate(tiny, ids, cache.fork()), generate(tiny, ids, DynamicCache()))
    with torch.no_grad():
        squeezed = tiny(QUESTION[None], **cache_kwargs(tiny, cache.fork())).logits
        dense = tiny(ids).logits[:, -QUESTION.numel() :]
    torch.testing.assert_close(squeezed, dense, atol=1e-5, rtol=1e-5)


def count_gathered(monkeypatch):
    """Count the fixed-context key rows attention actually gathers (independently of stats())."""
    seen = {"rows": 0, "selections": 0}
    original = cache_module.expand_ranges

    def counting(starts, lengths):
        rows, valid = original(starts, lengths)
        seen["rows"] += int(valid.sum())
        seen["selections"] += valid.shape[0] * valid.shape[1]
        return rows, valid

    monkeypatch.setattr(cache_module, "expand_ranges", counting)
    return seen


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("keep", [0.1, 0.2])
def test_attended_fraction_tracks_keep(tiny, context, keep, selection, monkeypatch):
    cache = SqueezedCache.from_context(tiny, context, SqueezeConfig(keep=keep, selection=selection), progress=False)
    seen = count_gathered(monkeypatch)
    request = cache.fork()
    generate(tiny, full_prompt(context), request, max_new_tokens=20)
    stats = request.stats()
    assert abs(stats["attended_fraction"] - keep) <= 0.05, stats
    assert stats["selections"] == seen["selections"] == 20 * 2 * 2  # (1 prefill + 19 decode) x layers x heads
    independent = seen["rows"] / seen["selections"] / stats["clustered_tokens"]
    assert abs(independent - stats["attended_fraction"]) < 1e-9


def test_sparse_attention_equals_dense_attention_over_the_selected_keys(llama, context):
    """One decode step, checked against dense attention with a mask over the kept clusters."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    request = cache.fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, request))
    layer = request.layers[1]
    index = layer.index
    q = torch.randn(1, 6, 1, 16)
    k_new, v_new = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    keys, values = layer.update(k_new, v_new)
    out = layer.attend(llama.model.layers[1].self_attn, q, keys, values, None, 0.25)

    selection = cache_module.lookup(q.view(1, 2, 3, 1, 16), index, 0.25, layer.rule)
    kept = torch.zeros(2, index.clustered_tokens, dtype=torch.bool)
    for h in range(2):
        for start, length in zip(selection.starts[0, h].tolist(), selection.lengths[0, h].tolist()):
            kept[h, start : start + length] = True
    all_k = torch.cat([index.keys, index.dense_keys, keys[0]], 1)[None]
    all_v = torch.cat([index.values, index.dense_values, values[0]], 1)[None]
    mask = torch.cat([kept, torch.ones(2, all_k.shape[2] - index.clustered_tokens, dtype=torch.bool)], 1)
    ref, _ = partial_attention(q.view(1, 2, 3, 1, 16), all_k, all_v, mask[None, :, None, None, :], 0.25)
    torch.testing.assert_close(out, ref.view(1, 6, 1, 16).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert 0 < kept.float().mean() < 1  # a partial selection, so the check is not vacuous


def test_hierarchical_scores_fewer_centroids(tiny, context):
    results = {}
    for hierarchical in (False, True):
        config = SqueezeConfig(keep=0.1, hierarchical=hierarchical, selection="topk")
        request = SqueezedCache.from_context(tiny, context, config, progress=False).fork()
        generate(tiny, full_prompt(context), request)
        results[hierarchical] = request.stats()
    flat, tree = results[False], results[True]
    assert flat["centroids_scored"] == flat["clusters"]
    assert tree["centroids_scored"] < flat["centroids_scored"]
    assert abs(tree["attended_fraction"] - 0.1) <= 0.05


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


def test_beam_search_with_keep_all_equals_dense(llama, context):
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=1.0), progress=False)
    ids = full_prompt(context)
    a = generate(llama, ids, cache.fork(), num_beams=3, max_new_tokens=6)
    assert torch.equal(a, generate(llama, ids, DynamicCache(), num_beams=3, max_new_tokens=6))


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


def test_fork_with_another_keep(llama, context):
    """One top-k index read at several budgets; the shared fixed part is not copied."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3), progress=False)
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
    threshold = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.3, selection="threshold"), progress=False)
    with pytest.raises(ValueError, match="needs selection='topk'"):
        threshold.fork(keep=0.1)
