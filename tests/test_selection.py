"""The torch lookup (`selection.py`): the estimated probability, the selection rules, the two-level
normaliser, key ranges; checked against the formula and against `kernels/naive.py`."""

import math

import pytest
import torch

from hf_squeeze import SqueezeConfig
from hf_squeeze.attention import SparseAttention
from hf_squeeze.index import build_indices
from hf_squeeze.selection import (
    SelectionRule,
    expand_ranges,
    lookup,
    score_coarse,
    score_fine,
    score_flat,
    select,
)


def random_index(heads=2, n=400, dim=8, hierarchical=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, n, dim, generator=g)]
    values = [torch.randn(heads, n, dim, generator=g)]
    config = SqueezeConfig(window=20, sinks=2, centroid_ratio=0.1, coarse_ratio=0.02, hierarchical=hierarchical)
    return build_indices(keys, values, config)[0]


def naive_logp(q, centroids, counts, scaling):
    """p_j = exp(s_j) / sum_k N_k exp(s_k) over non-empty clusters, mean over tokens, max over group."""
    B, H, G, T, _ = q.shape
    out = torch.full((B, H, centroids.shape[1]), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            per_head = []
            for g in range(G):
                probs = []
                for t in range(T):
                    s = (centroids[h].double() @ q[b, h, g, t].double()) * scaling
                    nonempty = counts[h] > 0
                    z = sum(counts[h, k].item() * math.exp(s[k].item()) for k in range(len(s)) if nonempty[k])
                    probs.append(torch.where(nonempty, torch.exp(s) / z, torch.zeros_like(s)))
                per_head.append(torch.stack(probs).mean(0))
            out[b, h] = torch.stack(per_head).amax(0).log()
    return out


def test_estimated_probability_matches_the_formula():
    index = random_index()
    q = torch.randn(2, 2, 3, 4, 8)
    cand, _ = score_flat(q, index, 0.35, None)
    ref = naive_logp(q, index.centroids, index.counts, 0.35)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(cand.logp))
    assert torch.allclose(cand.logp[finite].double(), ref[finite], atol=1e-5)


def test_empty_clusters_are_masked_out_of_max_and_sum():
    index = random_index()
    counts = index.counts.clone()
    counts[:, :3] = 0
    centroids = index.centroids.clone()
    centroids[:, :3] = 1e4  # would dominate the max, and overflow, if not masked
    empty = type(index)(**{**index.tensors(), "counts": counts, "centroids": centroids})
    q = torch.randn(1, 2, 1, 1, 8)
    cand, _ = score_flat(q, empty, 1.0, None)
    assert torch.isneginf(cand.logp[..., :3]).all()
    assert torch.isfinite(cand.logp[..., 3:][cand.counts[..., 3:] > 0]).all()
    # for one query, the probabilities of one key per cluster, weighted by cluster sizes, sum to one
    total = (cand.logp.exp() * cand.counts).sum(-1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-4)


def test_padding_tokens_do_not_vote():
    index = random_index()
    q = torch.randn(1, 2, 3, 5, 8)
    weight = torch.tensor([[False, False, True, True, True]])
    with_padding, _ = score_flat(q, index, 0.35, weight)
    without, _ = score_flat(q[:, :, :, 2:], index, 0.35, None)
    assert torch.allclose(with_padding.logp, without.logp, atol=1e-6)


def test_select_threshold_and_budget():
    logp = torch.tensor([[[-1.0, -3.0, -0.5, -2.0, -0.1]]])
    counts = torch.tensor([[[4, 5, 0, 3, 2]]])
    assert select(logp, counts, -1.5, None).tolist() == [[[True, False, False, False, True]]]
    # by decreasing p: cluster 4 (2 keys), cluster 2 is empty, cluster 0 (4 keys) -> 6 >= budget 5
    assert select(logp, counts, None, 5).tolist() == [[[True, False, False, False, True]]]
    assert select(logp, counts, None, 7).tolist() == [[[True, False, False, True, True]]]
    assert select(logp, counts, None, None).tolist() == [[[True, True, False, True, True]]]


def test_budget_takes_equal_probabilities_in_cluster_order():
    """Equal probabilities (e.g. a query orthogonal to every centroid) do not lift the budget, and
    which of them are kept does not depend on how a sort orders them."""
    logp = torch.tensor([[[-1.0, -2.0, -1.0, -1.0]]])
    counts = torch.tensor([[[3, 3, 3, 3]]])
    assert select(logp, counts, None, 2).tolist() == [[[True, False, False, False]]]
    assert select(logp, counts, None, 4).tolist() == [[[True, False, True, False]]]
    assert select(logp, counts, None, 10).tolist() == [[[True, True, True, True]]]


def test_expand_ranges_matches_python():
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 100, (2, 3, 7), generator=g)
    lengths = torch.randint(0, 5, (2, 3, 7), generator=g)
    lengths[0, 1] = 0  # a row with nothing selected
    indices, valid = expand_ranges(starts, lengths)
    for b in range(2):
        for h in range(3):
            expected = [s + i for s, n in zip(starts[b, h].tolist(), lengths[b, h].tolist()) for i in range(n)]
            assert indices[b, h][valid[b, h]].tolist() == expected
            assert int(valid[b, h].sum()) == len(expected)


@pytest.mark.parametrize("extra", [0, 3])
def test_expand_ranges_into_a_known_width(extra):
    """With the width given (a CUDA graph cannot wait for the device) the lists are the same, padded."""
    g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, 100, (3, 2, 6), generator=g)
    lengths = torch.randint(0, 4, (3, 2, 6), generator=g)
    lengths[1, 0] = 0  # a row with nothing selected
    indices, valid = expand_ranges(starts, lengths)
    width = indices.shape[-1] + extra
    got, got_valid = expand_ranges(starts, lengths, width)
    assert got.shape == got_valid.shape == (3, 2, width)
    assert torch.equal(got_valid[..., : indices.shape[-1]], valid) and not got_valid[..., indices.shape[-1] :].any()
    assert torch.equal(got[got_valid], indices[valid])
    empty, empty_valid = expand_ranges(starts[..., :0], lengths[..., :0], 4)
    assert empty.shape == (3, 2, 4) and not empty_valid.any()


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("budget", [1, 17, 60])
def test_read_bound_holds_every_selection(hierarchical, budget):
    """The static width of the torch path's gather: no selection under a budget reads more, and the
    largest cluster can make it needed."""
    index = random_index(hierarchical=hierarchical, seed=budget)
    rule = SelectionRule(budget=budget, coarse_budget=4 * budget if hierarchical else None)
    bound = SparseAttention(index, rule).read_bound()
    assert bound == min(budget + int(index.counts.max()) - 1, index.clustered_tokens)
    q = torch.randn(16, 2, 3, 2, 8, generator=torch.Generator().manual_seed(budget)) * 3
    assert int(lookup(q, index, 0.35, rule).lengths.sum(-1).max()) <= bound
    assert SparseAttention(index, SelectionRule(threshold=-3.0)).read_bound() is None
    assert SparseAttention(index, SelectionRule(exact=True)).read_bound() == index.clustered_tokens


def test_expand_ranges_with_no_candidates():
    indices, valid = expand_ranges(torch.zeros(2, 3, 0, dtype=torch.long), torch.zeros(2, 3, 0, dtype=torch.long))
    assert indices.shape == (2, 3, 0) and valid.shape == (2, 3, 0)


def test_level2_with_every_coarse_cluster_kept_equals_flat():
    # With nothing rejected the mixed-resolution normaliser is the full one: same estimate as flat.
    index = random_index(hierarchical=True)
    q = torch.randn(2, 2, 3, 2, 8)
    flat, _ = score_flat(q, index, 0.35, None)
    _, s1 = score_coarse(q, index, 0.35, None)
    every_coarse = torch.ones(2, 2, index.coarse_counts.shape[1], dtype=torch.bool)
    fine = score_fine(q, index, 0.35, None, every_coarse, s1)
    assert torch.equal(fine.ids, flat.ids)
    finite = torch.isfinite(flat.logp)
    assert torch.allclose(fine.logp[finite], flat.logp[finite], atol=1e-5)


def test_level2_normaliser_uses_coarse_mass_of_rejected_clusters():
    index = random_index(hierarchical=True)
    q = torch.randn(1, 2, 1, 1, 8)
    _, s1 = score_coarse(q, index, 0.35, None)
    keep = torch.zeros(1, 2, index.coarse_counts.shape[1], dtype=torch.bool)
    keep[..., 0] = True
    fine = score_fine(q, index, 0.35, None, keep, s1)
    for h in range(2):
        lo, hi = index.coarse_offsets[h, 0].item(), index.coarse_offsets[h, 1].item()
        assert fine.ids[0, h][fine.counts[0, h] > 0].tolist() == [
            j for j in range(lo, hi) if index.counts[h, j] > 0
        ]
        qv = q[0, h, 0, 0].double()
        s2 = index.centroids[h, lo:hi].double() @ qv * 0.35
        n2 = index.counts[h, lo:hi].double()
        s1h = index.coarse_centroids[h, 1:].double() @ qv * 0.35
        n1 = index.coarse_counts[h, 1:].double()
        z = (n2 * s2.exp()).sum() + (n1 * s1h.exp()).sum()
        ok = n2 > 0
        got = fine.logp[0, h, : hi - lo][ok].double()
        assert torch.allclose(got, (s2 - z.log())[ok], atol=1e-5)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_keep_1_selects_every_key(hierarchical):
    """An exact rule reads every key and scores no centroid (the lookup is skipped)."""
    index = random_index(hierarchical=hierarchical)
    q = torch.randn(2, 2, 3, 1, 8)
    sel = lookup(q, index, 0.35, SelectionRule(exact=True))
    assert torch.equal(sel.lengths.sum(-1), torch.full((2, 2), index.clustered_tokens))
    assert not sel.scored.any()
    rows, valid = expand_ranges(sel.starts, sel.lengths)
    for b in range(2):
        for h in range(2):
            assert sorted(rows[b, h][valid[b, h]].tolist()) == list(range(index.clustered_tokens))


def test_hierarchical_lookup_skips_fine_centroids():
    index = random_index(hierarchical=True)
    q = torch.randn(1, 2, 3, 1, 8)
    budget = index.clustered_tokens // 10
    sel = lookup(q, index, 0.35, SelectionRule(budget=budget, coarse_budget=2 * budget))
    fine = index.counts.shape[1]
    assert (sel.scored < fine).all()
    assert (sel.lengths.sum(-1) >= budget).all()
    assert (sel.lengths.sum(-1) <= 2 * budget + int(index.counts.max())).all()


@pytest.mark.parametrize("hierarchical", [False, True])
@pytest.mark.parametrize("rule", [SelectionRule(budget=60, coarse_budget=150),
                                  SelectionRule(threshold=math.log(0.005), coarse_threshold=math.log(0.002)),
                                  SelectionRule(budget=60, coarse_threshold=math.log(0.002))],
                         ids=["budget", "threshold", "mixed"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_lookup_keeps_what_the_naive_reference_keeps(hierarchical, rule, tokens):
    """The library's torch lookup (candidate lists, log-domain sums) against `kernels/naive.py`
    (dense masks, every fine centroid scored), with padded query tokens in one row."""
    from hf_squeeze.kernels import naive

    index = random_index(hierarchical=hierarchical, seed=3)
    g = torch.Generator().manual_seed(4)
    query = torch.randn(2, 6, tokens, 8, generator=g) * 2
    q_valid = torch.ones(2, tokens, dtype=torch.bool)
    q_valid[1, : tokens // 2] = False
    selection = lookup(query.view(2, 2, 3, tokens, 8), index, 0.35, rule, q_valid)
    kept = torch.zeros(2, 2, index.counts.shape[1], dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            starts = selection.starts[b, h][selection.lengths[b, h] > 0]
            # empty clusters share their offset with the next one: the last cluster at an offset owns it
            kept[b, h, torch.searchsorted(index.offsets[h], starts, right=True) - 1] = True
    expected = naive.lookup(query, index, 0.35, rule, q_valid)
    assert 0 < int(expected.sum()) < int((index.counts > 0).sum()) * 2
    assert torch.equal(kept, expected)


def test_pins_follow_the_heaviest_keys_with_a_budget_per_row_and_head():
    """`pin_keys`: each (row, KV head) pins its budget of context positions, best neighbourhoods
    first (a position's weight is the largest within PIN_AFTER before / PIN_BEFORE after it); a
    budget may differ per row and head; rows come back in index order, the mask marks them."""
    from hf_squeeze.selection import PIN_AFTER, PIN_BEFORE, pin_keys

    index = random_index()
    heads, n = index.keys.shape[:2]
    weights = torch.rand(2, heads, 3, n, generator=torch.Generator().manual_seed(5))
    budget = torch.tensor([[5, 0], [40, 17]])
    pinned = pin_keys(weights, index, budget)
    assert pinned.count.tolist() == budget.tolist()
    per_key = weights.amax(2)
    for b in range(2):
        for h in range(heads):
            rows = pinned.rows[b, h, : budget[b, h]].long()
            assert torch.equal(rows, rows.sort().values)  # index order
            assert pinned.mask[b, h].sum() == budget[b, h] and bool(pinned.mask[b, h, rows].all())
            if budget[b, h] == 0:
                continue
            # the best position's whole neighbourhood is pinned first
            best = int(index.positions[h, per_key[b, h].argmax()])
            near = [p for p in range(best - PIN_BEFORE, best + PIN_AFTER + 1) if 0 <= p < n]
            pinned_positions = set(index.positions[h, rows].tolist())
            assert (set(near) <= pinned_positions) if budget[b, h] >= len(near) else pinned_positions <= set(near)
