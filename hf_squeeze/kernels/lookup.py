"""Triton kernels of the centroid lookup: scores, estimated probability, selection, work list.

They compute what `hf_squeeze.lookup` computes (the torch reference) for a flat index, on the
device and with no host synchronisation:

    log p_j = max over the G query heads of
              log mean over the valid query tokens of exp(s_j - log sum_k N_k exp(s_k))

then keep clusters by threshold (log p_j >= threshold) or by budget (clusters in decreasing p until
`budget` keys; the cluster that crosses the budget is kept), and turn the kept clusters into the
list of key tiles to read (see `layout.py`).

Decode (one query token) and prefill (many) score differently: a decode step has only G query rows,
so the centroids are split over many programs and the normaliser is reduced in `_select_kernel`;
a prefill first computes each query row's normaliser, then each program averages the probabilities
of a block of centroids over the input tokens.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import KernelIndex

SCORE_BLOCK_C = 128  # centroids per program when scoring
PREFILL_BLOCK_T = 64  # query tokens per step when scoring a prefill
TILE_BLOCK = 1024  # tiles per step when building the work list


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
    """Prefill: log p of a block of centroids, mean over the tokens (log domain), max over G."""
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
            norm = tl.load(norm_ptr + (bh * G + g) * T + t, mask=t < T, other=0.0)
            logw = tl.load(logw_ptr + b * T + t, mask=t < T, other=float("-inf"))
            x = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * scaling
            x = x - norm[:, None] + logw[:, None]
            m_new = tl.maximum(m, tl.max(x, 0))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            l = l * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe[None, :]), 0)
            m = m_new
        best = tl.maximum(best, m + tl.log(l))
    best = tl.where(logn > float("-inf"), best, float("-inf"))
    tl.store(logp_ptr + bh * C + c, best, mask=c < C)


@triton.jit
def _select_kernel(
    logp_ptr, s_ptr, pm_ptr, pl_ptr, counts_ptr, tile_first_ptr, tile_last_ptr,
    kcum_ptr, keep_ptr, tiles_ptr, ntiles_ptr, stats_ptr,
    threshold, budget, H, C, NT, G, NCB,
    USE_BUDGET: tl.constexpr, FROM_SCORES: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CB: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One (batch row, KV head): which clusters to keep, and the list of key tiles to read."""
    bh = tl.program_id(0)
    h = bh % H
    c = tl.arange(0, BLOCK_C)
    cmask = c < C
    counts = tl.load(counts_ptr + h * C + c, mask=cmask, other=0)
    if FROM_SCORES:  # decode: finish the normaliser from the per-block pieces, then max over G
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
            s_ptr + (bh * G + g[:, None]) * C + c[None, :],
            mask=(g[:, None] < G) & cmask[None, :],
            other=float("-inf"),
        )
        logp = tl.max(s - norm[:, None], 0)
    else:
        logp = tl.load(logp_ptr + bh * C + c, mask=cmask, other=float("-inf"))
    nonempty = counts > 0
    if USE_BUDGET:
        # Find the largest key x with sum(N_j : key_j >= x) >= budget, bit by bit over an order-
        # preserving integer image of the float log p; keeping key_j >= x keeps the crossing
        # cluster. If the non-empty clusters hold fewer keys than the budget, x stays 0: keep all.
        bits = logp.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64) + 2147483648
        x = tl.zeros([], tl.int64)
        half = tl.full([], 2147483648, tl.int64)
        for _ in range(32):
            above = tl.sum(tl.where(key >= x + half, counts, 0))
            x = tl.where(above >= budget, x + half, x)
            half = half // 2
        keep = (key >= x) & nonempty
    else:
        keep = (logp >= threshold) & nonempty
    keep_i = keep.to(tl.int32)
    tl.store(keep_ptr + bh * C + c, keep_i.to(tl.int8), mask=cmask)
    tl.store(kcum_ptr + bh * C + c, tl.cumsum(keep_i, 0), mask=cmask)
    tl.atomic_add(stats_ptr, tl.sum(tl.where(keep, counts, 0)).to(tl.int64))
    tl.debug_barrier()  # the cumulative counts written above are read back by other threads
    n = tl.zeros([], tl.int32)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < NT
        first = tl.load(tile_first_ptr + h * NT + t, mask=tmask, other=0)
        last = tl.load(tile_last_ptr + h * NT + t, mask=tmask, other=0)
        upto_last = tl.load(kcum_ptr + bh * C + last, mask=tmask, other=0)
        before_first = tl.load(kcum_ptr + bh * C + first - 1, mask=tmask & (first > 0), other=0)
        need = ((upto_last - before_first) > 0) & tmask
        need_i = need.to(tl.int32)
        pos = n + tl.cumsum(need_i, 0) - need_i
        tl.store(tiles_ptr + bh * NT + pos, t, mask=need)
        n += tl.sum(need_i)
    tl.store(ntiles_ptr + bh, n)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(n))


class Work:
    """What the selection hands to the attention kernel, all on the device."""

    def __init__(self, keep, tiles, ntiles):
        self.keep = keep  # [B, H, C] int8 kept clusters
        self.tiles = tiles  # [B, H, NT] int32 needed tiles (first ntiles entries)
        self.ntiles = ntiles  # [B, H] int32


def max_clusters() -> int:
    """The selection holds one KV head's clusters in registers; larger indexes use the torch path."""
    return 16384


def lookup(
    query: torch.Tensor,
    kindex: KernelIndex,
    scaling: float,
    threshold: float | None,
    budget: int | None,
    logw: torch.Tensor | None,
    stats: torch.Tensor,
) -> Work:
    """query [B, Hq, T, D] (last dim contiguous) -> the kept clusters and tiles per (row, KV head).

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
    dummy = torch.empty(1, device=dev, dtype=torch.float32)
    if tokens == 1:
        s = torch.empty(batch, heads, group, clusters, device=dev, dtype=torch.float32)
        pm = torch.empty(batch, heads, ncb, group, device=dev, dtype=torch.float32)
        pl = torch.empty_like(pm)
        _score_decode_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, s, pm, pl,
            scaling, heads, clusters, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=_pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        logp = dummy
    else:
        norm = torch.empty(batch, heads, group, tokens, device=dev, dtype=torch.float32)
        _row_norm_kernel[(batch * heads * group, triton.cdiv(tokens, PREFILL_BLOCK_T))](
            query, kindex.centroids, kindex.log_counts, norm,
            scaling, heads, clusters, group, tokens, sq_b, sq_h, sq_t,
            D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        logp = torch.empty(batch, heads, clusters, device=dev, dtype=torch.float32)
        _aggregate_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, norm, logw.float().contiguous(), logp,
            scaling, heads, clusters, group, tokens, sq_b, sq_h, sq_t,
            D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
        )
        s = pm = pl = dummy
    tiles = kindex.tiles
    keep = torch.empty(batch, heads, clusters, device=dev, dtype=torch.int8)
    kcum = torch.empty(batch, heads, clusters, device=dev, dtype=torch.int32)
    tile_list = torch.empty(batch, heads, tiles, device=dev, dtype=torch.int32)
    ntiles = torch.empty(batch, heads, device=dev, dtype=torch.int32)
    block_c = _pow2(clusters)
    _select_kernel[(batch * heads,)](
        logp, s, pm, pl, kindex.counts, kindex.tile_first, kindex.tile_last,
        kcum, keep, tile_list, ntiles, stats,
        float("-inf") if threshold is None else threshold, 0 if budget is None else budget,
        heads, clusters, tiles, group, ncb,
        USE_BUDGET=budget is not None, FROM_SCORES=tokens == 1,
        BLOCK_C=block_c, BLOCK_G=_pow2(group), BLOCK_CB=_pow2(ncb), BLOCK_T=min(TILE_BLOCK, _pow2(tiles)),
        num_warps=16 if block_c >= 4096 else 4,
    )
    return Work(keep, tile_list, ntiles)
