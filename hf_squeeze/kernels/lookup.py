"""Triton kernels of the centroid lookup: scores, estimated probability, selection, work list.

They compute what `hf_squeeze.lookup` computes (the torch reference) for a flat index, on the
device and with no host synchronisation:

    log p_j = max over the G query heads of
              log mean over the valid query tokens of exp(s_j - log sum_k N_k exp(s_k))

then keep clusters by threshold (log p_j >= threshold) or by budget (clusters in decreasing p until
`budget` keys; the cluster that crosses the budget is kept; equal log p in cluster order), and
turn the kept clusters into a compact list of key ranges (see `layout.py`).

Decode (one query token) and prefill (many) score differently: a decode step has only G query rows,
so the centroids are split over many programs and the normaliser is reduced in `_decode_logp_kernel`;
a prefill first computes each query row's normaliser, then each program averages the probabilities
of a block of centroids over the input tokens.
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
def _row_norm_kernel(
    q_ptr, cent_ptr, logn_ptr, norm_ptr,
    scaling, H, C, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefill: log sum_k N_k exp(s_k) for a block of tokens of one query head: norm [B, H, G, T]."""
    bhg = tl.program_id(0)
    tb = tl.program_id(1)
    g = bhg % G
    bh = bhg // G
    b = bh // H
    h = bh % H
    t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.arange(0, D)
    q = tl.load(
        q_ptr + b * sq_b + (h * G + g) * sq_h + t[:, None] * sq_t + d[None, :], mask=t[:, None] < T, other=0.0
    )
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cent = tl.load(cent_ptr + (h * C + c)[:, None] * D + d[None, :], mask=c[:, None] < C, other=0.0)
        logn = tl.load(logn_ptr + h * C + c, mask=c < C, other=float("-inf"))
        w = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scaling + logn[None, :]
        m_new = tl.maximum(m, tl.max(w, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(w - m_safe[:, None]), 1)
        m = m_new
    tl.store(norm_ptr + bhg * T + t, m + tl.log(l), mask=t < T)


@triton.jit
def _aggregate_kernel(
    q_ptr, cent_ptr, logn_ptr, norm_ptr, logw_ptr, logp_ptr,
    scaling, H, C, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
):
    """Prefill: log p of a block of centroids, mean over the tokens (log domain), max over G.

    Centroids are the rows of the score tile and tokens its columns, so the running log-sum-exp
    over tokens is a row reduction, as in flash attention."""
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cent = tl.load(cent_ptr + (h * C + c)[:, None] * D + d[None, :], mask=c[:, None] < C, other=0.0)
    logn = tl.load(logn_ptr + h * C + c, mask=c < C, other=float("-inf"))
    best = tl.full([BLOCK_C], float("-inf"), tl.float32)
    for g in range(0, G):
        m = tl.full([BLOCK_C], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_C], tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            q = tl.load(
                q_ptr + b * sq_b + (h * G + g) * sq_h + t[:, None] * sq_t + d[None, :],
                mask=t[:, None] < T,
                other=0.0,
            )
            shift = tl.load(logw_ptr + b * T + t, mask=t < T, other=float("-inf"))
            shift -= tl.load(norm_ptr + (bh * G + g) * T + t, mask=t < T, other=0.0)
            x = tl.dot(cent, tl.trans(q), input_precision=PRECISION) * scaling + shift[None, :]
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[:, None]), 1)
            m = m_new
        best = tl.maximum(best, m + tl.log(l))
    best = tl.where(logn > float("-inf"), best, float("-inf"))
    tl.store(logp_ptr + bh * C + c, best, mask=c < C)


@triton.jit
def _decode_logp_kernel(
    s_ptr, pm_ptr, pl_ptr, logp_ptr, C, G, NCB,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CB: tl.constexpr,
):
    """Decode: finish each query head's normaliser from the per-block pieces, then
    log p = max over the group of (s - normaliser), for a block of centroids."""
    bh = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
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
        s_ptr + (bh * G + g[:, None]) * C + c[None, :], mask=(g[:, None] < G) & (c[None, :] < C), other=float("-inf")
    )
    tl.store(logp_ptr + bh * C + c, tl.max(s - norm[:, None], 0), mask=c < C)


@triton.jit
def _select_kernel(
    logp_ptr, counts_ptr, keep_ptr, block_ptr, nsel_ptr, nkeys_ptr, stats_ptr,
    threshold, budget, H, C,
    USE_BUDGET: tl.constexpr, PIECE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (batch row, KV head): which clusters to keep, and for each block of BLOCK_S clusters
    the pieces and keys kept before it (so that `_compact_kernel` can place its ranges)."""
    bh = tl.program_id(0)
    h = bh % H
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    counts = tl.load(counts_ptr + h * C + c, mask=cmask, other=0)
    logp = tl.load(logp_ptr + bh * C + c, mask=cmask, other=float("-inf"))
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
    tl.store(keep_ptr + bh * C + c, keep.to(tl.int8), mask=cmask)
    pieces = tl.where(keep, tl.cdiv(counts, PIECE), 0)
    kept = tl.where(keep, counts, 0)
    # Per-block totals and their exclusive prefix: a scan over C / BLOCK_S numbers, not over C.
    NB: tl.constexpr = BLOCK_C // BLOCK_S
    block_pieces = tl.sum(tl.reshape(pieces, [NB, BLOCK_S]), 1)
    block_keys = tl.sum(tl.reshape(kept, [NB, BLOCK_S]), 1)
    b = tl.arange(0, NB)
    tl.store(block_ptr + (bh * NB + b) * 2, tl.cumsum(block_pieces, 0) - block_pieces)
    tl.store(block_ptr + (bh * NB + b) * 2 + 1, tl.cumsum(block_keys, 0) - block_keys)
    nkeys = tl.sum(kept)
    tl.store(nsel_ptr + bh, tl.sum(pieces))
    tl.store(nkeys_ptr + bh, nkeys)
    tl.atomic_add(stats_ptr, nkeys.to(tl.int64))


@triton.jit
def _compact_kernel(
    keep_ptr, counts_ptr, starts_ptr, block_ptr, sel_start_ptr, sel_len_ptr, sel_pos_ptr,
    H, C, PC, NB, MAX_PIECES,
    PIECE: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """A block of clusters of one (batch row, KV head): write its kept clusters as pieces of at most
    PIECE keys into the selection list, in cluster order."""
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    h = bh % H
    c = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask = c < C
    keep = tl.load(keep_ptr + bh * C + c, mask=cmask, other=0) != 0
    counts = tl.load(counts_ptr + h * C + c, mask=cmask, other=0)
    starts = tl.load(starts_ptr + h * C + c, mask=cmask, other=0)
    pieces = tl.where(keep, tl.cdiv(counts, PIECE), 0)
    kept = tl.where(keep, counts, 0)
    slot = tl.load(block_ptr + (bh * NB + blk) * 2) + tl.cumsum(pieces, 0) - pieces
    position = tl.load(block_ptr + (bh * NB + blk) * 2 + 1) + tl.cumsum(kept, 0) - kept
    for j in range(0, MAX_PIECES):
        write = keep & (j < pieces)
        tl.store(sel_start_ptr + bh * PC + slot + j, starts + j * PIECE, mask=write)
        tl.store(sel_len_ptr + bh * PC + slot + j, tl.minimum(counts - j * PIECE, PIECE), mask=write)
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


def lookup(
    query: torch.Tensor,
    kindex: KernelIndex,
    scaling: float,
    threshold: float | None,
    budget: int | None,
    logw: torch.Tensor | None,
    stats: torch.Tensor,
) -> Work:
    """query [B, Hq, T, D] (last dim contiguous) -> the kept clusters per (row, KV head) as key ranges.

    `logw` [B, T] float32: log weight of each query token in the mean (log 1/T without padding;
    -inf for padding tokens); only used when T > 1. `stats` [1] int64 accumulates the kept keys.
    """
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = kindex.heads, kindex.clusters
    group = q_heads // heads
    dev = query.device
    precision = _precision(query.dtype)
    ncb = triton.cdiv(clusters, SCORE_BLOCK_C)
    sq_b, sq_h, sq_t = query.stride(0), query.stride(1), query.stride(2)
    logp = torch.empty(batch, heads, clusters, device=dev, dtype=torch.float32)
    if tokens == 1:
        s = torch.empty(batch, heads, group, clusters, device=dev, dtype=torch.float32)
        pm = torch.empty(batch, heads, ncb, group, device=dev, dtype=torch.float32)
        pl = torch.empty_like(pm)
        _score_decode_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, s, pm, pl,
            scaling, heads, clusters, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=_pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        _decode_logp_kernel[(batch * heads, ncb)](
            s, pm, pl, logp, clusters, group, ncb, BLOCK_C=SCORE_BLOCK_C, BLOCK_G=_pow2(group), BLOCK_CB=_pow2(ncb)
        )
    else:
        norm = torch.empty(batch, heads, group, tokens, device=dev, dtype=torch.float32)
        _row_norm_kernel[(batch * heads * group, triton.cdiv(tokens, PREFILL_BLOCK_T))](
            query, kindex.centroids, kindex.log_counts, norm,
            scaling, heads, clusters, group, tokens, sq_b, sq_h, sq_t,
            D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        _aggregate_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, norm, logw.float().contiguous(), logp,
            scaling, heads, clusters, group, tokens, sq_b, sq_h, sq_t,
            D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
    def buffer(dtype, *shape):
        return torch.empty(*shape, device=dev, dtype=dtype)

    keep = buffer(torch.int8, batch, heads, clusters)
    starts, lengths, positions = (buffer(torch.int32, batch, heads, max(1, kindex.pieces)) for _ in range(3))
    nsel, nkeys = (buffer(torch.int32, batch, heads) for _ in range(2))
    block_c = _pow2(clusters, COMPACT_BLOCK)
    blocks = block_c // COMPACT_BLOCK
    block_offsets = buffer(torch.int32, batch, heads, blocks, 2)
    _select_kernel[(batch * heads,)](
        logp, kindex.counts, keep, block_offsets, nsel, nkeys, stats,
        float("-inf") if threshold is None else threshold, 0 if budget is None else budget, heads, clusters,
        USE_BUDGET=budget is not None, PIECE=PIECE_ROWS, BLOCK_C=block_c, BLOCK_S=COMPACT_BLOCK,
        num_warps=4 if block_c < 4096 else 16 if block_c <= 8192 else 32,
    )
    _compact_kernel[(batch * heads, blocks)](
        keep, kindex.counts, kindex.starts, block_offsets, starts, lengths, positions,
        heads, clusters, starts.shape[-1], blocks, triton.cdiv(kindex.largest, PIECE_ROWS),
        PIECE=PIECE_ROWS, BLOCK_S=COMPACT_BLOCK,
    )
    return Work(keep, starts, lengths, positions, nsel, nkeys)
