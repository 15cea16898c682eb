"""Triton kernels against the torch reference (on the CPU they run under TRITON_INTERPRET=1).

Indexes are built by hand so that every awkward case is present in one layer: empty clusters,
clusters of one key, context lengths that are not a multiple of the tile, keys with cluster
structure (so selections are meaningful), several batch rows, GQA groups of 1, 3, 4 and 7.
"""

import copy
import math

import pytest
import torch

from hf_squeeze import kernels, cache_kwargs
from hf_squeeze.cache import SqueezedLayer
from hf_squeeze.index import LayerIndex
from hf_squeeze.lookup import SelectionRule, lookup

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [0, 1, 1, 2, 3, 7, 12, 25, 0, 40, 5, 1, 9, 30, 17]  # clusters of size 0 and 1 included


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


def rule_for(kind, index) -> SelectionRule:
    return {
        "budget": SelectionRule(budget=40),
        "threshold": SelectionRule(threshold=math.log(0.01)),
        "none": SelectionRule(threshold=float("inf")),  # empty selection
        "all": SelectionRule(keep_all=True),
    }[kind]


def reference_keep(query, index, rule, scaling, q_valid=None):
    batch, q_heads, tokens, dim = query.shape
    heads = index.keys.shape[0]
    q = query.view(batch, heads, q_heads // heads, tokens, dim).float()
    return lookup(q, index, scaling, rule, q_valid).lengths > 0


def check_work(work, expected, index):
    """The work list: the kept clusters in order, cut into pieces of at most PIECE_ROWS keys, with
    the kept keys before each piece."""
    piece = kernels.PIECE_ROWS
    for b in range(expected.shape[0]):
        for h in range(expected.shape[1]):
            pieces, before = [], 0
            for c in expected[b, h].nonzero().flatten().tolist():
                start, count = int(index.offsets[h, c]), int(index.counts[h, c])
                pieces += [(start + j, min(piece, count - j), before + j) for j in range(0, count, piece)]
                before += count
            n = int(work.nsel[b, h])
            got = list(zip(work.starts[b, h, :n].tolist(), work.lengths[b, h, :n].tolist(), work.positions[b, h, :n].tolist()))
            assert got == pieces
            assert int(work.nkeys[b, h]) == before


@pytest.mark.parametrize("kind", ["budget", "threshold", "none", "all"])
@pytest.mark.parametrize("group,tokens", [(1, 1), (3, 1), (4, 6), (7, 1)])
def test_lookup_kernel_selects_what_the_reference_selects(kind, group, tokens):
    index = make_index()
    kindex = kernels.kernel_index(index)
    rule = rule_for(kind, index)
    query, _, _ = make_inputs(index, group, tokens, dyn_len=tokens)
    scaling = query.shape[-1] ** -0.5
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    threshold, budget = (float("-inf"), None) if rule.keep_all else (rule.threshold, rule.budget)
    logw = kernels.query_weights(None, query.shape[0], tokens, DEVICE)
    work = kernels.lookup(query, kindex, scaling, threshold, budget, logw, stats)

    expected = reference_keep(query, index, rule, scaling)
    assert torch.equal(work.keep.bool().cpu(), expected.cpu())
    kept_keys = (index.counts[None] * expected).sum()
    assert int(stats) == int(kept_keys)
    if kind == "budget":  # the crossing cluster is kept: at least the budget, less than budget + one cluster
        per_head = (index.counts[None] * expected).sum(-1)
        assert (per_head >= rule.budget).all() and (per_head < rule.budget + max(SIZES)).all()

    check_work(work, expected, index)


@pytest.mark.parametrize("tokens", [1, 4])
def test_equal_probabilities_are_taken_in_cluster_order(tokens):
    """A query orthogonal to every centroid ties all clusters: the budget still holds, and the
    kernel keeps the same clusters as the reference."""
    index = make_index()
    query = torch.zeros(2, 6, tokens, 64, device=DEVICE)
    rule = SelectionRule(budget=40)
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    logw = kernels.query_weights(None, 2, tokens, DEVICE)
    work = kernels.lookup(query, kernels.kernel_index(index), 0.125, None, rule.budget, logw, stats)
    expected = reference_keep(query, index, rule, 0.125)
    assert torch.equal(work.keep.bool().cpu(), expected.cpu())
    kept = (index.counts[None] * expected).sum(-1)
    assert (kept >= 40).all() and (kept < 40 + max(SIZES)).all()


@pytest.mark.parametrize("kind", ["budget", "threshold"])
def test_selection_over_many_clusters(kind):
    """Several passes of the selection program (more clusters than one chunk) and many blocks
    in the compaction; sizes 0 to 5, so the budget crosses at a cluster boundary often."""
    sizes = torch.randint(0, 6, (1500,), generator=torch.Generator().manual_seed(3)).tolist()
    index = make_index(dim=16, dense=4, sizes=sizes)
    rule = SelectionRule(budget=700) if kind == "budget" else SelectionRule(threshold=math.log(2e-4))
    query, _, _ = make_inputs(index, 3, tokens=1, dyn_len=1)
    scaling = 0.25
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    work = kernels.lookup(query, kernels.kernel_index(index), scaling, rule.threshold, rule.budget, None, stats)
    expected = reference_keep(query, index, rule, scaling)
    assert 0 < int(expected.sum()) < expected.numel()
    assert torch.equal(work.keep.bool().cpu(), expected.cpu())
    for b in range(query.shape[0]):
        for h in range(index.keys.shape[0]):
            ids = expected[b, h].nonzero().flatten()
            n = int(work.nsel[b, h])
            assert work.starts[b, h, :n].tolist() == index.offsets[h, ids].tolist()
            kept = index.counts[h, ids]
            assert work.positions[b, h, :n].tolist() == (kept.cumsum(0) - kept).tolist()


def poisoned(query):
    batch, q_heads, tokens, dim = query.shape
    return torch.full((batch, tokens, q_heads, dim), float("nan"), device=query.device, dtype=query.dtype)


def run_both(index, rule, query, dyn_k, dyn_v, mask=None, splits=1):
    """Kernel output (into a NaN-poisoned buffer) and reference output through a SqueezedLayer."""
    scaling = query.shape[-1] ** -0.5
    layer = SqueezedLayer(index, rule, fixed_tokens=1000)
    keys, values = layer.update(dyn_k, dyn_v)
    expected = layer.attend_reference(query, keys, values, mask, scaling)
    key_valid = q_valid = None
    if mask is not None:
        tokens, dyn_len = query.shape[2], keys.shape[2]
        key_valid = mask[:, 0, -1, :]
        t = torch.arange(tokens, device=query.device)
        q_valid = mask[:, 0, t, dyn_len - tokens + t]
    out = poisoned(query)
    stats = torch.zeros(1, dtype=torch.int64, device=query.device)
    kindex = kernels.kernel_index(index)
    got = kernels.attend(query, keys, values, kindex, rule, scaling, key_valid, q_valid, stats, splits, out)
    assert got.data_ptr() == out.data_ptr()
    return got.float(), expected.float()


def assert_close(got, expected, dtype):
    assert torch.isfinite(got).all()
    err = (got - expected).abs().max() / expected.abs().max()
    assert err <= (1e-4 if dtype == torch.float32 else 1e-2), float(err)


@pytest.mark.parametrize(
    "dtype,kind,group,dim,splits",
    [(torch.float32, kind, group, dim, 4) for kind in ("budget", "threshold", "none", "all") for group, dim in ((1, 64), (4, 128), (7, 64))]
    + [(dtype, "budget", 3, 128, splits) for dtype in (torch.bfloat16, torch.float16) for splits in (1, 3)],
)
def test_decode_attention_matches_reference(dtype, kind, group, dim, splits):
    index = make_index(dim=dim, dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=1, dyn_len=37)
    got, expected = run_both(index, rule_for(kind, index), query, dyn_k, dyn_v, splits=splits)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["budget", "threshold"])
@pytest.mark.parametrize("group,tokens", [(3, 9), (4, 33)])
def test_prefill_attention_matches_reference(dtype, kind, group, tokens):
    index = make_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=tokens, dyn_len=tokens + 5)
    got, expected = run_both(index, rule_for(kind, index), query, dyn_k, dyn_v)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("tokens", [1, 7])
def test_padding_masks_keys_and_query_tokens(tokens):
    """Left padding: row 0 has 4 padded dynamic tokens; padded query tokens do not vote."""
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=tokens, dyn_len=12)
    dyn_len = dyn_k.shape[2]
    valid = torch.ones(2, dyn_len, dtype=torch.bool, device=DEVICE)
    valid[0, :4] = False
    causal = torch.ones(tokens, dyn_len, dtype=torch.bool, device=DEVICE).tril(dyn_len - tokens)
    mask = (causal[None] & valid[:, None, :])[:, None]  # [B, 1, T, Ld]
    got, expected = run_both(index, rule_for("budget", index), query, dyn_k, dyn_v, mask=mask, splits=2)
    real = valid[:, dyn_len - tokens :]  # outputs of padding query tokens are not used
    assert_close(got[real], expected[real], torch.float32)


def test_kernel_path_through_the_layer_counts_what_it_reads(monkeypatch):
    """`attend` dispatches to the kernels when asked to, and stats agree with the reference."""
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if DEVICE == "cpu" else "auto")
    index = make_index()
    rule = rule_for("budget", index)
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=5)
    layer = SqueezedLayer(index, rule, fixed_tokens=1000)
    keys, values = layer.update(dyn_k, dyn_v)
    assert kernels.supports(index, query) is None
    layer.attend(None, query, keys, values, None, 0.125)
    expected = (index.counts[None] * reference_keep(query, index, rule, 0.125)).sum()
    assert int(layer.kernel_keys.sum()) == int(expected)
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "0")
    assert kernels.supports(index, query) == "HF_SQUEEZE_KERNELS=0"


def test_forks_share_the_kernel_view_and_match_the_reference(llama, context, monkeypatch):
    """Through the model: the kernel path gives the reference's logits, and the device view of the
    index is built once per cache, not once per request."""
    from hf_squeeze import SqueezedCache, SqueezeConfig

    model = copy.deepcopy(llama).to(DEVICE)  # the session fixture stays on the CPU for the other tests
    question = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = SqueezedCache.from_context(model, context.to(DEVICE), SqueezeConfig(keep=0.3), progress=False)
    outputs = {}
    for mode in ("0", "1" if DEVICE == "cpu" else "auto"):
        monkeypatch.setenv("HF_SQUEEZE_KERNELS", mode)
        with torch.no_grad():
            outputs[mode] = model(question[None], **cache_kwargs(model, cache.fork())).logits
    views = cache.layers[0].kernel_views
    assert len(views) == 1
    view = next(iter(views.values()))
    with torch.no_grad():
        model(question[None], **cache_kwargs(model, cache.fork()))
    assert len(views) == 1 and next(iter(cache.fork().layers[0].kernel_views.values())) is view
    torch.testing.assert_close(outputs["0"], outputs["1" if DEVICE == "cpu" else "auto"], atol=1e-4, rtol=1e-4)
