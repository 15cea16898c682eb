"""Spherical K-means over many heads at once, in plain torch (CPU or GPU).

Keys are clustered by cosine similarity: points are L2-normalised, assignment is by the largest dot
product with the normalised centroids. What the method stores afterwards (the mean of the *raw* keys
of each cluster) is computed by the caller from the labels returned here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Similarity matrices are computed in slices of at most this many elements, so that memory stays
# bounded for long contexts and many heads.
_SIM_CHUNK = 1 << 26


def _assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best center (largest cosine) of every point: labels [H, N] and their similarity [H, N]."""
    heads, n, _ = x.shape
    k = centers.shape[1]
    step = max(1, _SIM_CHUNK // max(1, heads * k))
    labels = torch.empty(heads, n, dtype=torch.long, device=x.device)
    best = torch.empty(heads, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, step):
        sim = torch.bmm(x[:, start : start + step], centers.transpose(1, 2))
        best[:, start : start + step], labels[:, start : start + step] = sim.max(-1)
    return labels, best


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding with the cosine distance, batched over heads.

    Each step draws 2 + log(k) candidates by D^2 sampling and keeps the one that lowers the
    potential most (the variant scikit-learn uses; plain k-means++ lands in poor optima far more
    often on clustered keys).
    """
    heads, n, dim = x.shape
    rows = torch.arange(heads, device=x.device)
    trials = 2 + int(math.log(k))
    centers = torch.empty(heads, k, dim, dtype=x.dtype, device=x.device)
    first = torch.randint(n, (heads,), generator=generator, device=x.device)
    centers[:, 0] = x[rows, first]
    dist = (1.0 - torch.einsum("hnd,hd->hn", x, centers[:, 0])).clamp_min_(0.0)
    for i in range(1, k):
        # A tiny floor keeps the sampling defined when every point coincides with a center.
        picks = torch.multinomial(dist + 1e-12, trials, replacement=True, generator=generator)  # [H, T]
        cand = x[rows[:, None], picks]  # [H, T, D]
        cand_dist = torch.minimum(dist[:, None], (1.0 - torch.bmm(cand, x.transpose(1, 2))).clamp_min_(0.0))
        best = cand_dist.sum(-1).argmin(-1)  # [H]
        centers[:, i] = cand[rows, best]
        dist = cand_dist[rows, best]
    return centers


def _repair_empty(x, centers, counts, best):
    """Move every empty cluster onto a point that its current cluster fits worst."""
    for h in torch.nonzero((counts == 0).any(-1)).flatten().tolist():
        empty = torch.nonzero(counts[h] == 0).flatten()
        worst = best[h].argsort()[: empty.numel()]
        centers[h, empty[: worst.numel()]] = x[h, worst]
        best[h, worst] = 1.0  # do not hand the same point to two clusters


def kmeans(points: torch.Tensor, k: int, iters: int, seed: int = 0) -> torch.Tensor:
    """Cluster `points` [H, N, D] into `k` clusters per head by cosine similarity.

    Returns the labels [H, N] (int64). Seeding is k-means++; clusters that go empty are moved onto
    the worst-fitting points; results are reproducible for a given seed and device.
    """
    if points.dim() != 3:
        raise ValueError(f"kmeans expects points of shape [heads, n, dim], got {tuple(points.shape)}")
    heads, n, _ = points.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k} for n={n} points")
    x = F.normalize(points.float(), dim=-1)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    centers = _kmeans_pp(x, k, generator)
    labels, best = _assign(x, centers)
    offset = (torch.arange(heads, device=x.device) * k).unsqueeze(1)
    for _ in range(iters):
        flat = (labels + offset).flatten()
        sums = torch.zeros(heads * k, x.shape[-1], dtype=x.dtype, device=x.device)
        sums.index_add_(0, flat, x.flatten(0, 1))
        counts = torch.bincount(flat, minlength=heads * k).view(heads, k)
        centers = F.normalize(sums.view(heads, k, -1), dim=-1)
        _repair_empty(x, centers, counts, best)
        new_labels, best = _assign(x, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def cosine_objective(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over points of (1 - cosine to the normalised mean of its cluster), per head: [H]."""
    x = F.normalize(points.float(), dim=-1)
    heads = x.shape[0]
    flat = (labels + (torch.arange(heads, device=x.device) * k).unsqueeze(1)).flatten()
    sums = torch.zeros(heads * k, x.shape[-1], dtype=x.dtype, device=x.device)
    sums.index_add_(0, flat, x.flatten(0, 1))
    centers = F.normalize(sums, dim=-1)
    return (1.0 - (x.flatten(0, 1) * centers[flat]).sum(-1)).view(heads, -1).sum(-1)


def cluster_means(values: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` [H, N, D] per cluster ([H, k, D], zero for empty clusters) and counts [H, k]."""
    heads, _, dim = values.shape
    flat = (labels + (torch.arange(heads, device=values.device) * k).unsqueeze(1)).flatten()
    sums = torch.zeros(heads * k, dim, dtype=torch.float32, device=values.device)
    sums.index_add_(0, flat, values.float().flatten(0, 1))
    counts = torch.bincount(flat, minlength=heads * k).view(heads, k)
    means = sums.view(heads, k, dim) / counts.clamp_min(1).unsqueeze(-1)
    return means, counts
