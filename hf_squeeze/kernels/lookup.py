"""Triton kernels of the centroid lookup: scores, estimated probability, selection, work list.

They compute what `hf_squeeze.lookup` computes (the torch reference), on the device and with no
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
import triton.language as tl

from .layout import PIECE_ROWS, KernelIndex

SCORE_BLOCK_C = 128  # centroids per program when scoring
PREFILL_BLOCK_T = 64  # query tokens per step when scoring a prefill
COMPACT_BLOCK = 128  # clusters per program when writing the selection list
MAX_CLUSTERS = 32768  # the selection holds one KV head's clusters in registers


@triton.jit
def _score_decode_kernel(
    q_ptr, cent_ptr, logn_ptr, s_ptr, pm_ptr, pl_ptr,
    scaling, H, C, G, NCB, sq_b, sq_h,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """One decode token: scores of a block of centroids for the G query heads of a KV head.

    Writes the masked scores s [B, H, G, C] and, per block, the max and the sum of exp of
    s + log N (the pieces of the normaliser) [B, H, NCB, G].
    """
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=g[:, None] < G, other=0.0)
    cent = tl.load(cent_ptr + (h * C + c)[:, None] * D + d[None, :], mask=c[:, None] < C, other=0.0)
    s = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scaling
    logn = tl.load(logn_ptr + h * C + c, mask=c < C, other=float("-inf"))
    s = tl.where(logn[None, :] > float("-inf"), s, float("-inf"))
    tl.store(s_ptr + (bh * G + g[:, None]) * C + c[None, :], s, mask=(g[:, None] < G) & (c[None, :] < C))
    w = s + logn[None, :]
    m = tl.max(w, 1)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    l = tl.sum(tl.exp(w - m_safe[:, None]), 1)
    tl.store(pm_ptr + (bh * NCB + cb) * G + g, m, mask=g < G)
    tl.store(pl_ptr + (bh * NCB + cb) * G + g, l, mask=g < G)


@triton.jit
def _score_fine_decode_kernel(
    q_ptr, cent_ptr, logn_ptr, ids_ptr, ncand_ptr, s1_ptr, logn1_ptr, keep1_ptr, keep_ptr, s_ptr, pm_ptr, pl_ptr,
    scaling, H, C, C1, CAP, G, NCB, sq_b, sq_h,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """One decode token, level 2 of a two-level index: scores of a block of the candidate fine
    centroids (the children of the kept coarse clusters: the first ncand[bh] entries of `ids`).

    The block's pieces of the mixed normaliser [B, H, NCB, G] hold its fine terms and the coarse
    terms N_k exp(s1_k) of the rejected coarse clusters of the same block index, so no fine
    centroid under a rejected coarse cluster is read. Blocks past the candidates load nothing.
    The programs also clear the C fine-order keep flags (the selection sets them)."""
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    b = bh // H
    h = bh % H
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    scored = c < tl.load(ncand_ptr + bh)
    ids = tl.load(ids_ptr + bh * CAP + c, mask=scored, other=0)
    q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=g[:, None] < G, other=0.0)
    cent = tl.load(cent_ptr + (h * C + ids)[:, None] * D + d[None, :], mask=scored[:, None], other=0.0)
    s = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scaling
    logn = tl.load(logn_ptr + h * C + ids, mask=scored, other=float("-inf"))
    s = tl.where(logn[None, :] > float("-inf"), s, float("-inf"))
    tl.store(s_ptr + (bh * G + g[:, None]) * CAP + c[None, :], s, mask=(g[:, None] < G) & scored[None, :])
    w = s + logn[None, :]
    rejected = (c < C1) & (tl.load(keep1_ptr + bh * C1 + c, mask=c < C1, other=1) == 0)
    logn1 = tl.load(logn1_ptr + h * C1 + c, mask=rejected, other=float("-inf"))
    s1 = tl.load(
        s1_ptr + (bh * G + g[:, None]) * C1 + c[None, :], mask=(g[:, None] < G) & rejected[None, :], other=float("-inf")
    )
    w1 = s1 + logn1[None, :]
    m = tl.maximum(tl.max(w, 1), tl.max(w1, 1))
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    l = tl.sum(tl.exp(w - m_safe[:, None]), 1) + tl.sum(tl.exp(w1 - m_safe[:, None]), 1)
    tl.store(pm_ptr + (bh * NCB + cb) * G + g, m, mask=g < G)
    tl.store(pl_ptr + (bh * NCB + cb) * G + g, l, mask=g < G)
    _clear_flags(keep_ptr + bh * C, cb, NCB, C, BLOCK_C)


@triton.jit
def _clear_flags(ptr, cb, NCB, C, BLOCK_C: tl.constexpr):
    """Program cb of NCB zeroes its share of the C int8 flags at ptr."""
    for c0 in range(cb * BLOCK_C, C, NCB * BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        tl.store(ptr + c, tl.zeros([BLOCK_C], tl.int8), mask=c < C)


@triton.jit
def _mass_step(q, cent, logn, m, l, scaling, PRECISION: tl.constexpr):
    """Fold a block of centroids into the running log sum_k N_k exp(s_k) (max m, sum l) of each query row."""
    w = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scaling + logn[None, :]
    m_new = tl.maximum(m, tl.max(w, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(w - m_safe[:, None]), 1)
    return m_new, l


@triton.jit
def _prefill_rows(q_ptr, b, h, g, G, T, tb, sq_b, sq_h, sq_t, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """A block of query tokens of one query head: [BLOCK_T, D] (zeros past T) and their indices."""
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * sq_b + (h * G + g) * sq_h + t[:, None] * sq_t + d[None, :], mask=t[:, None] < T, other=0.0
    )
    return q, t


@triton.jit
def _row_norm_kernel(
    q_ptr, cent_ptr, logn_ptr, norm_ptr,
    scaling, H, C, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefill: log sum_k N_k exp(s_k) for a block of tokens of one query head: norm [B, H, G, T]."""
    bhg = tl.program_id(0)
    g = bhg % G
    bh = bhg // G
    b = bh // H
    h = bh % H
    q, t = _prefill_rows(q_ptr, b, h, g, G, T, tl.program_id(1), sq_b, sq_h, sq_t, D, BLOCK_T)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cent = tl.load(cent_ptr + (h * C + c)[:, None] * D + d[None, :], mask=c[:, None] < C, other=0.0)
        logn = tl.load(logn_ptr + h * C + c, mask=c < C, other=float("-inf"))
        m, l = _mass_step(q, cent, logn, m, l, scaling, PRECISION)
    tl.store(norm_ptr + bhg * T + t, m + tl.log(l), mask=t < T)


@triton.jit
def _mixed_norm_kernel(
    q_ptr, cent_ptr, logn_ptr, ids_ptr, ncand_ptr, cent1_ptr, logn1_ptr, keep1_ptr, norm_ptr,
    scaling, H, C, C1, CAP, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefill, level 2 of a two-level index: the mixed normaliser of a block of tokens of one query
    head: fine terms of the candidate fine centroids (the children of the kept coarse clusters,
    listed in `ids`), coarse terms of the rejected coarse clusters. norm [B, H, G, T]."""
    bhg = tl.program_id(0)
    g = bhg % G
    bh = bhg // G
    b = bh // H
    h = bh % H
    q, t = _prefill_rows(q_ptr, b, h, g, G, T, tl.program_id(1), sq_b, sq_h, sq_t, D, BLOCK_T)
    d = tl.arange(0, D)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    n = tl.load(ncand_ptr + bh)
    for c0 in range(0, n, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=c < n, other=0)
        cent = tl.load(cent_ptr + (h * C + ids)[:, None] * D + d[None, :], mask=c[:, None] < n, other=0.0)
        logn = tl.load(logn_ptr + h * C + ids, mask=c < n, other=float("-inf"))
        m, l = _mass_step(q, cent, logn, m, l, scaling, PRECISION)
    for c0 in range(0, C1, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        rejected = (c < C1) & (tl.load(keep1_ptr + bh * C1 + c, mask=c < C1, other=1) == 0)
        cent = tl.load(cent1_ptr + (h * C1 + c)[:, None] * D + d[None, :], mask=rejected[:, None], other=0.0)
        logn = tl.load(logn1_ptr + h * C1 + c, mask=rejected, other=float("-inf"))
        m, l = _mass_step(q, cent, logn, m, l, scaling, PRECISION)
    tl.store(norm_ptr + bhg * T + t, m + tl.log(l), mask=t < T)


@triton.jit
def _aggregate_kernel(
    q_ptr, cent_ptr, logn_ptr, ids_ptr, ncand_ptr, keep_ptr, norm_ptr, logw_ptr, logp_ptr,
    scaling, H, C, CAP, NCB, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    HAS_IDS: tl.constexpr,
):
    """Prefill: log p of a block of centroids, mean over the tokens (log domain), max over G.

    Centroids are the rows of the score tile and tokens its columns, so the running log-sum-exp
    over tokens is a row reduction, as in flash attention. With HAS_IDS the centroids are the
    first ncand[bh] of the candidate list `ids` [B, H, CAP] (level 2 of a two-level index):
    blocks past them skip the work, and the programs clear the C fine-order keep flags (set later
    by the selection)."""
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    if HAS_IDS:
        n = tl.load(ncand_ptr + bh)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=c < n, other=0)
        groups = tl.where(cb * BLOCK_C < n, G, 0)
        _clear_flags(keep_ptr + bh * C, cb, NCB, C, BLOCK_C)
    else:
        n = C
        ids = c
        groups = G
    cent = tl.load(cent_ptr + (h * C + ids)[:, None] * D + d[None, :], mask=c[:, None] < n, other=0.0)
    logn = tl.load(logn_ptr + h * C + ids, mask=c < n, other=float("-inf"))
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for g in range(0, groups):
        m = tl.full([BLOCK_C], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_C], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            q, t = _prefill_rows(q_ptr, b, h, g, G, T, t0 // BLOCK_T, sq_b, sq_h, sq_t, D, BLOCK_T)
            shift = tl.load(logw_ptr + b * T + t, mask=t < T, other=float("-inf"))
            shift -= tl.load(norm_ptr + (bh * G + g) * T + t, mask=t < T, other=0.0)
            x = tl.dot(cent, tl.trans(q), input_precision=PRECISION) * scaling + shift[None, :]
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
            m = m_new
        best = tl.maximum(best, m + tl.log(l))
    best = tl.where(logn > float("-inf"), best, float("-inf"))
    tl.store(logp_ptr + bh * CAP + c, best, mask=c < n)


@triton.jit
def _decode_logp_kernel(
    s_ptr, pm_ptr, pl_ptr, ncand_ptr, logp_ptr, C, G, NCB,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CB: tl.constexpr, HAS_IDS: tl.constexpr,
):
    """Decode: finish each query head's normaliser from the per-block pieces, then
    log p = max over the group of (s - normaliser), for a block of centroids (with HAS_IDS: of
    the first ncand[bh] candidates)."""
    bh = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    if HAS_IDS:
        n = tl.load(ncand_ptr + bh)
    else:
        n = C
    g = tl.arange(0, BLOCK_G)
    cb = tl.arange(0, BLOCK_CB)
    piece = (cb[:, None] < NCB) & (g[None, :] < G)
    pm = tl.load(pm_ptr + (bh * NCB + cb[:, None]) * G + g[None, :], mask=piece, other=float("-inf"))
    pl = tl.load(pl_ptr + (bh * NCB + cb[:, None]) * G + g[None, :], mask=piece, other=0.0)
    mx = tl.max(pm, 0)
    mx = tl.where(mx > float("-inf"), mx, 0.0)
    total = tl.sum(pl * tl.exp(pm - mx[None, :]), 0)
    norm = tl.where(g < G, mx + tl.log(tl.where(g < G, total, 1.0)), 0.0)
    s = tl.load(
        s_ptr + (bh * G + g[:, None]) * C + c[None, :], mask=(g[:, None] < G) & (c[None, :] < n), other=float("-inf")
    )
    tl.store(logp_ptr + bh * C + c, tl.max(s - norm[:, None], 0), mask=c < n)


@triton.jit
def _select_kernel(
    logp_ptr, counts_ptr, units_ptr, ids_ptr, ncand_ptr, keep_ptr, keep_ids_ptr,
    block_ptr, nsel_ptr, nunits_ptr, stats_ptr,
    threshold, budget, H, C, CAP,
    USE_BUDGET: tl.constexpr, HAS_IDS: tl.constexpr, PIECE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """One (batch row, KV head): which candidates to keep, and for each block of BLOCK_S candidates
    the pieces and units kept before it (so that `_compact_kernel` can place its ranges).

    Candidates are the C clusters of the head in order, or with HAS_IDS the first ncand[bh]
    entries of the list `ids` [B, H, CAP] (fine clusters under the kept coarse clusters, in
    cluster order); then the keep flags are also scattered to cluster order (`keep_ids_ptr`).
    `counts` (keys per cluster) decide; `units` (what the compaction lists: keys of a cluster, or
    fine clusters of a coarse cluster) are cut into pieces of at most PIECE."""
    bh = tl.program_id(0)
    h = bh % H
    c = tl.arange(0, BLOCK_C)
    if HAS_IDS:
        cmask = c < tl.load(ncand_ptr + bh)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=cmask, other=0)
    else:
        cmask = c < C
        ids = c
    counts = tl.load(counts_ptr + h * C + ids, mask=cmask, other=0)
    units = tl.load(units_ptr + h * C + ids, mask=cmask, other=0)
    logp = tl.load(logp_ptr + bh * CAP + c, mask=cmask, other=float("-inf"))
    nonempty = counts > 0
    if USE_BUDGET:
        # Binary search, over an order-preserving int32 image of log p, for the largest x with
        # sum(N_j : key_j >= x) >= budget; keeping key_j >= x keeps the cluster that crosses the
        # budget. It stops as soon as one cluster is left in [lo, hi) (about log2 C steps). If the
        # non-empty clusters hold fewer keys than the budget, lo stays at the smallest key: keep all.
        bits = logp.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        lo = tl.min(tl.where(nonempty, key, 2147483647))
        hi = tl.minimum(tl.max(tl.where(nonempty, key, -2147483647)).to(tl.int64) + 1, 2147483647).to(tl.int32)
        if tl.sum(counts) < budget:
            hi = lo
        inside = tl.sum((nonempty & (key >= lo) & (key < hi)).to(tl.int32))
        while (inside > 1) & (hi.to(tl.int64) - lo.to(tl.int64) > 1):  # (equal keys end at width 1)
            mid = (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64)) // 2).to(tl.int32)
            # Two int32 reductions per step: on the H100 this measured faster than one packed
            # int64 reduction (select 24 us vs 35 us at 6,548 clusters per head).
            up = tl.sum(tl.where(key >= mid, counts, 0)) >= budget
            lo = tl.where(up, mid, lo)
            hi = tl.where(up, hi, mid)
            inside = tl.sum((nonempty & (key >= lo) & (key < hi)).to(tl.int32))
        keep = (key >= lo) & nonempty
        tied = nonempty & (key == lo)
        if tl.sum(tied.to(tl.int32)) > 1:  # equal log p at the crossing: take them in cluster order
            above = tl.sum(tl.where(nonempty & (key > lo), counts, 0))
            tied_counts = tl.where(tied, counts, 0)
            before = tl.cumsum(tied_counts, 0) - tied_counts
            keep = (nonempty & (key > lo)) | (tied & (above + before < budget))
    else:
        keep = (logp >= threshold) & nonempty
    tl.store(keep_ptr + bh * CAP + c, keep.to(tl.int8), mask=cmask)
    if HAS_IDS:
        tl.store(keep_ids_ptr + bh * C + ids, keep.to(tl.int8), mask=cmask)
    pieces = tl.where(keep, tl.cdiv(units, PIECE), 0)
    kept = tl.where(keep, units, 0)
    # Per-block totals and their exclusive prefix: a scan over C / BLOCK_S numbers, not over C.
    NB: tl.constexpr = BLOCK_C // BLOCK_S
    block_pieces = tl.sum(tl.reshape(pieces, [NB, BLOCK_S]), 1)
    block_keys = tl.sum(tl.reshape(kept, [NB, BLOCK_S]), 1)
    b = tl.arange(0, NB)
    tl.store(block_ptr + (bh * NB + b) * 2, tl.cumsum(block_pieces, 0) - block_pieces)
    tl.store(block_ptr + (bh * NB + b) * 2 + 1, tl.cumsum(block_keys, 0) - block_keys)
    nunits = tl.sum(kept)
    tl.store(nsel_ptr + bh, tl.sum(pieces))
    tl.store(nunits_ptr + bh, nunits)
    tl.atomic_add(stats_ptr, nunits.to(tl.int64))


@triton.jit
def _compact_kernel(
    keep_ptr, units_ptr, starts_ptr, ids_ptr, ncand_ptr, block_ptr, sel_start_ptr, sel_len_ptr, sel_pos_ptr,
    H, C, CAP, PC, NB, MAX_PIECES,
    HAS_IDS: tl.constexpr, LISTS: tl.constexpr, PIECE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """A block of candidates of one (batch row, KV head): write its kept ones as pieces of at most
    PIECE units into the selection list, in candidate order (starts; with LISTS also lengths and
    units before). With PIECE = 1 this lists every unit: the fine clusters of the kept coarse ones."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    h = bh % H
    c = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    if HAS_IDS:
        cmask = c < tl.load(ncand_ptr + bh)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=cmask, other=0)
    else:
        cmask = c < C
        ids = c
    keep = tl.load(keep_ptr + bh * CAP + c, mask=cmask, other=0) != 0
    units = tl.load(units_ptr + h * C + ids, mask=cmask, other=0)
    starts = tl.load(starts_ptr + h * C + ids, mask=cmask, other=0)
    pieces = tl.where(keep, tl.cdiv(units, PIECE), 0)
    kept = tl.where(keep, units, 0)
    slot = tl.load(block_ptr + (bh * NB + blk) * 2) + tl.cumsum(pieces, 0) - pieces
    position = tl.load(block_ptr + (bh * NB + blk) * 2 + 1) + tl.cumsum(kept, 0) - kept
    for j in range(0, MAX_PIECES):
        write = keep & (j < pieces)
        tl.store(sel_start_ptr + bh * PC + slot + j, starts + j * PIECE, mask=write)
        if LISTS:
            tl.store(sel_len_ptr + bh * PC + slot + j, tl.minimum(units - j * PIECE, PIECE), mask=write)
            tl.store(sel_pos_ptr + bh * PC + slot + j, position + j * PIECE, mask=write)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


class Work:
    """What the selection hands to the attention kernels, all on the device. Per (row, KV head):
    the kept clusters as pieces of at most PIECE_ROWS keys (the first `nsel` entries are valid),
    in cluster order."""

    def __init__(self, keep, starts, lengths, positions, nsel, nkeys):
        self.keep = keep  # [B, H, C] int8 kept clusters
        self.starts = starts  # [B, H, P] int32 first row of each piece
        self.lengths = lengths  # [B, H, P] int32 its keys
        self.positions = positions  # [B, H, P] int32 kept keys before it
        self.nsel = nsel  # [B, H] int32 pieces
        self.nkeys = nkeys  # [B, H] int32 kept keys


def _buffer(dev, dtype, *shape):
    return torch.empty(*shape, device=dev, dtype=dtype)


def _score_every(query, centroids, log_counts, scaling, logw):
    """log p [B, H, C] of every centroid of a flat index (or of the coarse level), and for one
    query token also the scores s [B, H, G, C] (None for a prefill)."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = log_counts.shape
    group = q_heads // heads
    dev = query.device
    precision = _precision(query.dtype)
    ncb = triton.cdiv(clusters, SCORE_BLOCK_C)
    sq_b, sq_h, sq_t = query.stride(0), query.stride(1), query.stride(2)
    logp = _buffer(dev, torch.float32, batch, heads, clusters)
    if tokens == 1:
        s = _buffer(dev, torch.float32, batch, heads, group, clusters)
        pm = _buffer(dev, torch.float32, batch, heads, ncb, group)
        pl = torch.empty_like(pm)
        _score_decode_kernel[(batch * heads, ncb)](
            query, centroids, log_counts, s, pm, pl,
            scaling, heads, clusters, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=_pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        _decode_logp_kernel[(batch * heads, ncb)](
            s, pm, pl, pm, logp, clusters, group, ncb,
            BLOCK_C=SCORE_BLOCK_C, BLOCK_G=_pow2(group), BLOCK_CB=_pow2(ncb), HAS_IDS=False,
        )
        return logp, s
    norm = _buffer(dev, torch.float32, batch, heads, group, tokens)
    _row_norm_kernel[(batch * heads * group, triton.cdiv(tokens, PREFILL_BLOCK_T))](
        query, centroids, log_counts, norm,
        scaling, heads, clusters, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
    )
    _aggregate_kernel[(batch * heads, ncb)](
        query, centroids, log_counts, norm, norm, norm, norm, logw, logp,
        scaling, heads, clusters, clusters, ncb, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision, HAS_IDS=False,
    )
    return logp, None


def _score_candidates(query, kindex, scaling, logw, ids, ncand, s1, keep1, keep):
    """Level 2 of a two-level index: log p [B, H, CAP] (first ncand[b, h] valid) of the candidate
    fine centroids `ids` [B, H, CAP], normalised by the mixed sum (fine terms of the candidates,
    coarse terms of the rejected coarse clusters). Clears the fine-order `keep` flags on the way."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters, coarse = kindex.heads, kindex.clusters, kindex.l1_clusters
    cap = ids.shape[-1]
    group = q_heads // heads
    dev = query.device
    precision = _precision(query.dtype)
    # A fixed grid over the capacity (and the coarse clusters, for their normaliser terms):
    # blocks past a head's candidates load nothing.
    ncb = triton.cdiv(max(cap, coarse), SCORE_BLOCK_C)
    sq_b, sq_h, sq_t = query.stride(0), query.stride(1), query.stride(2)
    logp = _buffer(dev, torch.float32, batch, heads, cap)
    if tokens == 1:
        s = _buffer(dev, torch.float32, batch, heads, group, cap)
        pm = _buffer(dev, torch.float32, batch, heads, ncb, group)
        pl = torch.empty_like(pm)
        _score_fine_decode_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, ids, ncand, s1, kindex.l1_log_counts, keep1, keep, s, pm, pl,
            scaling, heads, clusters, coarse, cap, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=_pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        _decode_logp_kernel[(batch * heads, ncb)](
            s, pm, pl, ncand, logp, cap, group, ncb,
            BLOCK_C=SCORE_BLOCK_C, BLOCK_G=_pow2(group), BLOCK_CB=_pow2(ncb), HAS_IDS=True,
        )
        return logp
    norm = _buffer(dev, torch.float32, batch, heads, group, tokens)
    _mixed_norm_kernel[(batch * heads * group, triton.cdiv(tokens, PREFILL_BLOCK_T))](
        query, kindex.centroids, kindex.log_counts, ids, ncand, kindex.l1_centroids, kindex.l1_log_counts, keep1, norm,
        scaling, heads, clusters, coarse, cap, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
    )
    _aggregate_kernel[(batch * heads, ncb)](
        query, kindex.centroids, kindex.log_counts, ids, ncand, keep, norm, logw, logp,
        scaling, heads, clusters, cap, ncb, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision, HAS_IDS=True,
    )
    return logp


def _select(logp, counts, units, threshold, budget, piece, stats, ids=None, ncand=None, keep_ids=None):
    """Launch the selection over the C clusters of `counts` [H, C] (or the listed candidates `ids`
    [B, H, CAP], the first ncand[b, h] of them). Returns the keep flags [B, H, CAP] (candidate
    order), the per-block offsets for `_compact`, and per (row, head) the pieces and units kept."""
    batch, heads, cap = logp.shape
    dev = logp.device
    block_c = _pow2(cap, COMPACT_BLOCK)
    keep = _buffer(dev, torch.int8, batch, heads, cap)
    block_offsets = _buffer(dev, torch.int32, batch, heads, block_c // COMPACT_BLOCK, 2)
    nsel, nunits = (_buffer(dev, torch.int32, batch, heads) for _ in range(2))
    has_ids = ids is not None
    _select_kernel[(batch * heads,)](
        logp, counts, units, ids if has_ids else counts, ncand if has_ids else nsel, keep,
        keep_ids if has_ids else keep, block_offsets, nsel, nunits, stats,
        float("-inf") if threshold is None else threshold, 0 if budget is None else budget, heads, counts.shape[1], cap,
        USE_BUDGET=budget is not None, HAS_IDS=has_ids, PIECE=piece, BLOCK_C=block_c, BLOCK_S=COMPACT_BLOCK,
        num_warps=4 if block_c < 4096 else 16 if block_c <= 8192 else 32,
    )
    return keep, block_offsets, nsel, nunits


def _compact(keep, block_offsets, units, starts, piece, most, out_starts, out_lengths=None, out_positions=None,
             ids=None, ncand=None):
    """Write the kept candidates as pieces of at most `piece` units (`most` pieces at most per
    candidate) into `out_starts` [B, H, P] (and lengths / units before, when given)."""
    batch, heads, cap = keep.shape
    blocks = block_offsets.shape[2]
    has_ids, lists = ids is not None, out_lengths is not None
    _compact_kernel[(batch * heads, blocks)](
        keep, units, starts, ids if has_ids else units, ncand if has_ids else units, block_offsets,
        out_starts, out_lengths if lists else out_starts, out_positions if lists else out_starts,
        heads, units.shape[1], cap, out_starts.shape[-1], blocks, most,
        HAS_IDS=has_ids, LISTS=lists, PIECE=piece, BLOCK_S=COMPACT_BLOCK,
    )


def lookup(
    query: torch.Tensor,
    kindex: KernelIndex,
    scaling: float,
    threshold: float | None,
    budget: int | None,
    logw: torch.Tensor | None,
    stats: torch.Tensor,
    l1_threshold: float | None = None,
    l1_budget: int | None = None,
    scored: torch.Tensor | None = None,
) -> Work:
    """query [B, Hq, T, D] (last dim contiguous) -> the kept clusters per (row, KV head) as key ranges.

    `logw` [B, T] float32: log weight of each query token in the mean (log 1/T without padding;
    -inf for padding tokens); only used when T > 1. `stats` [1] int64 accumulates the kept keys.
    A two-level index first keeps coarse clusters by `l1_threshold` / `l1_budget` (neither: all
    non-empty ones), then scores only the fine centroids under them; `scored` [1] int64, when
    given, accumulates how many fine centroids that was.
    """
    batch, _, tokens, _ = query.shape
    heads, clusters = kindex.heads, kindex.clusters
    dev = query.device
    if tokens > 1:
        logw = logw.float().contiguous()
    if not kindex.hierarchical:
        logp, _ = _score_every(query, kindex.centroids, kindex.log_counts, scaling, logw)
        keep, blocks, nsel, nkeys = _select(logp, kindex.counts, kindex.counts, threshold, budget, PIECE_ROWS, stats)
        listed, ids, ncand = keep, None, None
    else:
        # Level 1: score the coarse centroids, keep coarse clusters, list their fine clusters.
        logp1, s1 = _score_every(query, kindex.l1_centroids, kindex.l1_log_counts, scaling, logw)
        if scored is None:
            scored = _buffer(dev, torch.int64, 1)
        keep1, blocks1, _, ncand = _select(
            logp1, kindex.l1_counts, kindex.l1_sizes, l1_threshold, l1_budget, 1, scored
        )
        ids = _buffer(dev, torch.int32, batch, heads, kindex.candidates(l1_budget))
        _compact(keep1, blocks1, kindex.l1_sizes, kindex.l1_first, 1, kindex.l1_largest, ids)
        # Level 2: score those fine centroids only, keep fine clusters among them.
        keep = _buffer(dev, torch.int8, batch, heads, clusters)  # cluster order; cleared while scoring
        logp = _score_candidates(query, kindex, scaling, logw, ids, ncand, s1, keep1, keep)
        listed, blocks, nsel, nkeys = _select(
            logp, kindex.counts, kindex.counts, threshold, budget, PIECE_ROWS, stats, ids, ncand, keep
        )
    starts, lengths, positions = (_buffer(dev, torch.int32, batch, heads, max(1, kindex.pieces)) for _ in range(3))
    _compact(listed, blocks, kindex.counts, kindex.starts, PIECE_ROWS, triton.cdiv(kindex.largest, PIECE_ROWS),
             starts, lengths, positions, ids, ncand)
    return Work(keep, starts, lengths, positions, nsel, nkeys)
