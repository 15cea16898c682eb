"""Inputs the kernel tests share: layer indexes built by hand so that every awkward case is present
(empty clusters, clusters of one key, lengths that are not a multiple of a tile, coarse clusters with
no fine cluster or only empty ones, keys with cluster structure so selections are meaningful),
queries near the centroids, and the checks of what the lookup hands to attention."""

import math

import torch

from hf_squeeze import kernels
from hf_squeeze.index import LayerIndex
from hf_squeeze.kernels import naive
from hf_squeeze.selection import SelectionRule

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [0, 1, 1, 2, 3, 7, 12, 25, 0, 40, 5, 1, 9, 30, 17]  # clusters of size 0 and 1 included
# Two-level index: fine clusters per coarse cluster (0: a coarse cluster with no child), and keys per fine cluster.
CHILDREN = [3, 0, 5, 1, 4, 2, 6, 3, 2, 4]
FINE_SIZES = [0, 1, 2, 3, 7, 12, 25, 0, 9, 30, 17, 5, 1, 4, 6, 11, 2, 8, 3, 0, 14, 1, 6, 9, 2, 5, 3, 10, 4, 7]

FLAT_RULES = {
    "budget": SelectionRule(budget=40),
    "threshold": SelectionRule(threshold=math.log(0.01)),
    "none": SelectionRule(threshold=float("inf")),  # empty selection
    "all": SelectionRule(exact=True),
}
TWO_LEVEL_RULES = {
    "budget": SelectionRule(budget=60, coarse_budget=130),
    "threshold": SelectionRule(threshold=math.log(0.01), coarse_threshold=math.log(0.003)),
    "all": SelectionRule(exact=True),
    "coarse keeps all": SelectionRule(budget=40, coarse_threshold=float("-inf")),
    "coarse keeps none": SelectionRule(budget=40, coarse_threshold=float("inf")),
    "coarse budget, fine threshold": SelectionRule(threshold=math.log(0.02), coarse_budget=100),
}


def make_index(heads=2, dim=64, dense=10, dtype=torch.float32, seed=0, sizes=SIZES) -> LayerIndex:
    g = torch.Generator().manual_seed(seed)
    counts = torch.stack([torch.tensor(sizes)[torch.randperm(len(sizes), generator=g)] for _ in range(heads)])
    rows = int(counts[0].sum())  # 153: not a multiple of the 32-row tile
    centers = torch.randn(heads, len(sizes), dim, generator=g) * 2
    label = torch.repeat_interleave(torch.arange(len(sizes)).expand(heads, -1).flatten(), counts.flatten())
    label = label.view(heads, rows)
    keys = centers.gather(1, label[..., None].expand(-1, -1, dim)) + 0.5 * torch.randn(heads, rows, dim, generator=g)
    sums = torch.zeros(heads, len(sizes), dim).scatter_add_(1, label[..., None].expand(-1, -1, dim), keys)
    offsets = torch.cat([torch.zeros(heads, 1, dtype=torch.long), counts.cumsum(-1)], 1)
    return LayerIndex(
        keys=keys.to(dtype).to(DEVICE),
        values=torch.randn(heads, rows, dim, generator=g).to(dtype).to(DEVICE),
        centroids=(sums / counts.clamp_min(1)[..., None]).to(DEVICE),
        counts=counts.to(DEVICE),
        offsets=offsets.to(DEVICE),
        dense_keys=torch.randn(heads, dense, dim, generator=g).to(dtype).to(DEVICE),
        dense_values=torch.randn(heads, dense, dim, generator=g).to(dtype).to(DEVICE),
    )


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
        coarse_counts = torch.zeros(len(CHILDREN), dtype=torch.long).index_add_(0, parent, sizes)
        coarse_sums = torch.zeros(len(CHILDREN), dim).index_add_(0, parent, sums)
        parts["keys"].append(keys)
        parts["values"].append(torch.randn(len(label), dim, generator=g))
        parts["centroids"].append(centroids)
        parts["counts"].append(sizes)
        parts["offsets"].append(torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]))
        parts["dense_keys"].append(torch.randn(dense, dim, generator=g))
        parts["dense_values"].append(torch.randn(dense, dim, generator=g))
        parts["coarse_centroids"].append(coarse_sums / coarse_counts.clamp_min(1)[:, None])
        parts["coarse_counts"].append(coarse_counts)
        parts["coarse_offsets"].append(torch.cat([torch.zeros(1, dtype=torch.long), children.cumsum(0)]))
    model_dtype = ("keys", "values", "dense_keys", "dense_values")
    return LayerIndex(
        **{k: torch.stack(v).to(dtype if k in model_dtype else v[0].dtype).to(DEVICE) for k, v in parts.items() if v}
    )


def make_inputs(index, group, tokens, dyn_len, batch=2, seed=1):
    """Queries near the cluster centres, and a dynamic part whose last `tokens` are the queries."""
    g = torch.Generator().manual_seed(seed)
    heads, _, dim = index.keys.shape
    dtype = index.keys.dtype
    base = index.centroids.cpu()[:, torch.randint(index.centroids.shape[1], (batch * group * tokens,), generator=g)]
    query = (base.view(heads, batch, group, tokens, dim).permute(1, 0, 2, 3, 4).reshape(batch, heads * group, tokens, dim))
    query = (query + torch.randn(query.shape, generator=g)).to(dtype).to(DEVICE)
    dyn = [torch.randn(batch, heads, dyn_len, dim, generator=g).to(dtype).to(DEVICE) for _ in range(2)]
    return query, dyn[0], dyn[1]


def poisoned(query):
    batch, q_heads, tokens, dim = query.shape
    return torch.full((batch, tokens, q_heads, dim), float("nan"), device=query.device, dtype=query.dtype)


def assert_close(got, expected, dtype):
    assert torch.isfinite(got).all()
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= (1e-4 if dtype == torch.float32 else 1e-2), float(err)


def padding_mask(batch, tokens, dyn_len, padded):
    """Causal mask [B, 1, T, Ld] with `padded` left-padding tokens in row 0; and the real keys [B, Ld]."""
    valid = torch.ones(batch, dyn_len, dtype=torch.bool, device=DEVICE)
    valid[0, :padded] = False
    causal = torch.ones(tokens, dyn_len, dtype=torch.bool, device=DEVICE).tril(dyn_len - tokens)
    return (causal[None] & valid[:, None, :])[:, None], valid


def run_lookup(index, rule, query, scaling, q_valid=None):
    """The lookup kernel: what it hands to attention, the kept keys and (two-level) fine centroids scored."""
    tokens = query.shape[2]
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    scored = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    if rule.exact:
        args = (float("-inf"), None, float("-inf"), None)
    else:
        args = (rule.threshold, rule.budget, rule.coarse_threshold, rule.coarse_budget)
    logw = kernels.query_weights(q_valid, query.shape[0], tokens, DEVICE) if tokens > 1 else None
    kindex = kernels.kernel_index(index, coarse_budget=args[3])  # fine room bounded for a coarse budget
    ranges = kernels.lookup(query, kindex, scaling, args[0], args[1], logw, stats, args[2], args[3], scored,
                            every=rule.exact)
    return ranges, stats, scored


def check_ranges(ranges, expected, index):
    """The kept ranges: the kept clusters in order, cut into pieces of at most `layout.PIECE_ROWS` keys, with
    the kept keys before each piece (naive.kept_pieces)."""
    pieces, totals = naive.kept_pieces(expected.cpu(), index, kernels.layout.PIECE_ROWS)
    for (b, h), want in pieces.items():
        n = int(ranges.nsel[b, h])
        got = list(zip(ranges.starts[b, h, :n].tolist(), ranges.lengths[b, h, :n].tolist(),
                       ranges.positions[b, h, :n].tolist()))
        assert got == want
        assert int(ranges.nkeys[b, h]) == totals[b, h]
