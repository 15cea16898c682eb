"""Which clusters matter: estimators of the lookup against the oracle, on real keys and queries.

For RULER samples (the tasks where the lookup loses most), the context is prefilled, its keys are
clustered as `SqueezedCache.from_context` does, and the queries of the question's tokens are
recorded in every layer. Each query token is then taken as one decode step (one selection per KV
head, shared by its query heads), and every estimator selects clusters by top-k at the same
budget, in the paper's keys-only accounting (what the lookup reads counts: centroids and any
per-cluster statistic, as keys). Measured per (layer, KV head), averaged over query tokens:
- mass: the share of the exact attention probability of the clustered keys that the kept keys hold;
- top-8: the share of each query head's 8 highest-scoring clustered keys that are kept (what a
  retrieval question needs: the few keys that carry the answer);
- error: the relative L2 error of the attention output (kept keys + sinks + window) against exact
  attention over the whole context.
The oracle keeps the keys of highest exact probability (max over the query heads) at the same budget.

Estimators (s = q . c * scale, per key of cluster j with N_j keys):
- centroid: s_j (the paper)
- gaussian: s_j + 1/2 scale^2 sum_d q_d^2 var_jd  (log of the mean of exp(q . k * scale) over the
  cluster, for keys spread around the centroid with per-channel variance var_jd; stores C x D more)
- isotropic: s_j + 1/2 scale^2 |q|^2 var_j      (one variance per cluster)
- bound: s_j + scale |q| r_j                    (r_j: largest distance of a key to its centroid: an
  upper bound on the best key's score, as in LycheeCluster's pruning)

Clusterings (`--clusterings`; only the centroid estimate is measured for the non-default ones):
cosine (the paper's spherical K-means), euclidean, query-cosine / query-euclidean (keys mapped by a
factor of the second moment of the observation window's queries), outliers-X (a share X of the
clusters are single keys: those farthest from their cluster's mean).

    PYTHONPATH=. python3 benchmarks/estimator_recall.py --model smollm2 --tokens 4096 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_squeeze import ruler
from hf_squeeze.config import SqueezeConfig
from hf_squeeze.eval.contexts import ContextCaches
from hf_squeeze.eval.models import load_model
from hf_squeeze.clustering import cluster_means, head_seeds, kmeans
from hf_squeeze.index import _layer_index, build_indices
from needle_lookup import record_queries  # this folder: the question's queries in every layer

ESTIMATORS = ("centroid", "gaussian", "isotropic", "bound", "spread")
# Selections: per KV head (each head reads `budget` of its keys), or pooled over the KV heads of a
# layer (the heads share H x budget keys, taken in decreasing estimated probability: a peaked head
# takes few, a flat one many).
POOLING = ("head", "layer")
TASKS = "niah_multikey_2,niah_multikey_3,variable_tracking,common_words_extraction,qa_1"


def query_metric(window_queries, heads):
    """Per KV head, a factor L [H, D, D] of the second moment of its window queries: Q = L L^T, so
    that (k L) . (k' L) = k^T Q k', and |(k - c) L|^2 is the mean squared error that the centroid c
    makes in the score q . k over the window's queries."""
    q = window_queries.float()  # [Hq, W, D]
    q = q.reshape(heads, -1, q.shape[-1])  # the query heads of a group together
    second = q.transpose(1, 2) @ q / q.shape[1]
    dim = second.shape[-1]
    ridge = 1e-3 * second.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(dim)
    return torch.linalg.cholesky(second + ridge)


def euclidean_kmeans(x, labels, k, iters):
    """Lloyd iterations with squared Euclidean distance, from given labels: [H, N]."""
    for _ in range(iters):
        centers, counts = cluster_means(x, labels, k)
        d = (x * x).sum(-1, keepdim=True) - 2 * x @ centers.transpose(1, 2) + (centers * centers).sum(-1)[:, None, :]
        d = d.masked_fill((counts == 0)[:, None, :], math.inf)
        new = d.argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels


def variant_index(keys, values, window_queries, config, layer, clustering):
    """One layer's index clustered another way: "query-cosine" / "query-euclidean" (keys in the metric
    of the window's queries), "euclidean" (raw keys, squared distance), "outliers-X" (a fraction X
    of the clusters are single keys: those farthest from their cluster's mean after K-means with
    the rest)."""
    heads = keys.shape[0]
    clustered = slice(config.sinks, keys.shape[1] - config.window)
    raw = keys[:, clustered].float()
    x = raw @ query_metric(window_queries, heads) if clustering.startswith("query") else raw
    k = config.num_clusters(x.shape[1])
    singles = round(float(clustering.split("-")[1]) * k) if clustering.startswith("outliers") else 0
    seeds = head_seeds(heads * 1000, config.seed)[layer * heads:(layer + 1) * heads]
    labels = kmeans(x, k - singles, config.kmeans_iters, seeds)
    if clustering.endswith("euclidean"):
        labels = euclidean_kmeans(x, labels, k, config.kmeans_iters)
    if singles:
        centroids, _ = cluster_means(raw, labels, k - singles)
        residual = (raw - centroids.gather(1, labels[..., None].expand(-1, -1, raw.shape[-1]))).norm(dim=-1)
        far = residual.topk(singles, dim=1).indices
        labels = labels.scatter(1, far, torch.arange(k - singles, k).expand(heads, -1))
    centroids, counts = cluster_means(raw, labels, k)
    return _layer_index(keys, values, labels, centroids, counts, None, config)


def cluster_stats(index):
    """Per-cluster variance per channel [H, C, D], its mean over channels [H, C], and radius [H, C]."""
    heads, n, dim = index.keys.shape
    clusters = index.counts.shape[1]
    labels = torch.stack([torch.repeat_interleave(torch.arange(clusters), c) for c in index.counts.cpu()])
    keys = index.keys.float()
    diff = keys - index.centroids.gather(1, labels[..., None].expand(-1, -1, dim))
    var = torch.zeros(heads, clusters, dim)
    for h in range(heads):
        var[h].index_add_(0, labels[h], diff[h] ** 2)
    var = var / index.counts.clamp_min(1)[..., None]
    radius = torch.zeros(heads, clusters).scatter_reduce_(1, labels, diff.norm(dim=-1), "amax")
    return var, var.mean(-1), radius


def estimate(name, q, index, stats, scale):
    """Log-score of one key of each cluster, per query: [H, G, T, C]."""
    var, iso, radius = stats
    s = torch.einsum("hgtd,hcd->hgtc", q, index.centroids.float()) * scale
    if name == "gaussian":
        s = s + 0.5 * scale**2 * torch.einsum("hgtd,hcd->hgtc", q**2, var)
    elif name == "isotropic":
        s = s + 0.5 * scale**2 * (q**2).sum(-1, keepdim=True) * iso[:, None, None, :]
    elif name == "bound":
        s = s + scale * q.norm(dim=-1, keepdim=True) * radius[:, None, None, :]
    elif name == "spread":  # one standard deviation of the scores of a cluster's keys along q, isotropic
        s = s + scale * q.norm(dim=-1, keepdim=True) * iso.sqrt()[:, None, None, :]
    return s.masked_fill((index.counts == 0)[:, None, None, :], -math.inf)


def storage(name: str, ratio: float, dim: int) -> float:
    """What the lookup reads per step besides the kept keys, as a fraction of the context's K+V."""
    centroids = ratio / 2  # C x D floats against N x D keys and N x D values
    return centroids * {"centroid": 1, "gaussian": 2, "isotropic": 1 + 1 / dim, "bound": 1 + 1 / dim,
                        "spread": 1 + 1 / dim}[name]


def select_clusters(score, counts, budget, pooling="head"):
    """Top-k clusters per token by estimated probability (max over the query heads of a group) until
    `budget` keys per KV head: [H, T, C] bool. Pooled: the KV heads of the layer share H x budget."""
    logp = score - torch.logsumexp(score + counts.float().log()[:, None, None, :], -1, keepdim=True)
    agg = logp.amax(1)  # [H, T, C]
    heads, tokens, clusters = agg.shape
    sizes = counts[:, None, :].expand_as(agg)
    if pooling == "layer":
        agg, sizes, budget = agg.transpose(0, 1).reshape(1, tokens, heads * clusters), \
            sizes.transpose(0, 1).reshape(1, tokens, heads * clusters), budget * heads
    order = agg.sort(dim=-1, descending=True, stable=True).indices
    sorted_sizes = sizes.gather(-1, order)
    keep_sorted = ((sorted_sizes.cumsum(-1) - sorted_sizes) < budget) & (sorted_sizes > 0)
    kept = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    if pooling == "layer":
        kept = kept.view(tokens, heads, clusters).transpose(0, 1)
    return kept


def measure(q, scale, index, kept_keys):
    """Mass share and output error per head, averaged over tokens. kept_keys [H, T, Nc] bool."""
    keys, values = index.keys.float(), index.values.float()
    dense_k, dense_v = index.dense_keys.float(), index.dense_values.float()
    s = torch.einsum("hgtd,hnd->hgtn", q, keys) * scale
    sd = torch.einsum("hgtd,hnd->hgtn", q, dense_k) * scale
    p = torch.softmax(torch.cat([s, sd], -1), -1)
    p_clustered = p[..., : keys.shape[1]]
    mask = kept_keys[:, None]  # shared by the query heads
    mass = (p_clustered * mask).sum(-1) / p_clustered.sum(-1).clamp_min(1e-30)
    exact = p[..., : keys.shape[1]] @ values[:, None] + p[..., keys.shape[1]:] @ dense_v[:, None]
    s_kept = s.masked_fill(~mask, -math.inf)
    p_kept = torch.softmax(torch.cat([s_kept, sd], -1), -1)
    approx = p_kept[..., : keys.shape[1]] @ values[:, None] + p_kept[..., keys.shape[1]:] @ dense_v[:, None]
    error = (approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)
    # the 8 clustered keys of highest exact score of each query head: how many are kept
    top = s.topk(min(8, s.shape[-1]), dim=-1).indices
    recall = mask.expand_as(s).gather(-1, top).float().mean(-1)
    return mass.mean((1, 2)), error.mean((1, 2)), recall.mean((1, 2))  # [H]


def measure_with_rest(q, scale, index, kept_clusters):
    """Output error when the unselected clusters are estimated instead of dropped: exact attention
    over the kept keys, plus N_j exp(q . c_j) times the cluster's mean value for every other cluster."""
    keys, values = index.keys.float(), index.values.float()
    dense_k, dense_v = index.dense_keys.float(), index.dense_values.float()
    heads, clusters = index.counts.shape
    labels = torch.stack([torch.repeat_interleave(torch.arange(clusters), c) for c in index.counts.cpu()])
    vmean = torch.zeros(heads, clusters, values.shape[-1])
    for h in range(heads):
        vmean[h].index_add_(0, labels[h], values[h])
    vmean = vmean / index.counts.clamp_min(1)[..., None]
    s = torch.einsum("hgtd,hnd->hgtn", q, keys) * scale
    sd = torch.einsum("hgtd,hnd->hgtn", q, dense_k) * scale
    sc = torch.einsum("hgtd,hcd->hgtc", q, index.centroids.float()) * scale + index.counts.float().log()[:, None, None, :]
    kept_keys = keys_of(kept_clusters, index)[:, None]
    rest = ~kept_clusters[:, None] & (index.counts > 0)[:, None, None, :]
    logits = torch.cat([s.masked_fill(~kept_keys, -math.inf), sd, sc.masked_fill(~rest, -math.inf)], -1)
    p = torch.softmax(logits, -1)
    n = keys.shape[1]
    approx = p[..., :n] @ values[:, None] + p[..., n:n + sd.shape[-1]] @ dense_v[:, None] + p[..., n + sd.shape[-1]:] @ vmean[:, None]
    p_exact = torch.softmax(torch.cat([s, sd], -1), -1)
    exact = p_exact[..., :n] @ values[:, None] + p_exact[..., n:] @ dense_v[:, None]
    return ((approx - exact).norm(dim=-1) / exact.norm(dim=-1).clamp_min(1e-30)).mean((1, 2))


def refine(q, scale, index, candidates, budget):
    """Among the keys of the candidate clusters, the `budget` of highest exact score (max over the
    query heads): [H, T, Nc] bool."""
    s = torch.einsum("hgtd,hnd->hgtn", q, index.keys.float()).amax(1) * scale
    s = s.masked_fill(~keys_of(candidates, index), -math.inf)
    top = s.topk(min(budget, s.shape[-1]), dim=-1).indices
    return torch.zeros_like(s, dtype=torch.bool).scatter(-1, top, True) & (s > -math.inf)


def oracle_keys(q, scale, index, budget):
    s = torch.einsum("hgtd,hnd->hgtn", q, index.keys.float()) * scale
    agg = s.amax(1)  # [H, T, Nc]: the query heads of a group share the selection
    top = agg.topk(min(budget, agg.shape[-1]), dim=-1).indices
    return torch.zeros_like(agg, dtype=torch.bool).scatter(-1, top, True)


def keys_of(clusters, index):
    """Cluster selection [H, T, C] -> key selection [H, T, Nc] (keys are sorted by cluster)."""
    return torch.stack([clusters[h].repeat_interleave(index.counts[h].cpu(), dim=-1) for h in range(clusters.shape[0])])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--contexts", type=int, default=2, help="contexts per task")
    parser.add_argument("--budgets", default="0.125,0.325")
    parser.add_argument("--centroid-ratio", type=float, default=0.05)
    parser.add_argument("--clusterings", default="cosine", help="cosine (the paper's), query-cosine, query-euclidean, euclidean, outliers-FRACTION")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    config = SqueezeConfig(centroid_ratio=args.centroid_ratio)
    samples = ruler.make_samples(tokenizer, ruler.task_names(args.tasks), args.tokens, args.contexts, 1)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = {}  # (estimator, budget) -> list of per-(sample, layer, head) (mass, error)
    for sample in tqdm(samples, desc="samples"):
        context, questions = ruler.prompt_ids(tokenizer, sample)
        caches = ContextCaches(model, context, config)
        indices = build_indices(caches.keys, caches.values, config)
        recorded = record_queries(model, tokenizer, caches, context, questions[0])
        for clustering in args.clusterings.split(","):
            if clustering != "cosine":
                indices = [variant_index(k, v, wq, config, i, clustering)
                           for i, (k, v, wq) in enumerate(zip(caches.keys, caches.values, caches.queries))]
            measure_layers(args, rows, indices, recorded, budgets, clustering)
    report(args, rows, samples)


def measure_layers(args, rows, indices, recorded, budgets, clustering):
    tag = "" if clustering == "cosine" else f" [{clustering}]"
    if True:
        for layer, (index, (q, scale, _)) in enumerate(zip(indices, recorded)):
            q = q[0].float()  # [H, G, T, D]
            stats = cluster_stats(index)
            n, dim = index.keys.shape[1], index.keys.shape[2]
            for budget in budgets:
                keys_budget = max(1, round(budget * n))
                mass, err, top8 = measure(q, scale, index, oracle_keys(q, scale, index, keys_budget))
                if not tag:
                    rows.setdefault(("oracle", budget), []).append((mass, err, top8))
                for name in (ESTIMATORS if not tag else ("centroid",)):
                    keep = budget - storage(name, args.centroid_ratio, dim)
                    score = estimate(name, q, index, stats, scale)
                    for pooling in POOLING:
                        chosen = select_clusters(score, index.counts, max(1, round(keep * n)), pooling)
                        mass, err, top8 = measure(q, scale, index, keys_of(chosen, index))
                        label = (name if pooling == "head" else f"{name}, pooled") + tag
                        rows.setdefault((label, budget), []).append((mass, err, top8))
                # the rest estimated from the clusters' mean values (stores C x D more)
                keep = budget - 2 * storage("centroid", args.centroid_ratio, dim)
                chosen = select_clusters(estimate("centroid", q, index, stats, scale), index.counts, max(1, round(keep * n)))
                mass, _, top8 = measure(q, scale, index, keys_of(chosen, index))
                rows.setdefault(("centroid + rest estimated" + tag, budget), []).append(
                    (mass, measure_with_rest(q, scale, index, chosen), top8))
                # candidates twice the final keys; keys of candidates read (K), values of the kept (V)
                final = 2 * (budget - storage("centroid", args.centroid_ratio, dim)) / 3
                candidates = select_clusters(estimate("centroid", q, index, stats, scale), index.counts, max(1, round(2 * final * n)))
                mass, err, top8 = measure(q, scale, index, refine(q, scale, index, candidates, max(1, round(final * n))))
                rows.setdefault(("centroid, refined to keys" + tag, budget), []).append((mass, err, top8))


def report(args, rows, samples):
    table = []
    for (name, budget), values in rows.items():
        mass, err, top8 = (torch.cat([v[i] for v in values]) for i in range(3))
        table.append(dict(estimator=name, budget=budget, mass=float(mass.mean()), mass_p10=float(mass.quantile(0.1)),
                          error=float(err.mean()), error_p90=float(err.quantile(0.9)), top8=float(top8.mean()),
                          top8_p10=float(top8.quantile(0.1)), heads=mass.numel()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"estimator_recall_{args.model}_{args.tokens}.json").write_text(json.dumps(table, indent=1))
    print(f"\n{args.model}, {args.tokens} tokens, {len(samples)} samples ({args.tasks}); per (layer, KV head), mean over "
          "question tokens")
    print("| estimator | budget | mass kept (mean) | mass kept (p10) | top-8 keys kept (mean) | top-8 kept (p10) | "
          "output error (mean) | output error (p90) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in sorted(table, key=lambda r: (r["budget"], r["estimator"] != "oracle", -r["mass"])):
        print(f"| {r['estimator']} | {r['budget']} | {r['mass']:.3f} | {r['mass_p10']:.3f} | {r['top8']:.3f} | "
              f"{r['top8_p10']:.3f} | {r['error']:.3f} | {r['error_p90']:.3f} |")


if __name__ == "__main__":
    main()
