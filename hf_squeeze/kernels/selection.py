"""Triton kernels of the lookup's second half: which clusters to keep, and the kept ones written as a
compact list of key pieces.

Clusters are kept by threshold (log p_j >= threshold) or by budget (clusters in decreasing p until
`budget` keys; the cluster that crosses the budget is kept; equal log p in cluster order), one
program per (row, KV head), the clusters of a head in registers. A budget is a search for the
crossing cluster's log p (`_budget_crossing`): its cost is the chain of reductions over the
clusters, one per step, so the steps split values rather than bits and the last RESOLVE
candidates are settled at once. The compaction writes the kept clusters, in cluster order, as
pieces of at most `KernelIndex.piece_rows` keys (see `layout.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import _chain, launch_options, empty, pow2

COMPACT_BLOCK = 128  # clusters per program when writing the selection list
MAX_CLUSTERS = 32768  # the selection holds one KV head's clusters in registers
SELECT_WARPS: int | None = None  # warps of a selection program (None: 4, 8 or 32 by its clusters)
RESOLVE = 64  # a budget search ends when this few clusters are left around the crossing (a power of two)


@triton.jit
def _cluster_ids(ids_ptr, ncand_ptr, bh, c, C, CAP, HAS_IDS: tl.constexpr):
    """Positions `c` of a (row, head)'s list: the first ncand[bh] entries of the candidate list `ids`
    (HAS_IDS), or clusters 0..C-1 themselves. Returns (valid, cluster ids)."""
    if HAS_IDS:
        cmask = c < tl.load(ncand_ptr + bh)
        ids = tl.load(ids_ptr + bh * CAP + c, mask=cmask, other=0)
    else:
        cmask = c < C
        ids = c
    return cmask, ids


@triton.jit
def _order_key(x):
    """An int32 image of float32 x that orders as x does."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_value(key):
    """The float32 whose `_order_key` is `key`."""
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _budget_crossing(key, counts, nonempty, budget, gap, scratch_ptr, RESOLVE: tl.constexpr):
    """The key of the cluster that crosses `budget` when clusters are taken in decreasing key: the
    largest x with W(x) >= budget, W(x) = keys of the non-empty clusters with key >= x (so keeping
    key >= x keeps the crossing cluster). If they hold fewer keys than the budget: the smallest key.

    A search keeps [lo, hi) around it, W(lo) >= budget > W(hi). Each step splits the interval at
    the middle of its values (the middle of the keys would spend the first steps on the
    exponents), at the cost of one reduction. Once W(lo) - W(hi) <= `gap` (RESOLVE times the
    largest cluster: fewer keys inside cannot fill more clusters) it also counts the clusters
    inside; when at most RESOLVE are left, they are written to `scratch_ptr` [2 * RESOLVE] and the
    crossing is read off their weights in one pass, where a search would take about
    log2(RESOLVE) more steps. (Steps that cut into 4-16 parts at once, at interpolated values
    with W and the cluster count in one int64 reduction, or a start from a histogram of log p that
    the scoring fills with atomics, were measured slower: BENCHMARKS.md.)"""
    lo = tl.min(tl.where(nonempty, key, 2147483647))
    hi = tl.minimum(tl.max(tl.where(nonempty, key, -2147483647)).to(tl.int64) + 1, 2147483647).to(tl.int32)
    w_lo = tl.sum(counts)
    w_hi = w_lo * 0
    inside = w_hi + RESOLVE + 1
    searching = (w_lo >= budget) & (hi.to(tl.int64) - lo.to(tl.int64) > 1)
    while searching:
        if w_lo - w_hi <= gap:
            inside = tl.sum((nonempty & (key >= lo) & (key < hi)).to(tl.int32))
        searching = inside > RESOLVE
        if searching:
            mid = _order_key(_key_value(lo) * 0.5 + _key_value(hi - 1) * 0.5)
            halfway = (lo.to(tl.int64) + (hi.to(tl.int64) - lo.to(tl.int64)) // 2).to(tl.int32)
            mid = tl.where((mid > lo) & (mid < hi), mid, halfway)  # equal or infinite ends
            w = tl.sum(tl.where(key >= mid, counts, 0))
            up = w >= budget
            lo = tl.where(up, mid, lo)
            w_lo = tl.where(up, w, w_lo)
            hi = tl.where(up, hi, mid)
            w_hi = tl.where(up, w_hi, w)
            searching = hi.to(tl.int64) - lo.to(tl.int64) > 1  # (equal keys end at width 1)
    if (inside > 1) & (inside <= RESOLVE) & (hi.to(tl.int64) - lo.to(tl.int64) > 1):
        left = nonempty & (key >= lo) & (key < hi)
        slot = tl.cumsum(left.to(tl.int32), 0) - 1
        tl.store(scratch_ptr + slot, key, mask=left)
        tl.store(scratch_ptr + RESOLVE + slot, counts, mask=left)
        tl.debug_barrier()
        r = tl.arange(0, RESOLVE)
        rk = tl.load(scratch_ptr + r, mask=r < inside, other=0)
        rc = tl.load(scratch_ptr + RESOLVE + r, mask=r < inside, other=0)
        weight = w_hi + tl.sum(tl.where(rk[None, :] >= rk[:, None], rc[None, :], 0), 1)  # W(rk)
        lo = tl.max(tl.where((r < inside) & (weight >= budget), rk, -2147483647))
    return lo


@triton.jit
def _select_kernel(
    logp_ptr, counts_ptr, sizes_ptr, ids_ptr, ncand_ptr, keep_ptr, keep_ids_ptr,
    block_ptr, nsel_ptr, nsizes_ptr, stats_ptr, scratch_ptr,
    threshold, budget, gap, H, C, CAP,
    USE_BUDGET: tl.constexpr, HAS_IDS: tl.constexpr, PIECE: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr, RESOLVE: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """One (batch row, KV head): which candidates to keep, and for each block of BLOCK_S candidates
    the pieces and sizes kept before it (so that `_compact_kernel` can place its ranges).

    Candidates are the C clusters of the head in order, or with HAS_IDS the first ncand[bh]
    entries of the list `ids` [B, H, CAP] (fine clusters under the kept coarse clusters, in
    cluster order); then the keep flags are also scattered to cluster order (`keep_ids_ptr`).
    `counts` (keys per cluster) decide; `sizes` (what the compaction lists: keys of a cluster, or
    fine clusters of a coarse cluster) are cut into pieces of at most PIECE."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    h = bh % H
    c = tl.arange(0, BLOCK_C)
    cmask, ids = _cluster_ids(ids_ptr, ncand_ptr, bh, c, C, CAP, HAS_IDS)
    counts = tl.load(counts_ptr + h * C + ids, mask=cmask, other=0)
    sizes = tl.load(sizes_ptr + h * C + ids, mask=cmask, other=0)
    logp = tl.load(logp_ptr + bh * CAP + c, mask=cmask, other=float("-inf"))
    nonempty = counts > 0
    if USE_BUDGET:
        key = _order_key(logp)
        lo = _budget_crossing(key, counts, nonempty, budget, gap, scratch_ptr + bh * 2 * RESOLVE, RESOLVE)
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
    pieces = tl.where(keep, tl.cdiv(sizes, PIECE), 0)
    kept = tl.where(keep, sizes, 0)
    # Per-block totals and their exclusive prefix: a scan over C / BLOCK_S numbers, not over C.
    NB: tl.constexpr = BLOCK_C // BLOCK_S
    block_pieces = tl.sum(tl.reshape(pieces, [NB, BLOCK_S]), 1)
    block_keys = tl.sum(tl.reshape(kept, [NB, BLOCK_S]), 1)
    b = tl.arange(0, NB)
    tl.store(block_ptr + (bh * NB + b) * 2, tl.cumsum(block_pieces, 0) - block_pieces)
    tl.store(block_ptr + (bh * NB + b) * 2 + 1, tl.cumsum(block_keys, 0) - block_keys)
    nsizes = tl.sum(kept)
    tl.store(nsel_ptr + bh, tl.sum(pieces))
    tl.store(nsizes_ptr + bh, nsizes)
    tl.atomic_add(stats_ptr, nsizes.to(tl.int64))


@triton.jit
def _compact_kernel(
    keep_ptr, sizes_ptr, starts_ptr, ids_ptr, ncand_ptr, block_ptr, sel_start_ptr, sel_len_ptr, sel_pos_ptr,
    H, C, CAP, PC, NB, MAX_PIECES,
    HAS_IDS: tl.constexpr, LISTS: tl.constexpr, PIECE: tl.constexpr, BLOCK_S: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """A block of candidates of one (batch row, KV head): write its kept ones as pieces of at most
    PIECE sizes into the selection list, in candidate order (starts; with LISTS also lengths and
    sizes before). With PIECE = 1 this lists every unit: the fine clusters of the kept coarse ones."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    h = bh % H
    c = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    cmask, ids = _cluster_ids(ids_ptr, ncand_ptr, bh, c, C, CAP, HAS_IDS)
    keep = tl.load(keep_ptr + bh * CAP + c, mask=cmask, other=0) != 0
    sizes = tl.load(sizes_ptr + h * C + ids, mask=cmask, other=0)
    starts = tl.load(starts_ptr + h * C + ids, mask=cmask, other=0)
    pieces = tl.where(keep, tl.cdiv(sizes, PIECE), 0)
    kept = tl.where(keep, sizes, 0)
    slot = tl.load(block_ptr + (bh * NB + blk) * 2) + tl.cumsum(pieces, 0) - pieces
    position = tl.load(block_ptr + (bh * NB + blk) * 2 + 1) + tl.cumsum(kept, 0) - kept
    for j in range(0, MAX_PIECES):
        write = keep & (j < pieces)
        tl.store(sel_start_ptr + bh * PC + slot + j, starts + j * PIECE, mask=write)
        if LISTS:
            tl.store(sel_len_ptr + bh * PC + slot + j, tl.minimum(sizes - j * PIECE, PIECE), mask=write)
            tl.store(sel_pos_ptr + bh * PC + slot + j, position + j * PIECE, mask=write)


def select(logp, counts, sizes, threshold, budget, largest, piece, stats, ids=None, ncand=None, keep_ids=None):
    """Launch the selection over the C clusters of `counts` [H, C] (or the listed candidates `ids`
    [B, H, CAP], the first ncand[b, h] of them); `largest`: the most keys in one of them. Returns the
    keep flags [B, H, CAP] (candidate order), the per-block offsets for `_compact`, and per (row,
    head) the pieces and sizes kept."""
    batch, heads, cap = logp.shape
    dev = logp.device
    block_c = pow2(cap, COMPACT_BLOCK)
    keep = empty(dev, torch.int8, batch, heads, cap)
    block_offsets = empty(dev, torch.int32, batch, heads, block_c // COMPACT_BLOCK, 2)
    nsel, nsizes = (empty(dev, torch.int32, batch, heads) for _ in range(2))
    scratch = empty(dev, torch.int32, batch * heads * 2 * RESOLVE) if budget is not None else nsel
    has_ids = ids is not None
    _select_kernel[(batch * heads,)](
        logp, counts, sizes, ids if has_ids else counts, ncand if has_ids else nsel, keep,
        keep_ids if has_ids else keep, block_offsets, nsel, nsizes, stats, scratch,
        float("-inf") if threshold is None else threshold, 0 if budget is None else budget,
        min(RESOLVE * largest, 2**31 - 1), heads, counts.shape[1], cap,
        USE_BUDGET=budget is not None, HAS_IDS=has_ids, PIECE=piece, BLOCK_C=block_c, BLOCK_S=COMPACT_BLOCK,
        RESOLVE=RESOLVE,
        num_warps=SELECT_WARPS or (4 if block_c < 4096 else 8 if block_c <= 8192 else 32),
        **launch_options(logp.device),
    )
    return keep, block_offsets, nsel, nsizes


def compact(keep, block_offsets, sizes, starts, piece, max_pieces, out_starts, out_lengths=None, out_positions=None,
             ids=None, ncand=None):
    """Write the kept candidates as pieces of at most `piece` sizes (`max_pieces` pieces at most per
    candidate) into `out_starts` [B, H, P] (and lengths / sizes before, when given)."""
    batch, heads, cap = keep.shape
    blocks = block_offsets.shape[2]
    has_ids, lists = ids is not None, out_lengths is not None
    _compact_kernel[(batch * heads, blocks)](
        keep, sizes, starts, ids if has_ids else sizes, ncand if has_ids else sizes, block_offsets,
        out_starts, out_lengths if lists else out_starts, out_positions if lists else out_starts,
        heads, sizes.shape[1], cap, out_starts.shape[-1], blocks, max_pieces,
        HAS_IDS=has_ids, LISTS=lists, PIECE=piece, BLOCK_S=COMPACT_BLOCK,
        **launch_options(keep.device),
    )
