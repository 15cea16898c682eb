"""Triton kernels on a two-level (hierarchical) index against the torch reference.

The index is built by hand so that every awkward case is in one layer: coarse clusters with no fine
cluster, coarse clusters whose fine clusters are all empty, empty fine clusters and fine clusters of
one key, keys with two levels of cluster structure (so both selections are meaningful), several
batch rows, GQA groups of 1, 3, 4 and 7, decode and prefill with padding tokens.
"""

import copy
import math

import pytest
import torch

from hf_squeeze import kernels, cache_kwargs
from hf_squeeze.cache import SqueezedLayer
from hf_squeeze.index import LayerIndex
from hf_squeeze.lookup import SelectionRule, lookup

from .test_kernels import DEVICE, assert_close, check_work, make_inputs, poisoned

# Fine clusters per coarse cluster (0: a coarse cluster with no child), and keys per fine cluster.
CHILDREN = [3, 0, 5, 1, 4, 2, 6, 3, 2, 4]
FINE_SIZES = [0, 1, 2, 3, 7, 12, 25, 0, 9, 30, 17, 5, 1, 4, 6, 11, 2, 8, 3, 0, 14, 1, 6, 9, 2, 5, 3, 10, 4, 7]


def make_hier_index(heads=2, dim=32, dense=10, dtype=torch.float32, seed=0) -> LayerIndex:
    g = torch.Generator().manual_seed(seed)
    parts = {name: [] for name in LayerIndex.__dataclass_fields__}
    for _ in range(heads):
        children = torch.tensor(CHILDREN)[torch.randperm(len(CHILDREN), generator=g)]
        sizes = torch.tensor(FINE_SIZES)[torch.randperm(len(FINE_SIZES), generator=g)]
        parent = torch.repeat_interleave(torch.arange(len(CHILDREN)), children)
        # The first coarse cluster with children has only empty ones (its keys move to the last).
        sizes[-1] += sizes[parent == parent[0]].sum()
        sizes[parent == parent[0]] = 0
        coarse_centres = torch.randn(len(CHILDREN), dim, generator=g) * 2
        fine_centres = coarse_centres[parent] + torch.randn(len(parent), dim, generator=g)
        label = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        keys = fine_centres[label] + 0.5 * torch.randn(len(label), dim, generator=g)
        sums = torch.zeros(len(sizes), dim).index_add_(0, label, keys)
        centroids = sums / sizes.clamp_min(1)[:, None]
        l1_counts = torch.zeros(len(CHILDREN), dtype=torch.long).index_add_(0, parent, sizes)
        l1_sums = torch.zeros(len(CHILDREN), dim).index_add_(0, parent, sums)
        parts["keys"].append(keys)
        parts["values"].append(torch.randn(len(label), dim, generator=g))
        parts["centroids"].append(centroids)
        parts["counts"].append(sizes)
        parts["offsets"].append(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]))
        parts["dense_keys"].append(torch.randn(dense, dim, generator=g))
        parts["dense_values"].append(torch.randn(dense, dim, generator=g))
        parts["l1_centroids"].append(l1_sums / l1_counts.clamp_min(1)[:, None])
        parts["l1_counts"].append(l1_counts)
        parts["l1_offsets"].append(torch.cat([torch.zeros(1, dtype=torch.long), children.cumsum(0)]))
    model_dtype = ("keys", "values", "dense_keys", "dense_values")
    return LayerIndex(
        **{k: torch.stack(v).to(dtype if k in model_dtype else v[0].dtype).to(DEVICE) for k, v in parts.items()}
    )


RULES = {
    "budget": SelectionRule(budget=60, l1_budget=130),
    "threshold": SelectionRule(threshold=math.log(0.01), l1_threshold=math.log(0.003)),
    "all": SelectionRule(keep_all=True),
    "l1 keeps all": SelectionRule(budget=40, l1_threshold=float("-inf")),
    "l1 keeps none": SelectionRule(budget=40, l1_threshold=float("inf")),
    "l1 budget, fine threshold": SelectionRule(threshold=math.log(0.02), l1_budget=100),
}


def run_lookup(index, rule, query, scaling, q_valid=None):
    tokens = query.shape[2]
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    scored = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    if rule.keep_all:
        args = (float("-inf"), None, float("-inf"), None)
    else:
        args = (rule.threshold, rule.budget, rule.l1_threshold, rule.l1_budget)
    logw = kernels.query_weights(q_valid, query.shape[0], tokens, DEVICE) if tokens > 1 else None
    kindex = kernels.kernel_index(index, l1_budget=args[3])  # level-2 room bounded for a level-1 budget
    work = kernels.lookup(query, kindex, scaling, args[0], args[1], logw, stats, args[2], args[3], scored)
    return work, stats, scored


def reference(index, rule, query, scaling, q_valid=None):
    """The reference selection, in cluster order [B, H, C], and centroids scored per (row, head)."""
    batch, q_heads, tokens, dim = query.shape
    heads = index.keys.shape[0]
    q = query.view(batch, heads, q_heads // heads, tokens, dim).float()
    sel = lookup(q, index, scaling, rule, q_valid)
    keep = torch.zeros(batch, heads, index.counts.shape[1], dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            starts = sel.starts[b, h][sel.lengths[b, h] > 0].cpu()
            # Empty clusters share their offset with the next cluster: the last one at an offset owns it.
            ids = torch.searchsorted(index.offsets[h].cpu(), starts, right=True) - 1
            keep[b, h, ids] = True
    return keep, sel.scored


@pytest.mark.parametrize(
    "kind,group,tokens",
    [(kind, 3, tokens) for kind in RULES for tokens in (1, 5)]
    + [(kind, group, tokens) for kind in ("budget", "threshold") for group, tokens in ((1, 1), (4, 6), (7, 1))],
)
def test_hierarchical_lookup_kernel_selects_what_the_reference_selects(kind, group, tokens):
    index = make_hier_index()
    rule = RULES[kind]
    query, _, _ = make_inputs(index, group, tokens, dyn_len=tokens, batch=3)
    scaling = query.shape[-1] ** -0.5
    q_valid = None
    if tokens == 5:  # left padding: padded query tokens do not vote
        q_valid = torch.ones(3, tokens, dtype=torch.bool, device=DEVICE)
        q_valid[0, :2] = False
        q_valid[2, :4] = False
    work, stats, scored = run_lookup(index, rule, query, scaling, q_valid)
    expected, ref_scored = reference(index, rule, query, scaling, q_valid)

    assert torch.equal(work.keep.bool().cpu(), expected)
    assert int(stats) == int((index.counts[None].cpu() * expected).sum())
    coarse = index.l1_counts.shape[1]
    assert int(scored) == int((ref_scored - coarse).sum())  # fine centroids scored = under the kept coarse
    check_work(work, expected, index)
    # fine clusters under coarse clusters with keys (the ones an unpruned level 1 keeps)
    children = ((index.l1_offsets[:, 1:] - index.l1_offsets[:, :-1]) * (index.l1_counts > 0)).sum()
    if kind == "l1 keeps none":
        assert int(scored) == 0 and not expected.any()
    elif kind in ("l1 keeps all", "all"):
        assert int(scored) == int(children) * query.shape[0]
    else:  # the coarse level pruned: fewer fine centroids scored than a flat lookup would
        assert 0 < int(scored) < int(children) * query.shape[0]
    if rule.budget is not None and kind != "l1 keeps none":
        assert expected.any()


def test_coarse_clusters_whose_fine_clusters_are_not_kept():
    """A kept coarse cluster may contribute no fine cluster (its fine ones lose to others'): the
    kernel agrees with the reference on such a selection (and it occurs here)."""
    index = make_hier_index(seed=3)
    rule = SelectionRule(budget=30, l1_budget=200)
    query, _, _ = make_inputs(index, 3, 1, dyn_len=1, batch=3, seed=4)
    scaling = query.shape[-1] ** -0.5
    work, _, _ = run_lookup(index, rule, query, scaling)
    expected, _ = reference(index, rule, query, scaling)
    assert torch.equal(work.keep.bool().cpu(), expected)
    # coarse clusters with keys and kept fine flags summed per coarse cluster
    parent = [torch.repeat_interleave(torch.arange(len(CHILDREN)), (index.l1_offsets[h, 1:] - index.l1_offsets[h, :-1]).cpu())
              for h in range(index.keys.shape[0])]
    kept_per_coarse = torch.stack([torch.stack([torch.zeros(len(CHILDREN)).index_add_(0, parent[h], expected[b, h].float())
                                                for h in range(index.keys.shape[0])]) for b in range(3)])
    from hf_squeeze.lookup import score_level1, select

    q = query.view(3, index.keys.shape[0], 3, 1, -1).float()
    l1, _ = score_level1(q, index, scaling, None)
    l1_keep = select(l1.logp, l1.counts, None, rule.l1_budget).cpu()
    assert (l1_keep & (kept_per_coarse == 0)).any()


@pytest.mark.parametrize("tokens", [1, 4])
def test_equal_probabilities_are_taken_in_cluster_order(tokens):
    """A query orthogonal to every centroid ties all clusters at both levels."""
    index = make_hier_index()
    query = torch.zeros(2, 6, tokens, 32, device=DEVICE)
    rule = SelectionRule(budget=40, l1_budget=90)
    work, _, _ = run_lookup(index, rule, query, 0.125)
    expected, _ = reference(index, rule, query, 0.125)
    assert torch.equal(work.keep.bool().cpu(), expected)
    kept = (index.counts[None].cpu() * expected).sum(-1)
    assert (kept >= 40).all()


@pytest.mark.parametrize("dtype,kind,group,tokens", [
    (torch.float32, "budget", 4, 1),
    (torch.float32, "threshold", 7, 1),
    (torch.bfloat16, "budget", 3, 1),
    (torch.float32, "budget", 3, 9),
    (torch.bfloat16, "threshold", 4, 7),
])
def test_hierarchical_attention_matches_reference(dtype, kind, group, tokens):
    """End to end through a SqueezedLayer: the kernel path (lookup + sparse attention) against the
    reference path, with left padding for the prefills."""
    index = make_hier_index(dtype=dtype)
    rule = RULES[kind]
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=tokens, dyn_len=tokens + 6)
    scaling = query.shape[-1] ** -0.5
    layer = SqueezedLayer(index, rule, fixed_tokens=1000)
    keys, values = layer.update(dyn_k, dyn_v)
    dyn_len = keys.shape[2]
    valid = torch.ones(2, dyn_len, dtype=torch.bool, device=DEVICE)
    valid[0, :3] = False
    causal = torch.ones(tokens, dyn_len, dtype=torch.bool, device=DEVICE).tril(dyn_len - tokens)
    mask = (causal[None] & valid[:, None, :])[:, None]
    expected = layer.attend_reference(query, keys, values, mask, scaling).float()
    t = torch.arange(tokens, device=DEVICE)
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    out = poisoned(query)
    got = kernels.attend(query, keys, values, kernels.kernel_index(index), rule, scaling, mask[:, 0, -1, :],
                         mask[:, 0, t, dyn_len - tokens + t], stats, 2, out).float()
    real = valid[:, dyn_len - tokens:]
    assert_close(got[real], expected[real], dtype)


def test_kernel_path_serves_a_hierarchical_cache(llama, context, monkeypatch):
    """Through the model (prefill of a question, then one decode step): a two-level cache takes the
    kernel path and gives the reference's logits, and both paths count the same centroids scored."""
    from hf_squeeze import SqueezedCache, SqueezeConfig

    model = copy.deepcopy(llama).to(DEVICE)  # the session fixture stays on the CPU for the other tests
    question = torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    config = SqueezeConfig(keep=0.3, hierarchical=True, centroid_ratio=0.1, l1_ratio=0.02, kmeans_iters=5)
    cache = SqueezedCache.from_context(model, context.to(DEVICE), config, progress=False)
    kernel_mode = "1" if DEVICE == "cpu" else "auto"
    outputs, scored = {}, {}
    for mode in ("0", kernel_mode):
        monkeypatch.setenv("HF_SQUEEZE_KERNELS", mode)
        request = cache.fork()
        with torch.no_grad():
            logits = model(question[None], **cache_kwargs(model, request)).logits
            step = model(question[None, :1], **cache_kwargs(model, request)).logits
        outputs[mode] = torch.cat([logits, step], 1)
        scored[mode] = request.stats()["centroids_scored"]
        fine_by_kernels = sum(int(layer.kernel_fine_scored.sum()) for layer in request.layers)
        assert (fine_by_kernels > 0) == (mode == kernel_mode)  # the kernels served the kernel mode
    torch.testing.assert_close(outputs["0"], outputs[kernel_mode], atol=1e-4, rtol=1e-4)
    assert scored["0"] == pytest.approx(scored[kernel_mode])


def test_candidate_bound_holds_for_every_budget_selection():
    """The level-2 room of a budget-selected view: never fewer fine clusters than some selection
    lists (random scores), and less than all of them for a small budget."""
    from hf_squeeze.kernels.layout import candidate_bound
    from hf_squeeze.lookup import select

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
    kindex = kernels.kernel_index(index, l1_budget=RULES["budget"].l1_budget)
    assert kindex.candidates(RULES["budget"].l1_budget) < kindex.clusters  # the lookup tests run in less room
    assert kindex.candidates(None) == kindex.candidates(7) == kindex.clusters
