"""Triton kernels of the squeezed attention: exact attention over the kept clusters of the fixed
context, the dense part (sinks + observation window) and the dynamic tokens, in one online-softmax
pass per program.

Programs own the G query heads of one KV head (rows ordered token-major, row = t * G + g), so each
K/V row is loaded once for the whole group. The work of a (batch row, KV head) is a list of items:
the kept clusters, then chunks of the dense part, then chunks of the dynamic keys up to the causal
limit of the program's tokens. `SPLITS` programs share that list evenly (flash-decoding); each
writes a partial output and its log-sum-exp, and `_merge_kernel` combines them. List lengths are
read on the device, so launch shapes never depend on the selection (CUDA-graph capturable).

- Decode (`_decode_kernel`) reads each kept cluster's rows where they are: it is bound by bytes,
  and reading them once is the minimum.
- Prefill first copies the kept rows into one contiguous buffer (`_gather_kernel`, one read and
  one write of the kept bytes), so that `_prefill_kernel` streams full K/V tiles from contiguous
  memory, which is what keeps the matrix units fed when hundreds of query rows share each tile.

The online softmax runs in base 2: the launcher folds log2 e into the score scale, the running max
is kept in base-2 units and every log-sum-exp leaves a kernel in natural units. A prefill is bound
by the arithmetic around its exponentials (BENCHMARKS.md: 673 -> 522 us of attention per layer at
128K for this and unmasked full tiles), so each operation per score counts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .layout import KernelIndex
from .common import _chain, launch_options, LN2, LOG2E, dot_precision, pow2
from .lookup import KeptRanges

# The decode tile: (pieces of `KernelIndex.piece_rows` kept rows per step, warps per program), for
# pieces of 8 keys. With pins the larger tile pays, without them it does not (H200, keep 0.1,
# 128K / 512K, 8-key pieces: pinned 73.1 -> 67.2 / 234.4 -> 211.0 us with 128 rows instead of 64;
# the paper's lookup 66.6 -> 64.4 / 214.6 -> 206.9 us with 64 rows instead of 128; BENCHMARKS.md).
DECODE_TILE = (8, 4)
PINNED_DECODE_TILE = (16, 8)
DECODE_MAX_SPLITS = 64  # programs that share one (row, KV head)'s decode, at most
# Software pipelining of the gathered loads does not pay here (bench_kernels.py), nor loading the next
# tile ahead by hand, nor capping the registers (254 per thread) for more programs per multiprocessor
# (benchmarks/bench_attention_tiles.py; the last two at b9538f1, BENCHMARKS.md).
DECODE_STAGES = 1
# The prefill tile: query rows x keys per step, warps, pipelined loads. 128 rows over 8 warps beat 64
# over 4 by 8-21% at 256 and 1,024 tokens over 128K and 512K keys (H200, bench_attention_tiles.py);
# up to 64 rows take the 64-row tile over 4 warps (8 warps on 64 rows were the slowest shape).
PREFILL_BLOCK_M = 128
PREFILL_BLOCK_N = 64
PREFILL_WARPS = 8
PREFILL_STAGES = 3
GATHER_PIECES = 4
# Whether a prefill's gather and attention are chained to the kernels before them (programmatic
# dependent launch, `common.launch_options`); a decode's always are. Chained, the prefill of 1,024
# tokens over 128K keys took 883.6 / 881.7 us against 862.8 / 863.2 with only its lookup chained
# (H200, bench_kernels.py, two runs each; 868.9 / 867.5 with nothing chained).
CHAIN_PREFILL = False


@triton.jit
def _online_step(q, k, v, visible, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr, MASKED: tl.constexpr = True):
    """One tile of online softmax in base 2 (`qk_scale` = scaling * log2 e; the running max `m_i` is in
    base-2 units, `_finish` turns it back); `visible` [BLOCK_M, BLOCK_N] (or broadcastable), not read
    unless MASKED."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
    # the max of the raw products, scaled after (qk_scale > 0): each score is then scaled and
    # shifted by one fused multiply-add
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _step_rows(q, k_ptr, v_ptr, offsets, valid, visible, m_i, l_i, acc, qk_scale, PRECISION: tl.constexpr):
    """Load the K/V rows at element `offsets` [BLOCK_N, D] (rows where `valid`) and take a step."""
    k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
    return _online_step(q, k, v, visible, m_i, l_i, acc, qk_scale, PRECISION)


@triton.jit
def _dense_and_dynamic(
    q, t, start, end, first, dk_ptr, dv_ptr, yk_ptr, yv_ptr, kvalid_ptr, b, h, SW, LD, T, sy_b, sy_h, sy_n,
    m_i, l_i, acc, qk_scale, D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KVALID: tl.constexpr, PRECISION: tl.constexpr,
):
    """Steps `first`... of the work list in [start, end): the dense part (sinks + window), then the
    dynamic keys, causal for query tokens `t` (the last T of the LD dynamic tokens)."""
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    n_dense = tl.cdiv(SW, BLOCK_N)
    for i in range(tl.maximum(start, first), tl.minimum(end, first + n_dense)):
        rows = (i - first) * BLOCK_N + n
        valid = rows < SW
        offsets = (h * SW + rows)[:, None] * D + d[None, :]
        m_i, l_i, acc = _step_rows(q, dk_ptr, dv_ptr, offsets, valid, valid[None, :], m_i, l_i, acc, qk_scale, PRECISION)
    for i in range(tl.maximum(start, first + n_dense), end):
        rows = (i - first - n_dense) * BLOCK_N + n
        valid = rows < LD
        if HAS_KVALID:
            valid = valid & (tl.load(kvalid_ptr + b * LD + rows, mask=valid, other=0) != 0)
        visible = valid[None, :] & (rows[None, :] <= (LD - T + t)[:, None])
        offsets = b * sy_b + h * sy_h + rows[:, None] * sy_n + d[None, :]
        m_i, l_i, acc = _step_rows(q, yk_ptr, yv_ptr, offsets, valid, visible, m_i, l_i, acc, qk_scale, PRECISION)
    return m_i, l_i, acc


@triton.jit
def _finish(acc, m_i, l_i, out_ptr, po_ptr, plse_ptr, lse_ptr, b, h, bh, sp, r, rmask, G, R, so_b, so_t, so_h,
            D: tl.constexpr, SPLITS: tl.constexpr, STORE_LSE: tl.constexpr):
    """Write the normalised output (one split; with STORE_LSE also the rows' log-sum-exp) or this
    split's partial output and log-sum-exp."""
    d = tl.arange(0, D)
    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * LN2, float("-inf"))
    if SPLITS == 1:
        t = r // G
        g = r % G
        optr = out_ptr + b * so_b + t[:, None] * so_t + (h * G + g)[:, None] * so_h + d[None, :]
        tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
        if STORE_LSE:
            tl.store(lse_ptr + bh * R + r, lse, mask=rmask)
    else:
        part = (bh * SPLITS + sp) * R + r
        tl.store(po_ptr + part[:, None] * D + d[None, :], o, mask=rmask[:, None])
        tl.store(plse_ptr + part, lse, mask=rmask)


@triton.jit
def _split_range(total, SPLITS: tl.constexpr):
    per = tl.cdiv(total, SPLITS)
    start = tl.program_id(2) * per
    return start, tl.minimum(total, start + per)


@triton.jit
def _pieces(i, n_pieces, sel_start_ptr, sel_len_ptr, bh, PC, n, PIECE: tl.constexpr, BLOCK_N: tl.constexpr):
    """First row and length of the kept pieces that decode step `i` reads, one per tile row (length 0
    past the list)."""
    piece = i * (BLOCK_N // PIECE) + n // PIECE
    first = tl.load(sel_start_ptr + bh * PC + piece, mask=piece < n_pieces, other=0)
    length = tl.load(sel_len_ptr + bh * PC + piece, mask=piece < n_pieces, other=0)
    return first, length


@triton.jit
def _kept_rows(first, length, k_ptr, v_ptr, pin_mask_ptr, bh, h, NC, n, d, D: tl.constexpr, PIECE: tl.constexpr,
               HAS_PINS: tl.constexpr):
    """Load the K/V rows of a decode tile's kept pieces -> (k, v, which rows the scores see)."""
    within = n % PIECE
    valid = within < length
    visible = valid
    if HAS_PINS:
        # A pinned key counts elsewhere, once: here it is left out of the scores, not out of the loads,
        # so that the K/V loads need not wait for the pin mask's (faster on the H200 at 128K and
        # 512K, BENCHMARKS.md; the few rows in both are read twice).
        visible = valid & (tl.load(pin_mask_ptr + bh * NC + first + within, mask=valid, other=1) == 0)
    offsets = (h * NC + first + within)[:, None] * D + d[None, :]
    k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
    return k, v, visible


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, yk_ptr, yv_ptr,
    sel_start_ptr, sel_len_ptr, nsel_ptr, kvalid_ptr, pin_rows_ptr, pin_count_ptr, pin_mask_ptr,
    out_ptr, po_ptr, plse_ptr, stats_ptr, steps_ptr,
    qk_scale, H, G, PC, NC, SW, LD, NP,
    sq_b, sq_h, sy_b, sy_h, sy_n, so_b, so_t, so_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PIECE: tl.constexpr, SPLITS: tl.constexpr,
    HAS_KVALID: tl.constexpr, HAS_PINS: tl.constexpr, PRECISION: tl.constexpr,
    COUNT_PINS: tl.constexpr, COUNT_STEP: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """One query token: kept keys read where they are (pinned ones left out of the scores), the
    pinned keys, then the dense part and the dynamic keys. The counters need no launch of their
    own: with COUNT_PINS `stats` [1] int64 adds the pinned keys read, with COUNT_STEP `steps` one."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    r = tl.arange(0, BLOCK_M)  # = g, T = 1
    rmask = r < G
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * sq_b + (h * G + r)[:, None] * sq_h + d[None, :], mask=rmask[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    # Steps: pieces of kept clusters, BLOCK_N // PIECE at a time; pinned keys; dense and dynamic chunks.
    n_pieces = tl.load(nsel_ptr + bh)
    n_sel = tl.cdiv(n_pieces, BLOCK_N // PIECE)
    n_pinned = 0
    if HAS_PINS:
        n_pinned = tl.load(pin_count_ptr + bh)
    if tl.program_id(2) == 0:
        if COUNT_PINS:
            tl.atomic_add(stats_ptr, n_pinned.to(tl.int64))
        if COUNT_STEP:
            if bh == 0:
                tl.atomic_add(steps_ptr, 1)
    n_pin = tl.cdiv(n_pinned, BLOCK_N)
    n_dense = tl.cdiv(SW, BLOCK_N)
    start, end = _split_range(n_sel + n_pin + n_dense + tl.cdiv(LD, BLOCK_N), SPLITS)
    for i in range(start, tl.minimum(end, n_sel)):
        first, length = _pieces(i, n_pieces, sel_start_ptr, sel_len_ptr, bh, PC, n, PIECE, BLOCK_N)
        k, v, visible = _kept_rows(first, length, k_ptr, v_ptr, pin_mask_ptr, bh, h, NC, n, d, D, PIECE, HAS_PINS)
        m_i, l_i, acc = _online_step(q, k, v, visible[None, :], m_i, l_i, acc, qk_scale, PRECISION)
    if HAS_PINS:  # (without pins the pointers are placeholders: no code may load from them)
        for i in range(tl.maximum(start, n_sel), tl.minimum(end, n_sel + n_pin)):
            j = (i - n_sel) * BLOCK_N + n
            valid = j < n_pinned
            key = tl.load(pin_rows_ptr + bh * NP + j, mask=valid, other=0)
            offsets = (h * NC + key)[:, None] * D + d[None, :]
            m_i, l_i, acc = _step_rows(q, k_ptr, v_ptr, offsets, valid, valid[None, :], m_i, l_i, acc, qk_scale, PRECISION)
    m_i, l_i, acc = _dense_and_dynamic(
        q, r * 0, start, end, n_sel + n_pin, dk_ptr, dv_ptr, yk_ptr, yv_ptr, kvalid_ptr, b, h, SW, LD, 1,
        sy_b, sy_h, sy_n, m_i, l_i, acc, qk_scale, D, BLOCK_N, HAS_KVALID, PRECISION,
    )
    _finish(acc, m_i, l_i, out_ptr, po_ptr, plse_ptr, out_ptr, b, h, bh, tl.program_id(2), r, rmask, G, G,
            so_b, so_t, so_h, D, SPLITS, False)


@triton.jit
def _gather_kernel(
    k_ptr, v_ptr, sel_start_ptr, sel_len_ptr, sel_pos_ptr, nsel_ptr, gk_ptr, gv_ptr,
    H, PC, NC, CAP,
    D: tl.constexpr, BLOCK_N: tl.constexpr, PIECE: tl.constexpr, SPLITS: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """Copy the kept rows of one (batch row, KV head) into a contiguous buffer [CAP, D]."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    h = bh % H
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    n_pieces = tl.load(nsel_ptr + bh)
    start, end = _split_range(tl.cdiv(n_pieces, BLOCK_N // PIECE), SPLITS)
    for i in range(start, end):
        piece = i * (BLOCK_N // PIECE) + n // PIECE
        within = n % PIECE
        first = tl.load(sel_start_ptr + bh * PC + piece, mask=piece < n_pieces, other=0)
        length = tl.load(sel_len_ptr + bh * PC + piece, mask=piece < n_pieces, other=0)
        pos = tl.load(sel_pos_ptr + bh * PC + piece, mask=piece < n_pieces, other=0)
        valid = (within < length)[:, None]
        src = (h * NC + first + within)[:, None] * D + d[None, :]
        dst = (bh * CAP + pos + within)[:, None] * D + d[None, :]
        tl.store(gk_ptr + dst, tl.load(k_ptr + src, mask=valid), mask=valid)
        tl.store(gv_ptr + dst, tl.load(v_ptr + src, mask=valid), mask=valid)


@triton.jit
def _prefill_kernel(
    q_ptr, gk_ptr, gv_ptr, dk_ptr, dv_ptr, yk_ptr, yv_ptr, nkeys_ptr, kvalid_ptr,
    out_ptr, po_ptr, plse_ptr, lse_ptr, co_ptr, clse_ptr,
    qk_scale, H, G, T, SW, LD, CAP, sg_b,
    sq_b, sq_h, sq_t, sy_b, sy_h, sy_n, so_b, so_t, so_h, sc_h, sc_r, sl_h, sl_r,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    HAS_KVALID: tl.constexpr, PRECISION: tl.constexpr, STORE_LSE: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    CHAIN: tl.constexpr = False,
):
    """A block of query rows over the gathered kept keys (rows b * sg_b + h * CAP + i; sg_b = 0 when
    every key is read, in place), the dense part and the dynamic keys. With HAS_CONTEXT the rows'
    attention over every clustered key is given (`read_all.clustered_attention`: output `co`, log-sum-exp
    `clse`, row (b * G + g) * T + t of head h): the first split starts from it and no program reads
    a clustered key."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    b = bh // H
    h = bh % H
    R = T * G
    r = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = r < R
    t = r // G
    g = r % G
    d = tl.arange(0, D)
    n = tl.arange(0, BLOCK_N)
    q = tl.load(
        q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + t[:, None] * sq_t + d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)

    if HAS_CONTEXT:
        n_keys = 0
        if tl.program_id(2) == 0:  # the state after every clustered key: max = lse, sum = 1, acc = out
            row = (b * G + g) * T + t
            m_i = tl.load(clse_ptr + h * sl_h + row * sl_r, mask=rmask, other=float("-inf")) * LOG2E
            l_i = tl.where(rmask, 1.0, 0.0)
            acc = tl.load(co_ptr + h * sc_h + row[:, None] * sc_r + d[None, :], mask=rmask[:, None], other=0.0)
            acc = acc.to(tl.float32)
    else:
        n_keys = tl.load(nkeys_ptr + bh)
    n_kept = tl.cdiv(n_keys, BLOCK_N)
    n_fixed = n_kept + tl.cdiv(SW, BLOCK_N)
    last_token = tl.minimum(((mb + 1) * BLOCK_M - 1) // G, T - 1)
    start, end = _split_range(n_fixed + tl.cdiv(LD - T + last_token + 1, BLOCK_N), SPLITS)
    full = n_keys // BLOCK_N  # tiles of kept keys with no row to mask
    for i in range(start, tl.minimum(end, full)):
        offsets = (b * sg_b + h * CAP + i * BLOCK_N + n)[:, None] * D + d[None, :]
        k = tl.load(gk_ptr + offsets)
        v = tl.load(gv_ptr + offsets)
        m_i, l_i, acc = _online_step(q, k, v, None, m_i, l_i, acc, qk_scale, PRECISION, MASKED=False)
    for i in range(tl.maximum(start, full), tl.minimum(end, n_kept)):
        rows = i * BLOCK_N + n
        valid = rows < n_keys
        offsets = (b * sg_b + h * CAP + rows)[:, None] * D + d[None, :]
        m_i, l_i, acc = _step_rows(q, gk_ptr, gv_ptr, offsets, valid, valid[None, :], m_i, l_i, acc, qk_scale, PRECISION)
    m_i, l_i, acc = _dense_and_dynamic(
        q, t, start, end, n_kept, dk_ptr, dv_ptr, yk_ptr, yv_ptr, kvalid_ptr, b, h, SW, LD, T, sy_b, sy_h, sy_n,
        m_i, l_i, acc, qk_scale, D, BLOCK_N, HAS_KVALID, PRECISION,
    )
    _finish(acc, m_i, l_i, out_ptr, po_ptr, plse_ptr, lse_ptr, b, h, bh, tl.program_id(2), r, rmask, G, R,
            so_b, so_t, so_h, D, SPLITS, STORE_LSE)


@triton.jit
def _merge_kernel(
    po_ptr, plse_ptr, out_ptr, lse_ptr, H, G, T, so_b, so_t, so_h,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr, CHAIN: tl.constexpr = False,
):
    """Combine the SPLITS partial outputs of one query row by their log-sum-exp (with STORE_LSE,
    also write the row's)."""
    _chain(CHAIN)
    bh = tl.program_id(0)
    r = tl.program_id(1)
    b = bh // H
    h = bh % H
    R = T * G
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, D)
    part = (bh * SPLITS + sp) * R + r
    lse = tl.load(plse_ptr + part, mask=sp < SPLITS, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp(lse - tl.where(m > float("-inf"), m, 0.0))
    o = tl.sum(w[:, None] * tl.load(po_ptr + part[:, None] * D + d[None, :], mask=(sp < SPLITS)[:, None], other=0.0), 0)
    total = tl.sum(w, 0)
    o = o / tl.where(total > 0, total, 1.0)
    optr = out_ptr + b * so_b + (r // G) * so_t + (h * G + r % G) * so_h + d
    tl.store(optr, o.to(out_ptr.dtype.element_ty))
    if STORE_LSE:
        tl.store(lse_ptr + bh * R + r, tl.where(total > 0, m + tl.log(tl.where(total > 0, total, 1.0)), float("-inf")))


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_splits(device: torch.device, programs: int, max_splits: int, per_sm: int = 8) -> int:
    """A power of two of splits giving about `per_sm` programs per streaming multiprocessor."""
    if device.type != "cuda":
        return 1
    target = per_sm * _multiprocessors(device)
    return 1 << max(0, min(max_splits.bit_length() - 1, (target // max(1, programs)).bit_length() - 1))


def gather_capacity(kindex: KernelIndex, budget: int | None) -> int:
    """Rows the prefill gather buffer needs: a top-k selection overshoots its budget by less than
    one cluster; a threshold may keep everything."""
    rows = kindex.clustered_tokens
    return rows if budget is None else min(rows, budget + kindex.largest)


def sparse_attention(
    query: torch.Tensor,
    dyn_keys: torch.Tensor,
    dyn_values: torch.Tensor,
    kindex: KernelIndex,
    work: KeptRanges,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    capacity: int | None = None,
    pinned=None,
    read_all: bool = False,
    lse: torch.Tensor | None = None,
    context: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, T, D]; dyn_keys/values [B, H, Ld, D] (the dynamic part, causal, the queries
    are its last T tokens); key_valid [B, Ld] bool/int or None -> out [B, T, Hq, D] (query dtype).
    `splits` programs share each row block's work (default: enough to fill the GPU); `capacity`
    bounds the kept keys per head (prefill gather buffer; default: all clustered keys).
    `pinned` (a `selection.Pinned`, decode only): keys read besides the kept ranges, which skip them.
    `read_all`: `work` keeps every cluster (an exact rule), so a prefill reads the keys in place
    instead of gathering a copy of the whole context.
    `lse` (prefill only): float32 [B, H, T * G] (rows token-major, as the programs' rows) receives
    each query row's log-sum-exp over every key it saw.
    `context` (prefill only; `work` is then unused): each query row's attention over every clustered
    key and its log-sum-exp (`read_all.clustered_attention`); the kernel reads the rest from there.
    `stats` / `steps` (decode only): [1] int64 counters to which the kernel adds the pinned keys it
    reads / one step.
    """
    if dyn_keys.stride() != dyn_values.stride():
        raise ValueError("dynamic keys and values must have the same layout")
    batch, q_heads, tokens, dim = query.shape
    heads = kindex.heads
    group = q_heads // heads
    dyn_len = dyn_keys.shape[2]
    rows = tokens * group
    dev = query.device
    if out is None:
        out = torch.empty(batch, tokens, q_heads, dim, device=dev, dtype=query.dtype)
    kvalid = out  # (a placeholder: not read)
    if key_valid is not None:  # read as it is where it can be (a conversion is a launch per layer and step)
        as_is = key_valid.dtype in (torch.bool, torch.int8) and key_valid.is_contiguous()
        kvalid = key_valid if as_is else key_valid.to(torch.int8).contiguous()
    common = dict(HAS_KVALID=key_valid is not None, PRECISION=dot_precision(query.dtype))
    qk_scale = scaling * LOG2E.value  # the kernels' softmax runs in base 2
    dyn_strides = (dyn_keys.stride(0), dyn_keys.stride(1), dyn_keys.stride(2))
    out_strides = (out.stride(0), out.stride(1), out.stride(2))
    if tokens == 1:
        block_m, m_blocks = pow2(group, 16), 1
        splits = splits or _default_splits(dev, batch * heads, max_splits=DECODE_MAX_SPLITS)
    else:
        block_m, prefill_warps = (PREFILL_BLOCK_M, PREFILL_WARPS) if rows > 64 else (64, 4)
        m_blocks = triton.cdiv(rows, block_m)
        # Splitting pays only while the row blocks alone leave multiprocessors idle.
        splits = splits or _default_splits(dev, batch * heads * m_blocks, max_splits=16, per_sm=1)
    if splits > 1:
        po = torch.empty(batch * heads, splits, rows, dim, device=dev, dtype=torch.float32)
        plse = torch.empty(batch * heads, splits, rows, device=dev, dtype=torch.float32)
    else:
        po = plse = out
    grid = (batch * heads, m_blocks, splits)
    if lse is not None and (tokens == 1 or lse.shape != (batch, heads, rows) or lse.dtype != torch.float32
                            or not lse.is_contiguous()):
        raise ValueError(f"lse must be a contiguous float32 [{batch}, {heads}, {rows}] tensor, asked of a prefill "
                         "(several query tokens)")
    if context is not None and tokens == 1:
        raise ValueError("the clustered keys' attention is given to a prefill (several query tokens)")
    if pinned is not None and tokens != 1:
        raise ValueError("pinned keys are read by decode steps (one query token); a prefill reads every key")
    if (stats is not None or steps is not None) and tokens != 1:
        raise ValueError("the pinned keys and steps are counted by decode steps (one query token)")
    if tokens == 1:
        pins = (pinned.rows, pinned.count, pinned.mask) if pinned is not None else (out, out, out)
        pieces, warps = DECODE_TILE if pinned is None else PINNED_DECODE_TILE
        _decode_kernel[grid](
            query, kindex.keys, kindex.values, kindex.dense_keys, kindex.dense_values, dyn_keys, dyn_values,
            work.starts, work.lengths, work.nsel, kvalid, *pins, out, po, plse,
            out if stats is None else stats, out if steps is None else steps,
            qk_scale, heads, group, work.starts.shape[-1], kindex.clustered_tokens, kindex.dense_keys.shape[1], dyn_len,
            pinned.rows.shape[-1] if pinned is not None else 0,
            query.stride(0), query.stride(1), *dyn_strides, *out_strides,
            D=dim, BLOCK_M=block_m, BLOCK_N=pieces * kindex.piece_rows, PIECE=kindex.piece_rows, SPLITS=splits,
            HAS_PINS=pinned is not None, COUNT_PINS=pinned is not None and stats is not None,
            COUNT_STEP=steps is not None, **common,
            num_warps=warps, num_stages=DECODE_STAGES,
            **launch_options(dev),
        )
    else:
        if context is not None or read_all:  # every cluster kept, in cluster order: the index's keys, in place
            cap, batch_stride = kindex.clustered_tokens, 0
            gk, gv = kindex.keys, kindex.values
        else:
            cap = capacity or kindex.clustered_tokens
            batch_stride = heads * cap
            gk = torch.empty(batch * heads, cap, dim, device=dev, dtype=kindex.keys.dtype)
            gv = torch.empty_like(gk)
            gather_splits = _default_splits(dev, batch * heads, max_splits=64)
            _gather_kernel[(batch * heads, 1, gather_splits)](
                kindex.keys, kindex.values, work.starts, work.lengths, work.positions, work.nsel, gk, gv,
                heads, work.starts.shape[-1], kindex.clustered_tokens, cap,
                D=dim, BLOCK_N=GATHER_PIECES * kindex.piece_rows, PIECE=kindex.piece_rows, SPLITS=gather_splits,
                **launch_options(dev, CHAIN_PREFILL),
            )
        if context is not None:
            c_out, c_lse = context
            c_args, c_strides = (c_out, c_lse), (*c_out.stride()[:2], *c_lse.stride())
        else:
            c_args, c_strides = (out, out), (0, 0, 0, 0)
        _prefill_kernel[grid](
            query, gk, gv, kindex.dense_keys, kindex.dense_values, dyn_keys, dyn_values,
            out if context is not None else work.nkeys, kvalid, out, po, plse, out if lse is None else lse, *c_args,
            qk_scale, heads, group, tokens, kindex.dense_keys.shape[1], dyn_len, cap, batch_stride,
            query.stride(0), query.stride(1), query.stride(2), *dyn_strides, *out_strides, *c_strides,
            D=dim, BLOCK_M=block_m, BLOCK_N=PREFILL_BLOCK_N, SPLITS=splits, STORE_LSE=lse is not None,
            HAS_CONTEXT=context is not None, **common, num_warps=prefill_warps, num_stages=PREFILL_STAGES,
            **launch_options(dev, CHAIN_PREFILL),
        )
    if splits > 1:
        _merge_kernel[(batch * heads, rows)](
            po, plse, out, out if lse is None else lse, heads, group, tokens, *out_strides,
            D=dim, SPLITS=splits, BLOCK_S=pow2(splits), STORE_LSE=lse is not None,
            **launch_options(dev),
        )
    return out
