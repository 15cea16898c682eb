"""Triton kernel of the squeezed attention: exact attention over the selected fixed-context tiles,
the dense part (sinks + observation window) and the dynamic tokens, in one online-softmax pass.

Each program owns a block of query rows of one KV head, rows ordered token-major (row = t * G + g)
so that all G query heads of the group share every K/V tile it loads. The work of a (row, head) is
a virtual list of tiles: first the needed tiles of the cluster-sorted keys (from the lookup's work
list, rows of dropped clusters masked), then the dense part, then the dynamic keys up to the
causal limit of the block. `SPLITS` programs share that list evenly (flash-decoding): each writes
a partial output and its log-sum-exp, and `_merge_kernel` combines them. The list length is read on
the device, so launch shapes never depend on the selection (CUDA-graph capturable).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import TILE_ROWS, KernelIndex
from .lookup import Work, _pow2, _precision


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, dk_ptr, dv_ptr, yk_ptr, yv_ptr,
    row_cluster_ptr, keep_ptr, tiles_ptr, ntiles_ptr, kvalid_ptr,
    out_ptr, po_ptr, plse_ptr,
    scaling, H, G, T, C, NC, NT, SW, LD,
    sq_b, sq_h, sq_t, sy_b, sy_h, sy_n, so_b, so_t, so_h,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr,
    HAS_KVALID: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    mb = tl.program_id(1)
    sp = tl.program_id(2)
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

    n_sel = tl.load(ntiles_ptr + bh)
    n_dense = tl.cdiv(SW, BLOCK_N)
    last_token = tl.minimum(((mb + 1) * BLOCK_M - 1) // G, T - 1)
    n_dyn = tl.cdiv(LD - T + last_token + 1, BLOCK_N)
    total = n_sel + n_dense + n_dyn
    per = tl.cdiv(total, SPLITS)
    start = sp * per
    end = tl.minimum(total, start + per)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for i in range(start, end):
        if i < n_sel:  # a needed tile of the cluster-sorted keys
            rows = tl.load(tiles_ptr + bh * NT + i) * BLOCK_N + n
            valid = rows < NC
            cluster = tl.load(row_cluster_ptr + h * NC + rows, mask=valid, other=0)
            valid = valid & (tl.load(keep_ptr + bh * C + cluster, mask=valid, other=0) != 0)
            kp = k_ptr + (h * NC + rows)[:, None] * D + d[None, :]
            vp = v_ptr + (h * NC + rows)[:, None] * D + d[None, :]
            visible = valid[None, :] & rmask[:, None]
        elif i < n_sel + n_dense:  # sinks + observation window
            rows = (i - n_sel) * BLOCK_N + n
            valid = rows < SW
            kp = dk_ptr + (h * SW + rows)[:, None] * D + d[None, :]
            vp = dv_ptr + (h * SW + rows)[:, None] * D + d[None, :]
            visible = valid[None, :] & rmask[:, None]
        else:  # dynamic tokens, causal
            rows = (i - n_sel - n_dense) * BLOCK_N + n
            valid = rows < LD
            if HAS_KVALID:
                valid = valid & (tl.load(kvalid_ptr + b * LD + rows, mask=valid, other=0) != 0)
            kp = yk_ptr + b * sy_b + h * sy_h + rows[:, None] * sy_n + d[None, :]
            vp = yv_ptr + b * sy_b + h * sy_h + rows[:, None] * sy_n + d[None, :]
            visible = valid[None, :] & (rows[None, :] <= (LD - T + t)[:, None])
        k = tl.load(kp, mask=valid[:, None], other=0.0)
        v = tl.load(vp, mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scaling
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    has = l_i > 0
    o = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    if SPLITS == 1:
        optr = out_ptr + b * so_b + t[:, None] * so_t + (h * G + g)[:, None] * so_h + d[None, :]
        tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
    else:
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        part = (bh * SPLITS + sp) * R + r
        tl.store(po_ptr + part[:, None] * D + d[None, :], o, mask=rmask[:, None])
        tl.store(plse_ptr + part, lse, mask=rmask)


@triton.jit
def _merge_kernel(
    po_ptr, plse_ptr, out_ptr, H, G, T, so_b, so_t, so_h,
    D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Combine the SPLITS partial outputs of each query row by their log-sum-exp."""
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    b = bh // H
    h = bh % H
    R = T * G
    r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    d = tl.arange(0, D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for sp in range(SPLITS):
        m = tl.maximum(m, tl.load(plse_ptr + (bh * SPLITS + sp) * R + r, mask=rmask, other=float("-inf")))
    m = tl.where(m > float("-inf"), m, 0.0)
    total = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    for sp in range(SPLITS):
        part = (bh * SPLITS + sp) * R + r
        w = tl.exp(tl.load(plse_ptr + part, mask=rmask, other=float("-inf")) - m)
        total += w
        acc += w[:, None] * tl.load(po_ptr + part[:, None] * D + d[None, :], mask=rmask[:, None], other=0.0)
    o = acc / tl.where(total > 0, total, 1.0)[:, None]
    t = r // G
    g = r % G
    optr = out_ptr + b * so_b + t[:, None] * so_t + (h * G + g)[:, None] * so_h + d[None, :]
    tl.store(optr, o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])


def num_programs_target(device: torch.device) -> int:
    """About four programs per streaming multiprocessor keep the memory system busy."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def sparse_attention(
    query: torch.Tensor,
    dyn_keys: torch.Tensor,
    dyn_values: torch.Tensor,
    kindex: KernelIndex,
    work: Work,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, Hq, T, D]; dyn_keys/values [B, H, Ld, D] (the dynamic part, causal, the queries
    are its last T tokens); key_valid [B, Ld] bool/int or None -> out [B, T, Hq, D] (query dtype).
    `splits` programs share each row block's tiles (default: enough to fill the GPU).
    """
    if dyn_keys.stride() != dyn_values.stride():
        raise ValueError("dynamic keys and values must have the same layout")
    batch, q_heads, tokens, dim = query.shape
    heads = kindex.heads
    group = q_heads // heads
    dyn_len = dyn_keys.shape[2]
    rows = tokens * group
    block_m = 16 if rows <= 16 else 64
    m_blocks = triton.cdiv(rows, block_m)
    if splits is None:
        splits = num_programs_target(query.device) // (batch * heads * m_blocks)
        splits = 1 << max(0, min(6, splits.bit_length() - 1))
    if out is None:
        out = torch.empty(batch, tokens, q_heads, dim, device=query.device, dtype=query.dtype)
    if splits > 1:
        po = torch.empty(batch * heads, splits, rows, dim, device=query.device, dtype=torch.float32)
        plse = torch.empty(batch * heads, splits, rows, device=query.device, dtype=torch.float32)
    else:
        po = plse = out
    if key_valid is not None:
        key_valid = key_valid.to(torch.int8).contiguous()
    _attention_kernel[(batch * heads, m_blocks, splits)](
        query, kindex.keys, kindex.values, kindex.dense_keys, kindex.dense_values, dyn_keys, dyn_values,
        kindex.row_cluster, work.keep, work.tiles, work.ntiles, out if key_valid is None else key_valid,
        out, po, plse,
        scaling, heads, group, tokens, kindex.clusters, kindex.clustered_tokens, kindex.tiles,
        kindex.dense_keys.shape[1], dyn_len,
        query.stride(0), query.stride(1), query.stride(2),
        dyn_keys.stride(0), dyn_keys.stride(1), dyn_keys.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D=dim, BLOCK_M=block_m, BLOCK_N=TILE_ROWS, SPLITS=splits,
        HAS_KVALID=key_valid is not None, PRECISION=_precision(query.dtype),
    )
    if splits > 1:
        block_r = min(_pow2(rows), 64)
        _merge_kernel[(batch * heads, triton.cdiv(rows, block_r))](
            po, plse, out, heads, group, tokens, out.stride(0), out.stride(1), out.stride(2),
            D=dim, SPLITS=splits, BLOCK_R=block_r,
        )
    return out
