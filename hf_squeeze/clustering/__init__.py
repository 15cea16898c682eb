"""Spherical K-means over many heads at once (CPU or GPU).

Keys are clustered by cosine similarity: points are L2-normalised, assignment is by the largest dot
product with the normalised centroids. What the method stores afterwards (the mean of the *raw* keys
of each cluster) is computed by the caller from the labels returned here.

On a GPU the two steps of a Lloyd iteration run as Triton kernels (`clustering/kernels.py`):
assignment fused with its argmax (no similarity matrix in memory), and per-cluster sums in a fixed
order (reproducible). Elsewhere they run in plain torch (`clustering/naive.py`, the references the
kernels are tested against).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from . import naive

# On the CPU, similarity matrices are computed in slices of at most this many elements.
_SIM_CHUNK = 1 << 26
# Seeding (see `_seed`): a round adds SEED_GROWTH x the centers chosen so far, or K / SEED_MAX_ROUNDS
# if more, each picked among SEED_TRIALS candidates.
SEED_GROWTH = 0.05
SEED_TRIALS = 4
SEED_MAX_ROUNDS = 32


def _use_triton(x: torch.Tensor) -> bool:
    """Kernels on CUDA tensors; on CPU tensors only in Triton's interpreter (TRITON_INTERPRET=1 and
    HF_SQUEEZE_KERNELS=1, how they are tested without a GPU); HF_SQUEEZE_KERNELS=0 turns them off."""
    mode = os.environ.get("HF_SQUEEZE_KERNELS", "auto")
    if mode == "0":
        return False
    if x.device.type != "cuda" and not (mode == "1" and os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _assign(x, centers):
    if _use_triton(x):
        from .kernels import assign

        return assign(x, centers.to(x.dtype).contiguous())
    return naive.assign(x, centers.to(x.dtype))


def _counts(labels: torch.Tensor, k: int) -> torch.Tensor:
    counts = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones_like(labels))


def _cluster_sums(x, labels, counts):
    if _use_triton(x):
        from .kernels import cluster_sums

        order = labels.argsort(dim=1, stable=True)
        offsets = F.pad(counts.cumsum(1), (1, 0))
        return cluster_sums(x, order, offsets)
    return naive.cluster_sums(x, labels, counts.shape[1])


def _gains(x, candidates, dist):
    if _use_triton(x):
        from .kernels import seeding_gains

        return seeding_gains(x, candidates.contiguous(), dist)
    return naive.seeding_gains(x, candidates, dist)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed integers arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (multiplications wrap around, as unsigned ones would)."""
    x = (x ^ _shift(x, 30)) * _MIX1
    x = (x ^ _shift(x, 27)) * _MIX2
    return x ^ _shift(x, 31)


def uniform(seeds: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    """[H, n] float32 uniform in [2^-25, 1] (24 random bits, centred): counter-based random numbers,
    row h a function of seeds[h], `stream` and the column only.

    K-means draws its random numbers this way rather than from a torch.Generator so that a head's
    clusters do not depend on which other heads share its batch (how layers are grouped, and so on
    which GPUs a model's layers sit): every head gets the same clusters however the work is split.
    """
    counter = torch.arange(n, device=seeds.device, dtype=torch.int64) + stream * (1 << 40)
    x = _mix(_mix(seeds[:, None] * _GOLDEN) + counter * _GOLDEN)
    return (_shift(x, 40).float() + 0.5) / float(1 << 24)


def head_seeds(heads: int, seed: int = 0, device=None) -> torch.Tensor:
    """The default per-head seeds of `kmeans`: seed * 2^20 + head (independent streams per head)."""
    return torch.arange(heads, dtype=torch.int64, device=device) + seed * (1 << 20)


def _seed(x: torch.Tensor, k: int, seeds: torch.Tensor) -> torch.Tensor:
    """Greedy k-means++ seeding in rounds, batched over heads.

    Greedy k-means++ (what scikit-learn does) adds one center at a time: it draws a few candidates
    with probability proportional to the squared distance to the nearest center so far (for unit
    vectors, 2 - 2 cos) and keeps the one that lowers the potential most. That is K sequential
    steps, each a pass over all points: far too slow at K = 6,500 per head. Here each round adds
    m centers at once: it draws `SEED_TRIALS` x m candidates without replacement from the same
    distribution (Gumbel top-k), scores each by how much it alone would lower the potential, and
    keeps the best m. A round adds the larger of K / `SEED_MAX_ROUNDS` and `SEED_GROWTH` x (centers
    so far): about 30 rounds at any K, and the whole seeding costs about SEED_TRIALS + 1
    assignment passes. The greedy choice is what matters: plain (non-greedy) k-means++ seeding
    ends no better than random seeds against scikit-learn's objective, these rounds close to it
    (BENCHMARKS.md, benchmarks/kmeans_quality.py).
    """
    heads, n, dim = x.shape
    rows = torch.arange(heads, device=x.device)[:, None]
    centers = torch.empty(heads, k, dim, dtype=x.dtype, device=x.device)
    first = (uniform(seeds, 0, 1) * n).long().clamp_max_(n - 1)
    centers[:, :1] = x[rows, first]
    _, sim = _assign(x, centers[:, :1])
    dist = (1.0 - sim).clamp_min_(0.0)
    have, round_ = 1, 0
    while have < k:
        m = min(k - have, max(1, int(have * SEED_GROWTH), -(-k // SEED_MAX_ROUNDS)))
        # Gumbel top-k: the largest dist / Exp(1) are a weighted draw without replacement.
        round_ += 1
        noise = uniform(seeds, round_, n).neg_().log1p_().neg_()  # Exp(1): > 0 (inf at worst: never picked)
        picks = (dist / noise).topk(min(n, m * SEED_TRIALS), dim=1).indices
        candidates = x[rows, picks]
        best = _gains(x, candidates, dist).topk(m, dim=1).indices
        centers[:, have : have + m] = candidates[rows, best]
        _, sim = _assign(x, centers[:, have : have + m])
        dist = torch.minimum(dist, (1.0 - sim).clamp_min_(0.0))
        have += m
    return centers


def _repair_empty(x, centers, counts, best) -> None:
    """Move every empty cluster onto a point that its current cluster fits worst (distinct points)."""
    empty = counts == 0
    most = int(empty.sum(1).max())
    if most == 0:
        return
    worst = best.topk(most, dim=1, largest=False).indices  # [H, most]
    head, cluster = empty.nonzero(as_tuple=True)
    rank = (empty.cumsum(1) - 1)[head, cluster]  # the r-th empty cluster of a head takes its r-th worst point
    centers[head, cluster] = x[head, worst[head, rank]].to(centers.dtype)


def kmeans(points: torch.Tensor, k: int, iters: int, seed: int | torch.Tensor = 0) -> torch.Tensor:
    """Cluster `points` [H, N, D] into `k` clusters per head by cosine similarity.

    Returns the labels [H, N] (int64). Seeding is k-means++ in rounds (`_seed`); clusters that go
    empty are moved onto the worst-fitting points. `seed`: an int (head h draws from stream
    `head_seeds(H, seed)[h]`) or one int64 seed per head. Each head's result depends on its own
    points and seed only, not on the heads batched with it, and is reproducible on a given device. On a GPU, half-precision points are clustered in bfloat16 (sums in float32); elsewhere
    in float32.
    """
    if points.dim() != 3:
        raise ValueError(f"kmeans expects points of shape [heads, n, dim], got {tuple(points.shape)}")
    heads, n, _ = points.shape
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= n, got k={k} for n={n} points")
    half = points.dtype in (torch.float16, torch.bfloat16) and points.device.type == "cuda" and _use_triton(points)
    x = torch.empty(points.shape, dtype=torch.bfloat16 if half else torch.float32, device=points.device)
    step = max(1, _SIM_CHUNK // (n * points.shape[2]))  # normalise in slices: no float32 copy of all points
    for h in range(0, heads, step):
        x[h : h + step] = F.normalize(points[h : h + step].float(), dim=-1)
    if isinstance(seed, torch.Tensor):
        if seed.shape != (heads,):
            raise ValueError(f"kmeans got {tuple(seed.shape)} seeds for {heads} heads: give one per head, or an int")
        seeds = seed.to(device=x.device, dtype=torch.int64)
    else:
        seeds = head_seeds(heads, seed, x.device)
    centers = _seed(x, k, seeds)
    labels, best = _assign(x, centers)
    for _ in range(iters):
        counts = _counts(labels, k)
        centers = F.normalize(_cluster_sums(x, labels, counts), dim=-1)
        _repair_empty(x, centers, counts, best)
        new_labels, best = _assign(x, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


def cosine_objective(points: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum over points of (1 - cosine to the normalised mean of its cluster), per head: [H]."""
    x = F.normalize(points.float(), dim=-1)
    centers = F.normalize(naive.cluster_sums(x, labels, k), dim=-1)
    return (1.0 - (x * centers.gather(1, labels[..., None].expand_as(x))).sum(-1)).sum(-1)


def cluster_sums(values: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of `values` [H, N, D] per cluster ([H, k, D] float32, in a fixed order) and counts [H, k]."""
    counts = _counts(labels, k)
    return _cluster_sums(values, labels, counts), counts


def cluster_means(values: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of `values` [H, N, D] per cluster ([H, k, D] float32, zero for empty clusters) and counts [H, k]."""
    sums, counts = cluster_sums(values, labels, k)
    return sums / counts.clamp_min(1).unsqueeze(-1), counts
