"""Offline index of a fixed context: clusters, cluster-sorted K/V, the optional tree, calibration.

Attention does not depend on the order of keys once RoPE is applied, so each head's clustered keys
(and their values) are stored permuted so that every cluster is one contiguous range, described by
CSR `offsets`. Selecting clusters then yields key ranges: no per-token mask over the context.
With the two-level tree, fine clusters are ordered by their coarse parent, so a coarse cluster is
also one contiguous range of fine clusters (`l1_offsets`) and of keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .clustering import cluster_means, kmeans
from .config import SqueezeConfig
from .lookup import SelectionRule, score_flat, score_level1, score_level2, select

# Heads of all layers are clustered together in groups of at most this many points x clusters,
# which bounds the similarity matrices K-means allocates.
_KMEANS_BATCH_ELEMENTS = 1 << 27
# Calibration pools this many (query, cluster) pairs at most; beyond that a random subset is used.
_CALIBRATION_PAIRS = 1 << 24


@dataclass(frozen=True)
class LayerIndex:
    """The immutable fixed part of one layer. Shared by every fork and deep copy of a cache."""

    keys: torch.Tensor  # [H, Nc, D] clustered keys, sorted by cluster (model dtype)
    values: torch.Tensor  # [H, Nc, D]
    centroids: torch.Tensor  # [H, C, D] float32 mean of the raw keys of each cluster
    counts: torch.Tensor  # [H, C] int64 keys per cluster
    offsets: torch.Tensor  # [H, C + 1] int64 first key of each cluster
    dense_keys: torch.Tensor  # [H, S + W, D] attention sinks + observation window, always attended
    dense_values: torch.Tensor  # [H, S + W, D]
    l1_centroids: torch.Tensor | None = None  # [H, C1, D] float32
    l1_counts: torch.Tensor | None = None  # [H, C1] int64 keys under each coarse cluster
    l1_offsets: torch.Tensor | None = None  # [H, C1 + 1] int64 first fine cluster of each

    def __deepcopy__(self, memo):
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def clustered_tokens(self) -> int:
        return self.keys.shape[1]

    def to(self, device) -> "LayerIndex":
        return LayerIndex(**{k: v.to(device) for k, v in self.tensors().items()})


def _cluster_all(points: list[torch.Tensor], k: int, iters: int, seed: int) -> list[torch.Tensor]:
    """K-means for a list of [H, N, D] tensors of equal shape, batching heads across layers."""
    heads, n, _ = points[0].shape
    per_group = max(1, _KMEANS_BATCH_ELEMENTS // max(1, heads * n * k))
    labels = []
    for start in range(0, len(points), per_group):
        group = torch.cat(points[start : start + per_group])
        labels.extend(kmeans(group, k, iters, seed).split(heads))
    return labels


def _sort_by_cluster(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation [H, N] that makes each cluster contiguous, and CSR offsets [H, k + 1]."""
    order = labels.argsort(dim=-1, stable=True)
    counts = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    offsets = torch.cat([counts.new_zeros(labels.shape[0], 1), counts.cumsum(-1)], dim=1)
    return order, offsets


def build_indices(keys: list[torch.Tensor], values: list[torch.Tensor], config: SqueezeConfig) -> list[LayerIndex]:
    """Build the index of every layer from its context keys/values [H, N, D] (post-RoPE keys)."""
    clustered = slice(config.sinks, keys[0].shape[1] - config.window)
    k = config.num_clusters(clustered.stop - clustered.start)
    labels = _cluster_all([key[:, clustered] for key in keys], k, config.kmeans_iters, config.seed)
    indices = []
    tree_inputs = []
    for key, value, label in zip(keys, values, labels):
        centroids, counts = cluster_means(key[:, clustered], label, k)
        tree_inputs.append(centroids)
        indices.append((key, value, label, centroids, counts))
    if config.hierarchical:
        k1 = config.num_l1_clusters(clustered.stop - clustered.start)
        parents = _cluster_all(tree_inputs, k1, config.kmeans_iters, config.seed + 1)
    else:
        parents = [None] * len(indices)
    return [_layer_index(*parts, parent, config) for parts, parent in zip(indices, parents)]


def _layer_index(key, value, label, centroids, counts, parent, config) -> LayerIndex:
    clustered = slice(config.sinks, key.shape[1] - config.window)
    dense = torch.cat([torch.arange(config.sinks), torch.arange(clustered.stop, key.shape[1])]).to(key.device)
    heads = torch.arange(key.shape[0], device=key.device)[:, None]
    extra = {}
    if parent is not None:
        k1 = config.num_l1_clusters(clustered.stop - clustered.start)
        # A coarse centroid is the mean of the raw keys under it: the count-weighted mean of its children.
        key_sums = torch.zeros(key.shape[0], k1, key.shape[2], device=key.device)
        key_sums.scatter_add_(1, parent.unsqueeze(-1).expand_as(centroids), centroids * counts.unsqueeze(-1))
        l1_counts = torch.zeros(key.shape[0], k1, dtype=torch.long, device=key.device)
        l1_counts.scatter_add_(1, parent, counts)
        # Renumber fine clusters so that the children of each coarse cluster are contiguous.
        fine_order, l1_offsets = _sort_by_cluster(parent, k1)
        rank = torch.empty_like(fine_order)
        rank[heads, fine_order] = torch.arange(fine_order.shape[1], device=key.device).expand_as(fine_order)
        label = rank.gather(1, label)
        centroids, counts = centroids[heads, fine_order], counts[heads, fine_order]
        l1_centroids = key_sums / l1_counts.clamp_min(1).unsqueeze(-1)
        extra = dict(l1_centroids=l1_centroids, l1_counts=l1_counts, l1_offsets=l1_offsets)
    order, offsets = _sort_by_cluster(label, centroids.shape[1])
    return LayerIndex(
        keys=key[:, clustered][heads, order].contiguous(),
        values=value[:, clustered][heads, order].contiguous(),
        centroids=centroids.contiguous(),
        counts=counts,
        offsets=offsets,
        dense_keys=key[:, dense].contiguous(),
        dense_values=value[:, dense].contiguous(),
        **extra,
    )


def _weighted_quantile(logp: torch.Tensor, weight: torch.Tensor, total: float, keep: float, seed: int) -> float:
    """Largest t such that the weight of {logp >= t} reaches keep * total (weights: keys per cluster)."""
    usable = weight > 0
    logp, weight = logp[usable], weight[usable].float()
    if logp.numel() > _CALIBRATION_PAIRS:
        generator = torch.Generator(device=logp.device).manual_seed(seed)
        pick = torch.randperm(logp.numel(), generator=generator, device=logp.device)[:_CALIBRATION_PAIRS]
        total = total * _CALIBRATION_PAIRS / logp.numel()
        logp, weight = logp[pick], weight[pick]
    order = logp.argsort(descending=True)
    reached = weight[order].cumsum(0) >= keep * total
    if not bool(reached.any()):
        return float(logp.min())
    return float(logp[order][int(reached.nonzero()[0])])


def calibrate(
    indices: list[LayerIndex], window_queries: list[torch.Tensor], scalings: list[float], config: SqueezeConfig
) -> list[SelectionRule]:
    """Resolve the selection rule of every layer for this context.

    For "threshold", thresholds (one per layer, or one for all layers with threshold_scope="global")
    chosen so that over the observation-window queries and heads, a fraction `keep` of the
    clustered keys has an estimated probability above the threshold; likewise `l1_keep` for the
    coarse level. Each window query is treated as one decode step (it makes its own selection),
    which is how thresholds are used when generating.
    window_queries: per layer [Hq, W, D]; scalings: per layer, the attention scale.
    """
    clustered = indices[0].clustered_tokens
    if config.keep >= 1.0:
        return [SelectionRule(keep_all=True)] * len(indices)
    if config.selection == "topk":
        budget = max(1, round(config.keep * clustered))
        l1_budget = max(1, round(config.l1_keep * clustered)) if config.hierarchical else None
        return [SelectionRule(budget=budget, l1_budget=l1_budget)] * len(indices)

    def as_steps(q, index):  # [Hq, W, D] -> [W, H, G, 1, D]: every window token is one decode step
        heads = index.keys.shape[0]
        return q.view(heads, -1, q.shape[1], q.shape[2]).permute(2, 0, 1, 3).unsqueeze(3)

    steps = [as_steps(q, index) for q, index in zip(window_queries, indices)]
    totals = [s.shape[0] * s.shape[1] * clustered for s in steps]  # (queries x heads) x keys per layer

    l1_thresholds = [None] * len(indices)
    if config.hierarchical:
        level1 = [score_level1(q, index, scaling, None) for q, index, scaling in zip(steps, indices, scalings)]
        l1_thresholds = _thresholds([c for c, _ in level1], totals, config.l1_keep, config)
        cands = []
        for q, index, scaling, (c1, s1), t1 in zip(steps, indices, scalings, level1, l1_thresholds):
            l1_keep = select(c1.logp, c1.counts, t1, None)
            cands.append(score_level2(q, index, scaling, None, l1_keep, s1))
    else:
        cands = [score_flat(q, index, scaling, None)[0] for q, index, scaling in zip(steps, indices, scalings)]
    thresholds = _thresholds(cands, totals, config.keep, config)
    return [SelectionRule(threshold=t, l1_threshold=t1) for t, t1 in zip(thresholds, l1_thresholds)]


def _thresholds(cands, totals: list[int], keep: float, config: SqueezeConfig) -> list[float]:
    if config.threshold_scope == "global":
        logp = torch.cat([c.logp.flatten() for c in cands])
        counts = torch.cat([c.counts.flatten() for c in cands])
        return [_weighted_quantile(logp, counts, sum(totals), keep, config.seed)] * len(cands)
    return [
        _weighted_quantile(c.logp.flatten(), c.counts.flatten(), total, keep, config.seed)
        for c, total in zip(cands, totals)
    ]
