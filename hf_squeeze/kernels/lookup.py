"""The centroid lookup on the device: scores (`scoring.py`), selection (`selection.py`), the kept ranges.

They compute what `hf_squeeze.selection` computes (the torch reference), on the device and with no
host synchronisation:

    log p_j = max over the G query heads of
              log mean over the valid query tokens of exp(s_j - log sum_k N_k exp(s_k))

then keep clusters by threshold (log p_j >= threshold) or by budget (clusters in decreasing p until
`budget` keys; the cluster that crosses the budget is kept; equal log p in cluster order), and
turn the kept clusters into a compact list of key ranges (see `layout.py`).

Decode (one query token) and prefill (many) score differently: a decode step has only G query rows,
so the centroids are split over many programs and the normaliser is reduced in `_decode_logp_kernel`;
a prefill first computes each query row's normaliser, then each program averages the probabilities
of a block of centroids over the input tokens.

A two-level index runs the same steps twice. Level 1 scores the coarse centroids, keeps coarse
clusters, and the compaction lists the fine clusters under the kept ones (each coarse cluster is a
contiguous range of fine clusters) as candidate ids. Level 2 scores only those candidates: its
grids have a fixed size (C fine clusters), but programs past a head's candidate count load and
compute nothing, so the work follows the kept coarse clusters. Its normaliser mixes resolutions
as the reference does: fine terms for the candidates, coarse terms N_k exp(s1_k) for the rejected
coarse clusters. The selection then runs over the candidate list, which is in cluster order, so
ties are broken as in the reference.
"""

from __future__ import annotations

import torch
import triton

from .common import empty
from .layout import KernelIndex
from .scoring import score_candidates, score_every
from .selection import compact, select


class KeptRanges:
    """What the selection hands to the attention kernels, all on the device. Per (row, KV head):
    the kept clusters as pieces of at most `kindex.piece_rows` keys (the first `nsel` entries are valid),
    in cluster order."""

    def __init__(self, keep, starts, lengths, positions, nsel, nkeys):
        self.keep = keep  # [B, H, C] int8 kept clusters
        self.starts = starts  # [B, H, P] int32 first row of each piece
        self.lengths = lengths  # [B, H, P] int32 its keys
        self.positions = positions  # [B, H, P] int32 kept keys before it
        self.nsel = nsel  # [B, H] int32 pieces
        self.nkeys = nkeys  # [B, H] int32 kept keys


def lookup(
    query: torch.Tensor,
    kindex: KernelIndex,
    scaling: float,
    threshold: float | None,
    budget: int | None,
    logw: torch.Tensor | None,
    stats: torch.Tensor,
    coarse_threshold: float | None = None,
    coarse_budget: int | None = None,
    scored: torch.Tensor | None = None,
    every: bool = False,
) -> KeptRanges:
    """query [B, Hq, T, D] (last dim contiguous) -> the kept clusters per (row, KV head) as key ranges.

    `logw` [B, T] float32: log weight of each query token in the mean (log 1/T without padding;
    -inf for padding tokens); only used when T > 1. `stats` [1] int64 accumulates the kept keys.
    A two-level index first keeps coarse clusters by `coarse_threshold` / `coarse_budget` (neither: all
    non-empty ones), then scores only the fine centroids under them; `scored` [1] int64, when
    given, accumulates how many fine centroids that was. `every` (an exact rule): keep every non-empty
    (fine) cluster without scoring any centroid.
    """
    batch, _, tokens, _ = query.shape
    heads, clusters = kindex.heads, kindex.clusters
    dev = query.device
    if tokens > 1 and not every:
        logw = logw.float().contiguous()
    if every or not kindex.hierarchical:
        if every:  # a selection by threshold -inf: all that log p needs is a value
            logp = torch.zeros(batch, heads, clusters, device=dev)
            threshold, budget = float("-inf"), None
        else:
            logp, _ = score_every(query, kindex.centroids, kindex.log_counts, scaling, logw)
        keep, blocks, nsel, nkeys = select(
            logp, kindex.counts, kindex.counts, threshold, budget, kindex.largest, kindex.piece_rows, stats
        )
        kept_list, ids, ncand = keep, None, None
    else:
        # Level 1: score the coarse centroids, keep coarse clusters, list their fine clusters.
        logp1, s1 = score_every(query, kindex.coarse_centroids, kindex.coarse_log_counts, scaling, logw)
        if scored is None:
            scored = empty(dev, torch.int64, 1)
        keep1, blocks1, _, ncand = select(
            logp1, kindex.coarse_counts, kindex.coarse_sizes, coarse_threshold, coarse_budget,
            kindex.coarse_keys_largest, 1, scored,
        )
        ids = empty(dev, torch.int32, batch, heads, kindex.candidates(coarse_budget))
        compact(keep1, blocks1, kindex.coarse_sizes, kindex.coarse_first, 1, kindex.coarse_largest, ids)
        # Level 2: score those fine centroids only, keep fine clusters among them.
        keep = empty(dev, torch.int8, batch, heads, clusters)  # cluster order; cleared while scoring
        logp = score_candidates(query, kindex, scaling, logw, ids, ncand, s1, keep1, keep)
        kept_list, blocks, nsel, nkeys = select(
            logp, kindex.counts, kindex.counts, threshold, budget, kindex.largest, kindex.piece_rows, stats, ids, ncand, keep
        )
    starts, lengths, positions = (empty(dev, torch.int32, batch, heads, max(1, kindex.pieces)) for _ in range(3))
    piece = kindex.piece_rows
    compact(kept_list, blocks, kindex.counts, kindex.starts, piece, triton.cdiv(kindex.largest, piece),
             starts, lengths, positions, ids, ncand)
    return KeptRanges(keep, starts, lengths, positions, nsel, nkeys)
