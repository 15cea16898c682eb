"""The lookup kernels (`kernels/lookup.py`: scoring, selection, kept ranges) against their readable
reference, `kernels/naive.py` (on the CPU they run under TRITON_INTERPRET=1)."""

import math

import pytest
import torch

from hf_squeeze import kernels
from hf_squeeze.kernels import naive
from hf_squeeze.selection import SelectionRule

from .kernel_cases import (
    CHILDREN,
    DEVICE,
    FLAT_RULES,
    SIZES,
    TWO_LEVEL_RULES,
    check_ranges,
    make_hier_index,
    make_index,
    make_inputs,
    run_lookup,
)


@pytest.mark.parametrize("kind", list(FLAT_RULES))
@pytest.mark.parametrize("group,tokens", [(1, 1), (3, 1), (4, 6), (7, 1)])
def test_flat_lookup_keeps_what_the_reference_keeps(kind, group, tokens):
    index = make_index()
    rule = FLAT_RULES[kind]
    query, _, _ = make_inputs(index, group, tokens, dyn_len=tokens)
    scaling = query.shape[-1] ** -0.5
    ranges, stats, _ = run_lookup(index, rule, query, scaling)

    expected = naive.lookup(query, index, scaling, rule)
    assert torch.equal(ranges.keep.bool().cpu(), expected.cpu())
    assert int(stats) == int((index.counts[None] * expected).sum())
    if kind == "budget":  # the crossing cluster is kept: at least the budget, less than budget + one cluster
        per_head = (index.counts[None] * expected).sum(-1)
        assert (per_head >= rule.budget).all() and (per_head < rule.budget + max(SIZES)).all()
    check_ranges(ranges, expected, index)


@pytest.mark.parametrize(
    "kind,group,tokens",
    [(kind, 3, tokens) for kind in TWO_LEVEL_RULES for tokens in (1, 5)]
    + [(kind, group, tokens) for kind in ("budget", "threshold") for group, tokens in ((1, 1), (4, 6), (7, 1))],
)
def test_two_level_lookup_keeps_what_the_reference_keeps(kind, group, tokens):
    index = make_hier_index()
    rule = TWO_LEVEL_RULES[kind]
    query, _, _ = make_inputs(index, group, tokens, dyn_len=tokens, batch=3)
    scaling = query.shape[-1] ** -0.5
    q_valid = None
    if tokens == 5:  # left padding: padded query tokens do not vote
        q_valid = torch.ones(3, tokens, dtype=torch.bool, device=DEVICE)
        q_valid[0, :2] = False
        q_valid[2, :4] = False
    ranges, stats, scored = run_lookup(index, rule, query, scaling, q_valid)
    expected = naive.lookup(query, index, scaling, rule, q_valid).cpu()

    assert torch.equal(ranges.keep.bool().cpu(), expected)
    assert int(stats) == int((index.counts[None].cpu() * expected).sum())
    check_ranges(ranges, expected, index)
    # fine centroids scored: those under the kept coarse clusters (under every coarse cluster with
    # keys when the coarse level keeps them all; none when it keeps none)
    children = ((index.coarse_offsets[:, 1:] - index.coarse_offsets[:, :-1]) * (index.coarse_counts > 0)).sum()
    if kind == "coarse keeps none":
        assert int(scored) == 0 and not expected.any()
    elif kind == "all":  # an exact rule reads every key and scores no centroid
        assert int(scored) == 0 and expected.any()
    elif kind == "coarse keeps all":
        assert int(scored) == int(children) * query.shape[0]
    else:  # the coarse level pruned: fewer fine centroids scored than a flat lookup would
        assert 0 < int(scored) < int(children) * query.shape[0]
    if rule.budget is not None and kind != "coarse keeps none":
        assert expected.any()


@pytest.mark.parametrize("two_level", [False, True])
@pytest.mark.parametrize("tokens", [1, 4])
def test_equal_probabilities_are_taken_in_cluster_order(two_level, tokens):
    """A query orthogonal to every centroid ties all clusters (at both levels): the budget still
    holds, and the kernel keeps the same clusters as the reference."""
    index = make_hier_index() if two_level else make_index()
    rule = SelectionRule(budget=40, coarse_budget=90 if two_level else None)
    query = torch.zeros(2, 6, tokens, index.keys.shape[-1], device=DEVICE)
    ranges, _, _ = run_lookup(index, rule, query, 0.125)
    expected = naive.lookup(query, index, 0.125, rule).cpu()
    assert torch.equal(ranges.keep.bool().cpu(), expected)
    kept = (index.counts[None].cpu() * expected).sum(-1)
    assert (kept >= 40).all()
    if not two_level:
        assert (kept < 40 + max(SIZES)).all()


@pytest.mark.parametrize("kind", ["budget", "threshold"])
def test_selection_over_many_clusters(kind):
    """Several passes of the selection program (more clusters than one chunk) and many blocks
    in the compaction; sizes 0 to 5, so the budget crosses at a cluster boundary often."""
    sizes = torch.randint(0, 6, (1500,), generator=torch.Generator().manual_seed(3)).tolist()
    index = make_index(dim=16, dense=4, sizes=sizes)
    rule = SelectionRule(budget=700) if kind == "budget" else SelectionRule(threshold=math.log(2e-4))
    query, _, _ = make_inputs(index, 3, tokens=1, dyn_len=1)
    ranges, _, _ = run_lookup(index, rule, query, 0.25)
    expected = naive.lookup(query, index, 0.25, rule)
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(ranges.keep.bool().cpu(), expected.cpu())
    check_ranges(ranges, expected, index)


def test_coarse_clusters_whose_fine_clusters_are_not_kept():
    """A kept coarse cluster may contribute no fine cluster (its fine ones lose to others'): the
    kernel agrees with the reference on such a selection (and it occurs here)."""
    from hf_squeeze.selection import score_coarse, select

    index = make_hier_index(seed=3)
    rule = SelectionRule(budget=30, coarse_budget=200)
    query, _, _ = make_inputs(index, 3, 1, dyn_len=1, batch=3, seed=4)
    scaling = query.shape[-1] ** -0.5
    ranges, _, _ = run_lookup(index, rule, query, scaling)
    expected = naive.lookup(query, index, scaling, rule).cpu()
    assert torch.equal(ranges.keep.bool().cpu(), expected)
    # kept fine flags summed per coarse cluster
    heads = index.keys.shape[0]
    parent = [torch.repeat_interleave(torch.arange(len(CHILDREN)), (index.coarse_offsets[h, 1:] - index.coarse_offsets[h, :-1]).cpu())
              for h in range(heads)]
    kept_per_coarse = torch.stack([torch.stack([torch.zeros(len(CHILDREN)).index_add_(0, parent[h], expected[b, h].float())
                                                for h in range(heads)]) for b in range(3)])
    q = query.view(3, heads, 3, 1, -1).float()
    coarse, _ = score_coarse(q, index, scaling, None)
    coarse_kept = select(coarse.logp, coarse.counts, None, rule.coarse_budget).cpu()
    assert (coarse_kept & (kept_per_coarse == 0)).any()


def test_candidate_bound_holds_for_every_budget_selection():
    """The fine room of a budget-selected view: never fewer fine clusters than some selection
    lists (random scores), and less than all of them for a small budget."""
    from hf_squeeze.kernels.layout import candidate_bound
    from hf_squeeze.selection import select

    g = torch.Generator().manual_seed(7)
    counts = torch.randint(0, 40, (3, 12), generator=g)
    counts[:, 0] = 0  # an empty coarse cluster (with fine clusters) is never kept
    sizes = torch.randint(0, 7, (3, 12), generator=g)
    everything = int((sizes * (counts > 0)).sum(-1).max())
    for budget in (1, 50, 150, 10**6):
        bound = candidate_bound(counts, sizes, budget)
        assert bound <= everything
        for _ in range(200):
            keep = select(torch.randn(1, 3, 12, generator=g), counts[None], None, budget)
            assert int((sizes * keep).sum(-1).max()) <= bound
    assert candidate_bound(counts, sizes, 50) < everything
    index = make_hier_index()
    budget = TWO_LEVEL_RULES["budget"].coarse_budget
    kindex = kernels.kernel_index(index, coarse_budget=budget)
    assert kindex.candidates(budget) < kindex.clusters  # the lookup tests run in less room
    assert kindex.candidates(None) == kindex.candidates(7) == kindex.clusters


@pytest.mark.parametrize("centroids,tokens_per_step,warps", [(32, 16, 2), (256, 128, 8)])
def test_other_scoring_tiles_keep_what_the_reference_keeps(monkeypatch, centroids, tokens_per_step, warps):
    """The scoring's tiles (as bench_kernels.py --score-block / --prefill-score-block / --score-tokens /
    --score-warps / --norm-tile set them) change no selection: decode and prefill, flat and two-level, budget and threshold."""
    from hf_squeeze.kernels import scoring

    monkeypatch.setattr(scoring, "SCORE_BLOCK_C", centroids)
    monkeypatch.setattr(scoring, "PREFILL_BLOCK_C", centroids)
    monkeypatch.setattr(scoring, "PREFILL_BLOCK_T", tokens_per_step)
    monkeypatch.setattr(scoring, "PREFILL_WARPS", warps)
    monkeypatch.setattr(scoring, "NORM_BLOCK_C", centroids)
    monkeypatch.setattr(scoring, "NORM_BLOCK_T", tokens_per_step)
    monkeypatch.setattr(scoring, "NORM_WARPS", warps)
    for index, rules in ((make_index(), FLAT_RULES), (make_hier_index(), TWO_LEVEL_RULES)):
        for tokens in (1, 37):
            query, _, _ = make_inputs(index, 3, tokens, dyn_len=tokens)
            scaling = query.shape[-1] ** -0.5
            for kind in ("budget", "threshold"):
                ranges, _, _ = run_lookup(index, rules[kind], query, scaling)
                expected = naive.lookup(query, index, scaling, rules[kind]).cpu()
                assert 0 < int(expected.sum()) < expected.numel()
                assert torch.equal(ranges.keep.bool().cpu(), expected), (tokens, kind)


@pytest.mark.parametrize("resolve", [64, 2])
def test_budget_search_keeps_what_the_reference_keeps(monkeypatch, resolve):
    """The selection by budget alone, on scores with many equal values, empty clusters, -inf and
    budgets from one key to more than all. With RESOLVE 64 the search hands its last clusters to
    the one-pass resolution; with 2 it narrows them down step by step. Outputs poisoned."""
    from hf_squeeze.kernels import selection as kselection
    from hf_squeeze.selection import select

    monkeypatch.setattr(kselection, "RESOLVE", resolve)
    monkeypatch.setattr(kselection, "empty", lambda dev, dtype, *shape: torch.full(shape, 7, dtype=dtype, device=dev))
    g = torch.Generator().manual_seed(11)
    batch, heads, clusters = 3, 2, 700
    counts = torch.randint(0, 30, (heads, clusters), generator=g)
    counts[:, ::7] = 0
    logp = torch.randn(batch, heads, clusters, generator=g) * 20 - 40
    logp[0] = (logp[0] / 4).round()  # many clusters share a log p
    logp[2, :, 1::50] = float("-inf")
    totals = counts.sum(-1)
    for budget in (1, 37, 2000, int(totals.min()), int(totals.max()) + 1):
        stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
        c32 = counts.to(DEVICE, torch.int32)
        keep, _, _, nkeys = kselection.select(logp.to(DEVICE), c32, c32, None, budget, int(counts.max()), 32, stats)
        expected = select(logp, counts[None].expand(batch, -1, -1), None, budget)
        assert torch.equal(keep.bool().cpu(), expected), budget
        assert torch.equal(nkeys.cpu().long(), (counts[None] * expected).sum(-1))
        assert int(stats) == int((counts[None] * expected).sum())
