"""Triton kernels of the lookup's first half: centroid scores and the estimated probability.

    log p_j = max over the G query heads of
              log mean over the valid query tokens of exp(s_j - log sum_k N_k exp(s_k))

Decode (one query token) and prefill (many) score differently: a decode step has only G query rows,
so the centroids are split over many programs and the normaliser is reduced in `_decode_logp_kernel`;
a prefill first computes each query row's normaliser, then each program averages the probabilities
of a block of centroids over the input tokens. The fine level of a two-level index scores only a
candidate list of fine centroids, with a normaliser that mixes fine and coarse terms (`lookup.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _chain, launch_options, LN2, LOG2E, dot_precision, empty, pow2

SCORE_BLOCK_C = 128  # centroids per program when scoring a decode step
# A prefill's scoring tiles (1,024 tokens over 128K keys, H200, benchmarks/bench_scoring_tiles.py: 54
# tiles of each kernel). The aggregate: a program owns PREFILL_BLOCK_C centroids and steps over
# PREFILL_BLOCK_T query tokens: 64 x 128, 4 warps, 3 pipelined loads (180.5 us; the next best 183.9).
PREFILL_BLOCK_C = 64
PREFILL_BLOCK_T = 128
PREFILL_WARPS = 4
PREFILL_STAGES = 3
# The normaliser: a program owns NORM_BLOCK_T query tokens of one query head and steps over
# NORM_BLOCK_C centroids: 128 x 128, 4 warps, 2 loads (152.9 us; the aggregate's tile 169.7).
NORM_BLOCK_T = 128
NORM_BLOCK_C = 128
NORM_WARPS = 4
NORM_STAGES = 2


@triton.jit
def _score_decode_kernel(
    q_ptr, cent_ptr, logn_ptr, s_ptr, pm_ptr, pl_ptr,
    scaling, H, C, G, NCB, sq_b, sq_h,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """One decode token: scores of a block of centroids for the G query heads of a KV head.

    Writes the masked scores s [B, H, G, C] and, per block, the max and the sum of exp of
    s + log N (the pieces of the normaliser) [B, H, NCB, G].
    """
    _chain(CHAIN)
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
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """One decode token, the fine level of a two-level index: scores of a block of the candidate fine
    centroids (the children of the kept coarse clusters: the first ncand[bh] entries of `ids`).

    The block's pieces of the mixed normaliser [B, H, NCB, G] hold its fine terms and the coarse
    terms N_k exp(s1_k) of the rejected coarse clusters of the same block index, so no fine
    centroid under a rejected coarse cluster is read. Blocks past the candidates load nothing.
    The programs also clear the C fine-order keep flags (the selection sets them)."""
    _chain(CHAIN)
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
def _mass_step(q, cent, logn, m, l, qk_scale, PRECISION: tl.constexpr):
    """Fold a block of centroids into the running log sum_k N_k exp(s_k) (max m, sum l) of each query
    row, in base 2: `qk_scale` = scaling * log2 e, m in base-2 units (log2 of the sum = m + log2 l)."""
    w = tl.dot(q, tl.trans(cent), input_precision=PRECISION) * qk_scale + (logn * LOG2E)[None, :]
    m_new = tl.maximum(m, tl.max(w, 1))
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(w - m_safe[:, None]), 1)
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
def _mass_of_rows(q, cent_ptr, logn_ptr, rows, valid, m, l, qk_scale, D: tl.constexpr, PRECISION: tl.constexpr):
    """`_mass_step` over the centroids of rows `rows` of a [., D] table (where `valid`)."""
    d = tl.arange(0, D)
    cent = tl.load(cent_ptr + rows[:, None] * D + d[None, :], mask=valid[:, None], other=0.0)
    logn = tl.load(logn_ptr + rows, mask=valid, other=float("-inf"))
    return _mass_step(q, cent, logn, m, l, qk_scale, PRECISION)


@triton.jit
def _norm_start(q_ptr, bhg, H, G, T, sq_b, sq_h, sq_t, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """A normaliser program's (row, head, query head) and its block of query rows, with an empty
    running log-sum-exp (max m, sum l)."""
    bh = bhg // G
    h = bh % H
    q, t = _prefill_rows(q_ptr, bh // H, h, bhg % G, G, T, tl.program_id(1), sq_b, sq_h, sq_t, D, BLOCK_T)
    return bh, h, q, t, tl.full([BLOCK_T], float("-inf"), tl.float32), tl.zeros([BLOCK_T], tl.float32)


@triton.jit
def _row_norm_kernel(
    q_ptr, cent_ptr, logn_ptr, norm_ptr,
    qk_scale, H, C, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """Prefill: log2 sum_k N_k exp(s_k) for a block of tokens of one query head: norm [B, H, G, T]
    (base 2, as `_aggregate_kernel` reads it)."""
    _chain(CHAIN)
    bhg = tl.program_id(0)
    bh, h, q, t, m, l = _norm_start(q_ptr, bhg, H, G, T, sq_b, sq_h, sq_t, D, BLOCK_T)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m, l = _mass_of_rows(q, cent_ptr, logn_ptr, h * C + c, c < C, m, l, qk_scale, D, PRECISION)
    tl.store(norm_ptr + bhg * T + t, m + tl.log2(l), mask=t < T)


@triton.jit
def _mixed_norm_kernel(
    q_ptr, cent_ptr, logn_ptr, ids_ptr, ncand_ptr, cent1_ptr, logn1_ptr, keep1_ptr, norm_ptr,
    qk_scale, H, C, C1, CAP, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """Prefill, the fine level of a two-level index: the mixed normaliser of a block of tokens of one query
    head: fine terms of the candidate fine centroids (the children of the kept coarse clusters,
    listed in `ids`), coarse terms of the rejected coarse clusters. norm [B, H, G, T], base 2."""
    _chain(CHAIN)
    bhg = tl.program_id(0)
    bh, h, q, t, m, l = _norm_start(q_ptr, bhg, H, G, T, sq_b, sq_h, sq_t, D, BLOCK_T)
    n = tl.load(ncand_ptr + bh)
    for c0 in range(0, n, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=c < n, other=0)
        m, l = _mass_of_rows(q, cent_ptr, logn_ptr, h * C + ids, c < n, m, l, qk_scale, D, PRECISION)
    for c0 in range(0, C1, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        rejected = (c < C1) & (tl.load(keep1_ptr + bh * C1 + c, mask=c < C1, other=1) == 0)
        m, l = _mass_of_rows(q, cent1_ptr, logn1_ptr, h * C1 + c, rejected, m, l, qk_scale, D, PRECISION)
    tl.store(norm_ptr + bhg * T + t, m + tl.log2(l), mask=t < T)


@triton.jit
def _aggregate_kernel(
    q_ptr, cent_ptr, logn_ptr, ids_ptr, ncand_ptr, keep_ptr, norm_ptr, logw_ptr, logp_ptr,
    qk_scale, H, C, CAP, NCB, G, T, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    HAS_IDS: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """Prefill: log p of a block of centroids, mean over the tokens (log domain), max over G.

    Centroids are the rows of the score tile and tokens its columns, so the running log-sum-exp
    over tokens is a row reduction, as in flash attention; in base 2 (`qk_scale` = scaling * log2 e,
    the normaliser `norm` in base 2), log p written in natural units (sums against a fixed reference
    instead of the running max, checked and taken again when out of range, were measured slower on
    the benchmark's scores: BENCHMARKS.md). With HAS_IDS the centroids are the first ncand[bh] of
    the candidate list `ids` [B, H, CAP] (the fine level of a two-level index): blocks past them skip
    the work, and the programs clear the C fine-order keep flags (set later by the selection)."""
    _chain(CHAIN)
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
            shift = tl.load(logw_ptr + b * T + t, mask=t < T, other=float("-inf")) * LOG2E
            shift -= tl.load(norm_ptr + (bh * G + g) * T + t, mask=t < T, other=0.0)
            x = tl.dot(cent, tl.trans(q), input_precision=PRECISION) * qk_scale + shift[None, :]
            m_new = tl.maximum(m, tl.max(x, 1))
            m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
            l = l * tl.exp2(m - m_safe) + tl.sum(tl.exp2(x - m_safe[:, None]), 1)
            m = m_new
        best = tl.maximum(best, m + tl.log2(l))
    best = tl.where(logn > float("-inf"), best * LN2, float("-inf"))
    tl.store(logp_ptr + bh * CAP + c, best, mask=c < n)


@triton.jit
def _decode_logp_kernel(
    s_ptr, pm_ptr, pl_ptr, ncand_ptr, logp_ptr, C, G, NCB,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CB: tl.constexpr, HAS_IDS: tl.constexpr,
    CHAIN: tl.constexpr = False,
):
    """Decode: finish each query head's normaliser from the per-block pieces, then
    log p = max over the group of (s - normaliser), for a block of centroids (with HAS_IDS: of
    the first ncand[bh] candidates)."""
    _chain(CHAIN)
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


def score_every(query, centroids, log_counts, scaling, logw):
    """log p [B, H, C] of every centroid of a flat index (or of the coarse level), and for one
    query token also the scores s [B, H, G, C] (None for a prefill)."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = log_counts.shape
    group = q_heads // heads
    dev = query.device
    precision = dot_precision(query.dtype)
    sq_b, sq_h = query.stride(0), query.stride(1)
    logp = empty(dev, torch.float32, batch, heads, clusters)
    if tokens == 1:
        ncb = triton.cdiv(clusters, SCORE_BLOCK_C)
        s = empty(dev, torch.float32, batch, heads, group, clusters)
        pm = empty(dev, torch.float32, batch, heads, ncb, group)
        pl = torch.empty_like(pm)
        _score_decode_kernel[(batch * heads, ncb)](
            query, centroids, log_counts, s, pm, pl,
            scaling, heads, clusters, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
            **launch_options(dev),
        )
        _decode_logp_kernel[(batch * heads, ncb)](
            s, pm, pl, pm, logp, clusters, group, ncb,
            BLOCK_C=SCORE_BLOCK_C, BLOCK_G=pow2(group), BLOCK_CB=pow2(ncb), HAS_IDS=False,
            **launch_options(dev),
        )
        return logp, s
    norm = prefill_normaliser(query, centroids, log_counts, scaling)
    return prefill_log_p(query, centroids, log_counts, scaling, logw, norm, logp), None


def prefill_normaliser(query, centroids, log_counts, scaling, tile=None) -> torch.Tensor:
    """A prefill's log2 sum_k N_k exp(s_k) per query row over every centroid of a flat index (or of the
    coarse level): [B, H, G, T]. `tile`: (tokens, centroids, warps, stages), default NORM_*."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = log_counts.shape
    block_t, block_c, warps, stages = tile or (NORM_BLOCK_T, NORM_BLOCK_C, NORM_WARPS, NORM_STAGES)
    norm = empty(query.device, torch.float32, batch, heads, q_heads // heads, tokens)
    _row_norm_kernel[(batch * q_heads, triton.cdiv(tokens, block_t))](
        query, centroids, log_counts, norm,
        scaling * LOG2E.value, heads, clusters, q_heads // heads, tokens, *query.stride()[:3],
        D=dim, BLOCK_T=block_t, BLOCK_C=block_c, PRECISION=dot_precision(query.dtype),
        num_warps=warps, num_stages=stages,
        **launch_options(query.device),
    )
    return norm


def prefill_log_p(query, centroids, log_counts, scaling, logw, norm, logp, tile=None) -> torch.Tensor:
    """A prefill's log p of every centroid of a flat index (or of the coarse level) into `logp` [B, H, C],
    given the rows' normaliser `norm` (`prefill_normaliser`). `tile`: (centroids, tokens, warps,
    stages), default PREFILL_*."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = log_counts.shape
    block_c, block_t, warps, stages = tile or (PREFILL_BLOCK_C, PREFILL_BLOCK_T, PREFILL_WARPS, PREFILL_STAGES)
    ncb = triton.cdiv(clusters, block_c)
    _aggregate_kernel[(batch * heads, ncb)](
        query, centroids, log_counts, norm, norm, norm, norm, logw, logp,
        scaling * LOG2E.value, heads, clusters, clusters, ncb, q_heads // heads, tokens, *query.stride()[:3],
        D=dim, BLOCK_T=block_t, BLOCK_C=block_c, PRECISION=dot_precision(query.dtype), HAS_IDS=False,
        num_warps=warps, num_stages=stages,
        **launch_options(query.device),
    )
    return logp


def score_candidates(query, kindex, scaling, logw, ids, ncand, s1, keep1, keep):
    """Level 2 of a two-level index: log p [B, H, CAP] (first ncand[b, h] valid) of the candidate
    fine centroids `ids` [B, H, CAP], normalised by the mixed sum (fine terms of the candidates,
    coarse terms of the rejected coarse clusters). Clears the fine-order `keep` flags on the way."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters, coarse = kindex.heads, kindex.clusters, kindex.coarse_clusters
    cap = ids.shape[-1]
    group = q_heads // heads
    dev = query.device
    precision = dot_precision(query.dtype)
    # A fixed grid over the capacity (and the coarse clusters, for their normaliser terms):
    # blocks past a head's candidates load nothing.
    ncb = triton.cdiv(max(cap, coarse), SCORE_BLOCK_C if tokens == 1 else PREFILL_BLOCK_C)
    sq_b, sq_h, sq_t = query.stride(0), query.stride(1), query.stride(2)
    logp = empty(dev, torch.float32, batch, heads, cap)
    if tokens == 1:
        s = empty(dev, torch.float32, batch, heads, group, cap)
        pm = empty(dev, torch.float32, batch, heads, ncb, group)
        pl = torch.empty_like(pm)
        _score_fine_decode_kernel[(batch * heads, ncb)](
            query, kindex.centroids, kindex.log_counts, ids, ncand, s1, kindex.coarse_log_counts, keep1, keep, s, pm, pl,
            scaling, heads, clusters, coarse, cap, group, ncb, sq_b, sq_h,
            D=dim, BLOCK_G=pow2(group, 16), BLOCK_C=SCORE_BLOCK_C, PRECISION=precision,
            **launch_options(dev),
        )
        _decode_logp_kernel[(batch * heads, ncb)](
            s, pm, pl, ncand, logp, cap, group, ncb,
            BLOCK_C=SCORE_BLOCK_C, BLOCK_G=pow2(group), BLOCK_CB=pow2(ncb), HAS_IDS=True,
            **launch_options(dev),
        )
        return logp
    norm = empty(dev, torch.float32, batch, heads, group, tokens)
    _mixed_norm_kernel[(batch * heads * group, triton.cdiv(tokens, NORM_BLOCK_T))](
        query, kindex.centroids, kindex.log_counts, ids, ncand, kindex.coarse_centroids, kindex.coarse_log_counts, keep1, norm,
        scaling * LOG2E.value, heads, clusters, coarse, cap, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=NORM_BLOCK_T, BLOCK_C=NORM_BLOCK_C, PRECISION=precision,
        num_warps=NORM_WARPS, num_stages=NORM_STAGES,
        **launch_options(dev),
    )
    _aggregate_kernel[(batch * heads, ncb)](
        query, kindex.centroids, kindex.log_counts, ids, ncand, keep, norm, logw, logp,
        scaling * LOG2E.value, heads, clusters, cap, ncb, group, tokens, sq_b, sq_h, sq_t,
        D=dim, BLOCK_T=PREFILL_BLOCK_T, BLOCK_C=PREFILL_BLOCK_C, PRECISION=precision, HAS_IDS=True,
        num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES,
        **launch_options(dev),
    )
    return logp
