"""Attention: the reference math, the registered function without a squeezed cache, and a layer's
sparse attention against dense attention over the selected keys and against `kernels/naive.py`."""

import pytest
import torch
from transformers import DynamicCache

import hf_squeeze.attention as attention_module
from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.attention import (
    causal_mask,
    exact_attention,
    merge_partials,
    partial_attention,
)

from .conftest import PAPER, QUESTION, full_prompt, generate, tiny_model


def reference_attention(q, k, v, mask, scaling):
    """Eager GQA attention; mask [B, 1, T, L] bool or None (no mask)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def test_partials_merge_to_full_softmax():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 2, 4, 8, generator=g)
    keys = [torch.randn(2, 3, n, 8, generator=g) for n in (5, 0, 7, 3)]
    values = [torch.randn(2, 3, n, 8, generator=g) for n in (5, 0, 7, 3)]
    masks = [torch.rand(2, 3, 1, 4, n, generator=g) > 0.3 for n in (5, 0, 7, 3)]
    masks[2][0, 0] = False  # a part with no key for some rows
    parts = [partial_attention(q, k, v, m, 0.5) for k, v, m in zip(keys, values, masks)]
    out = merge_partials(parts)
    k_all, v_all, m_all = torch.cat(keys, 2), torch.cat(values, 2), torch.cat(masks, -1)
    s = torch.einsum("bhgtd,bhld->bhgtl", q, k_all) * 0.5
    ref = torch.einsum("bhgtl,bhld->bhgtd", s.masked_fill(~m_all, float("-inf")).softmax(-1), v_all)
    assert torch.allclose(out, ref, atol=1e-5)


def test_partial_of_an_empty_part_is_neutral():
    q = torch.randn(1, 1, 1, 2, 4)
    out, lse = partial_attention(q, torch.randn(1, 1, 0, 4), torch.randn(1, 1, 0, 4), None, 1.0)
    assert torch.isneginf(lse).all() and torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize("q_len, kv_len", [(1, 9), (5, 5), (4, 11)])
def test_exact_attention_is_causal_and_end_aligned(q_len, kv_len):
    q, k, v = torch.randn(2, 6, q_len, 8), torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
    out = exact_attention(q, k, v, None, 0.3)
    ref = reference_attention(q, k, v, causal_mask(q_len, kv_len, "cpu")[None, None], 0.3)
    assert torch.allclose(out, ref, atol=1e-5)


def test_exact_attention_with_padding_mask():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 2, 10, 8), torch.randn(2, 2, 10, 8)
    mask = causal_mask(4, 10, "cpu")[None, None].repeat(2, 1, 1, 1)
    mask[1, :, :, :3] = False
    assert torch.allclose(exact_attention(q, k, v, mask, 0.3), reference_attention(q, k, v, mask, 0.3), atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_squeezed_without_squeezed_cache_equals_sdpa(kind):
    squeezed, sdpa = tiny_model(kind), tiny_model(kind)
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding
    with torch.no_grad():
        for model_kwargs in ({}, {"attention_mask": mask}):
            a = squeezed(ids, **model_kwargs).logits
            b = sdpa(ids, **model_kwargs).logits
            valid = model_kwargs.get("attention_mask", torch.ones_like(ids)).bool()
            assert torch.allclose(a[valid], b[valid], atol=1e-5)
    # incremental decoding with an ordinary DynamicCache
    a = squeezed.generate(ids, attention_mask=mask, **cache_kwargs(squeezed, DynamicCache()), max_new_tokens=6, do_sample=False)
    b = sdpa.generate(ids, attention_mask=mask, **cache_kwargs(sdpa, DynamicCache()), max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_training_gradients_match_sdpa():
    squeezed, sdpa = tiny_model("llama"), tiny_model("llama")
    sdpa.set_attn_implementation("sdpa")
    ids = torch.randint(3, 256, (2, 20))
    losses = []
    for model in (squeezed, sdpa):
        model.train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        losses.append((loss.detach(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    assert torch.allclose(losses[0][0], losses[1][0], atol=1e-5)
    assert torch.allclose(losses[0][1], losses[1][1], atol=1e-5)


@pytest.mark.parametrize("pin", [0.0, 0.5])
def test_sparse_attention_equals_dense_attention_over_the_selected_keys(llama, context, pin):
    """One decode step, checked against dense attention with a mask over the kept clusters (and the
    keys the question pinned, read once)."""
    config = SqueezeConfig(keep=0.2, pin=pin, prefill="exact" if pin else "lookup")
    cache = SqueezedCache.from_context(llama, context, config, progress=False)
    request = cache.fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, request))
    layer = request.layers[1]
    index = layer.index
    q = torch.randn(1, 6, 1, 16)
    k_new, v_new = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16)
    keys, values = layer.update(k_new, v_new)
    out = layer.attention.forward(llama.model.layers[1].self_attn, q, keys, values, None, 0.25)

    selection = attention_module.lookup(q.view(1, 2, 3, 1, 16), index, 0.25, layer.rule)
    kept = torch.zeros(2, index.clustered_tokens, dtype=torch.bool)
    for h in range(2):
        for start, length in zip(selection.starts[0, h].tolist(), selection.lengths[0, h].tolist()):
            kept[h, start : start + length] = True
    pinned = layer.attention.pinned
    assert (pinned is None) == (pin == 0)
    if pin:
        assert int(pinned.count.min()) == layer.rule.pin_budget > 0
        assert (pinned.mask[0].bool() & ~kept).any()  # pins add keys the lookup left out
        kept = kept | pinned.mask[0].bool()
    all_k = torch.cat([index.keys, index.dense_keys, keys[0]], 1)[None]
    all_v = torch.cat([index.values, index.dense_values, values[0]], 1)[None]
    mask = torch.cat([kept, torch.ones(2, all_k.shape[2] - index.clustered_tokens, dtype=torch.bool)], 1)
    ref, _ = partial_attention(q.view(1, 2, 3, 1, 16), all_k, all_v, mask[None, :, None, None, :], 0.25)
    torch.testing.assert_close(out, ref.view(1, 6, 1, 16).transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert 0 < kept.float().mean() < 1  # a partial selection, so the check is not vacuous


@pytest.mark.parametrize("tokens", [1, 4])
def test_an_estimated_rest_is_exact_when_every_cluster_is_one_key(tokens):
    """rest="estimate": a cluster left out counts as N_j keys equal to its centroid carrying its mean
    value, so with clusters of one key attention is exact whatever the lookup keeps."""
    import dataclasses

    from hf_squeeze.attention import SparseAttention
    from hf_squeeze.eval.baselines import oracle_index
    from hf_squeeze.selection import SelectionRule

    g = torch.Generator().manual_seed(0)
    key, value = torch.randn(2, 300, 16, generator=g), torch.randn(2, 300, 16, generator=g)
    index = oracle_index(key, value, 4, 10)
    index = dataclasses.replace(index, value_means=index.values.float())
    q = torch.randn(1, 6, tokens, 16, generator=g)
    dyn_k, dyn_v = torch.randn(1, 2, tokens + 3, 16, generator=g), torch.randn(1, 2, tokens + 3, 16, generator=g)
    full = exact_attention(q, torch.cat([key[None], dyn_k], 2), torch.cat([value[None], dyn_v], 2),
                           causal_mask(tokens, 300 + tokens + 3, "cpu")[None, None], 0.25)
    dropped = SparseAttention(index, SelectionRule(budget=20)).attend_reference(q, dyn_k, dyn_v, None, 0.25)
    estimated = SparseAttention(index, SelectionRule(budget=20, estimate_rest=True)).attend_reference(q, dyn_k, dyn_v, None, 0.25)
    torch.testing.assert_close(estimated, full, atol=1e-5, rtol=1e-5)
    assert (dropped - full).abs().max() > 1e-2  # the check is not vacuous


def test_an_exact_prefill_gives_full_attention_and_pins_what_it_attended(llama, context):
    """prefill="exact": the question's prefill reads every key (its logits are full attention's);
    the keys it pins are the neighbourhoods of the keys it attended most."""
    full = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=1.0), progress=False)
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2, pin=0.5), progress=False)
    request = cache.fork()
    with torch.no_grad():
        expected = llama(QUESTION[None], **cache_kwargs(llama, full.fork())).logits
        got = llama(QUESTION[None], **cache_kwargs(llama, request)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    layer = request.layers[1]
    index, pinned = layer.index, layer.attention.pinned
    assert pinned.rows.shape == (1, 2, layer.rule.pin_budget)
    assert int(pinned.mask.sum()) == 2 * layer.rule.pin_budget  # distinct keys
    rows = pinned.rows[0].long()
    assert (rows[:, 1:] > rows[:, :-1]).all()  # in index order (neighbouring rows for the kernel's tiles)
    assert torch.equal(pinned.mask[0].gather(-1, rows), torch.ones_like(rows, dtype=torch.int8))
    assert index.positions.shape == index.keys.shape[:2]
    # a decode step after it reads about `keep` of the keys
    read_before, _ = layer.attention.read_and_scored()
    with torch.no_grad():
        llama(torch.tensor([[5]]), **cache_kwargs(llama, request))
    read_after, _ = layer.attention.read_and_scored()
    assert read_after - read_before <= 2 * (0.2 + 0.05)  # two heads, a cluster of overshoot at most


def test_a_chunked_input_pins_from_the_whole_input(llama, context):
    """Pins add up the exact attention of every input step of a request: a chunked prefill weighs the
    keys as one prefill does (the tiny model's near-uniform attention makes the pins themselves
    depend on rounding, so the weights are compared)."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    whole, chunked = cache.fork(), cache.fork()
    with torch.no_grad():
        llama(QUESTION[None], **cache_kwargs(llama, whole))
        llama(QUESTION[None, :5], **cache_kwargs(llama, chunked))
        first = chunked.layers[1].attention.pinned.weights.clone()
        llama(QUESTION[None, 5:], **cache_kwargs(llama, chunked))
    for a, b in zip(whole.layers, chunked.layers):
        torch.testing.assert_close(b.attention.pinned.weights, a.attention.pinned.weights, atol=1e-5, rtol=1e-4)
        assert int(b.attention.pinned.count.min()) == b.rule.pin_budget
    total = whole.layers[1].attention.pinned.weights.sum(-1)  # each real token adds at most 1 per head
    assert (total > first.sum(-1)).all() and (total <= QUESTION.numel()).all()


def test_hierarchical_scores_fewer_centroids(tiny, context):
    results = {}
    for hierarchical in (False, True):
        config = SqueezeConfig(keep=0.1, hierarchical=hierarchical, selection="topk", **PAPER)
        request = SqueezedCache.from_context(tiny, context, config, progress=False).fork()
        generate(tiny, full_prompt(context), request)
        results[hierarchical] = request.stats()
    flat, tree = results[False], results[True]
    assert flat["centroids_scored"] == flat["clusters"]
    assert tree["centroids_scored"] < flat["centroids_scored"]
    assert abs(tree["attended_fraction"] - 0.1) <= 0.05


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("tokens", [1, 6])
def test_layer_attention_equals_the_naive_reference(hierarchical, tokens):
    """`SparseAttention.attend_reference` (partials merged by log-sum-exp) against `kernels/naive.py`
    (one softmax over the kept keys, the sinks and window, and the dynamic tokens), with padding."""
    from hf_squeeze.attention import SparseAttention
    from hf_squeeze.index import build_indices
    from hf_squeeze.kernels import naive
    from hf_squeeze.selection import SelectionRule

    g = torch.Generator().manual_seed(6)
    config = SqueezeConfig(window=20, sinks=2, centroid_ratio=0.1, coarse_ratio=0.02, hierarchical=hierarchical)
    index = build_indices([torch.randn(2, 400, 16, generator=g)], [torch.randn(2, 400, 16, generator=g)], config)[0]
    rule = SelectionRule(budget=90, coarse_budget=200 if hierarchical else None)
    query = torch.randn(2, 6, tokens, 16, generator=g) * 2
    dyn_k, dyn_v = torch.randn(2, 2, tokens + 4, 16, generator=g), torch.randn(2, 2, tokens + 4, 16, generator=g)
    valid = torch.ones(2, tokens + 4, dtype=torch.bool)
    valid[0, :3] = False
    causal = torch.ones(tokens, tokens + 4, dtype=torch.bool).tril(4)
    mask = (causal[None] & valid[:, None])[:, None]
    got = SparseAttention(index, rule).attend_reference(query, dyn_k, dyn_v, mask, 0.25)
    want = naive.attention(query, dyn_k, dyn_v, index, rule, 0.25, mask)
    real = valid[:, 4:]  # outputs of padding query tokens are not used
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
