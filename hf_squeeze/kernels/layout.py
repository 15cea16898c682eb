"""The device-side view of a layer index that the Triton kernels read.

Derived once per layer (and device) from a `LayerIndex`, never saved: the cluster-sorted K/V are
shared, not copied; what is added is small (the centroids in the keys' dtype, log counts, int32
offsets). Because the keys are sorted by cluster, a selection is a list of key ranges, built on
the device by a cumulative sum over the clusters: no per-key index list and no host
synchronisation. Ranges are cut into *pieces* of at most `PIECE_ROWS` keys, so that the attention
kernels can stream several pieces per step with fixed-size tiles whatever the cluster sizes.

A two-level index adds its coarse level: coarse centroids, and for each coarse cluster its keys
(for the selection) and its contiguous range of fine clusters (`coarse_first`, `coarse_sizes`), so that
the kept coarse clusters become a list of fine centroids to score, the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Keys per piece at most, for the views built from now on (each view keeps its own). Clusters hold
# ~20 keys (SmolLM2: 10/50/90/99% 12/19/29/40), so pieces of 32 left ~41% of a decode tile's rows
# empty, of 8 ~15% (H200, keep 0.1, 128K: decode 68.5 -> 64.4 us, pinned 71.2 -> 67.2; BENCHMARKS.md).
PIECE_ROWS = 8


@dataclass(frozen=True)
class KernelIndex:
    keys: torch.Tensor  # [H, Nc, D] cluster-sorted keys (shared with the LayerIndex)
    values: torch.Tensor  # [H, Nc, D]
    dense_keys: torch.Tensor  # [H, S + W, D] sinks + observation window
    dense_values: torch.Tensor  # [H, S + W, D]
    centroids: torch.Tensor  # [H, C, D] in the keys' dtype: centroids are read like keys
    log_counts: torch.Tensor  # [H, C] float32 log of keys per cluster, -inf if empty
    counts: torch.Tensor  # [H, C] int32
    starts: torch.Tensor  # [H, C] int32 first row of each cluster
    largest: int  # most keys in one cluster
    pieces: int  # most pieces one head's clusters cut into (sizes the selection lists)
    piece_rows: int  # keys per piece at most (PIECE_ROWS when the view was built)
    # Coarse level of a two-level index (None for a flat one).
    coarse_centroids: torch.Tensor | None = None  # [H, C1, D] in the keys' dtype
    coarse_log_counts: torch.Tensor | None = None  # [H, C1] float32 log of keys under each, -inf if none
    coarse_counts: torch.Tensor | None = None  # [H, C1] int32 keys under each coarse cluster
    coarse_first: torch.Tensor | None = None  # [H, C1] int32 its first fine cluster
    coarse_sizes: torch.Tensor | None = None  # [H, C1] int32 its fine clusters
    coarse_largest: int = 0  # most fine clusters under one coarse cluster
    coarse_keys_largest: int = 0  # most keys under one coarse cluster
    # Most fine clusters a coarse selection with budget `coarse_bound_budget` can list (sizes the
    # fine buffers and the selection's registers; without it they are sized for all C).
    coarse_bound_budget: int | None = None
    coarse_bound: int = 0
    # Per selection rule, the handle of compiled steps over this view (`kernels.ops.Handle`).
    op_handles: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def heads(self) -> int:
        return self.keys.shape[0]

    @property
    def clusters(self) -> int:
        return self.counts.shape[1]

    @property
    def clustered_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def hierarchical(self) -> bool:
        return self.coarse_centroids is not None

    @property
    def coarse_clusters(self) -> int:
        return 0 if self.coarse_counts is None else self.coarse_counts.shape[1]

    def candidates(self, coarse_budget: int | None) -> int:
        """Room for the fine clusters a coarse selection lists: a bound for the budget this view
        was built for, else all of them (a threshold may keep every coarse cluster)."""
        if coarse_budget is not None and coarse_budget == self.coarse_bound_budget:
            return max(1, self.coarse_bound)
        return self.clusters


def candidate_bound(coarse_counts: torch.Tensor, coarse_sizes: torch.Tensor, coarse_budget: int) -> int:
    """Most fine clusters under the coarse clusters a budget selection can keep, over all queries.

    A budget selection keeps coarse clusters holding fewer than `coarse_budget` keys, plus the one that
    crosses it. The most fine clusters such a set can hold is at most the greedy answer of the
    fractional knapsack (coarse clusters by fine clusters per key, until `coarse_budget` keys, the
    crossing one included), plus the crossing cluster's: at most the largest. One host sync."""
    counts, sizes = coarse_counts.long(), coarse_sizes.long() * (coarse_counts > 0)
    ratio = torch.where(counts > 0, sizes / counts.clamp_min(1), -1.0)
    order = ratio.argsort(-1, descending=True)
    n, m = counts.gather(-1, order), sizes.gather(-1, order)
    taken = (n.cumsum(-1) - n) < coarse_budget
    bound = (m * taken).sum(-1).max() + sizes.max()
    return int(torch.minimum(bound, sizes.sum(-1).max()))


def kernel_index(index, dtype: torch.dtype | None = None, coarse_budget: int | None = None) -> KernelIndex:
    """Build the kernel view of a `LayerIndex` (flat or two-level) on its own device. For a
    two-level index selected with `coarse_budget` coarse keys, the fine buffers are sized by
    `candidate_bound` for that budget (other budgets and thresholds use room for all)."""
    dtype = dtype or index.keys.dtype
    counts = index.counts
    coarse = {}
    if index.coarse_centroids is not None:
        sizes = index.coarse_offsets[:, 1:] - index.coarse_offsets[:, :-1]
        coarse = dict(
            coarse_centroids=index.coarse_centroids.to(dtype).contiguous(),
            coarse_log_counts=index.coarse_counts.float().log().contiguous(),
            coarse_counts=index.coarse_counts.to(torch.int32).contiguous(),
            coarse_first=index.coarse_offsets[:, :-1].to(torch.int32).contiguous(),
            coarse_sizes=sizes.to(torch.int32).contiguous(),
            coarse_largest=int(sizes.max()) if sizes.numel() else 0,
            coarse_keys_largest=int(index.coarse_counts.max()) if sizes.numel() else 0,
        )
        if coarse_budget is not None:
            coarse.update(coarse_bound_budget=coarse_budget, coarse_bound=candidate_bound(index.coarse_counts, sizes, coarse_budget))
    return KernelIndex(
        keys=index.keys.to(dtype).contiguous(),
        values=index.values.to(dtype).contiguous(),
        dense_keys=index.dense_keys.to(dtype).contiguous(),
        dense_values=index.dense_values.to(dtype).contiguous(),
        centroids=index.centroids.to(dtype).contiguous(),
        log_counts=counts.float().log().contiguous(),
        counts=counts.to(torch.int32).contiguous(),
        starts=index.offsets[:, :-1].to(torch.int32).contiguous(),
        largest=int(counts.max()) if counts.numel() else 0,
        pieces=int((-(-counts // PIECE_ROWS)).sum(-1).max()) if counts.numel() else 0,
        piece_rows=PIECE_ROWS,
        **coarse,
    )
