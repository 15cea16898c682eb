"""Triton kernels of the offline K-means: assignment fused with the argmax, and per-cluster sums.

`assign` replaces "similarity matrix, then max over centers": at a 128K-token context with 5%
centroids the similarity matrix of one layer would hold 8 x 131K x 6.5K values, and writing then
re-reading it costs more than the matrix product itself. Here each program keeps a block of points
in registers, streams the centers through `tl.dot` and keeps a running (max, argmax).

`cluster_sums` adds up the points of every cluster from points sorted by cluster (CSR offsets), one
program per (head, cluster): unlike `index_add_` on a GPU (atomics), the order of the additions is
fixed, so K-means gives the same labels on every run.

References in plain torch: `naive.py` beside this file.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


# (points per program, centers per step, warps, stages) for head_dim <= 128: the fastest of
# ASSIGN_CANDIDATES at 128K tokens as timed by benchmarks/offline_index.py (BENCHMARKS.md).
ASSIGN_CONFIG = (128, 64, 4, 3)
# Points per program of the seeding gains (a multiple of every BLOCK_N used there).
GAINS_ROWS_PER_SPLIT = 4096
ASSIGN_CANDIDATES = ((128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 256, 8, 3), (256, 128, 8, 3))


@triton.jit
def _load_rows(ptr, head, stride_h, rows, stride_n, dims, n, D):
    """Rows `rows` (those below `n`) of head `head` of a [H, N, D] tensor, columns `dims` (below D)."""
    return tl.load(ptr + head * stride_h + rows[:, None].to(tl.int64) * stride_n + dims[None, :],
                   mask=(rows[:, None] < n) & (dims[None, :] < D), other=0.0)


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, label_ptr, best_ptr,
    N, K, D,
    stride_xh, stride_xn, stride_ch, stride_ck,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    x = _load_rows(x_ptr, head, stride_xh, rows, stride_xn, dims, N, D)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    label = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        c = _load_rows(c_ptr, head, stride_ch, cols, stride_ck, dims, K, D)
        sim = tl.dot(x, tl.trans(c))
        sim = tl.where(cols[None, :] < K, sim, float("-inf"))
        tile_best = tl.max(sim, axis=1)
        tile_label = tl.argmax(sim, axis=1).to(tl.int32) + k0
        better = tile_best > best  # strict: ties keep the lowest center index, like torch.max
        label = tl.where(better, tile_label, label)
        best = tl.where(better, tile_best, best)
    out = head * N + rows
    tl.store(label_ptr + out, label, mask=rows < N)
    tl.store(best_ptr + out, best, mask=rows < N)


def assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Largest dot product of every point with the centers of its head.

    x [H, N, D] and centers [H, K, D] (same dtype, last dim contiguous) -> labels [H, N] int64 and
    similarity [H, N] float32.
    """
    heads, n, dim = x.shape
    k = centers.shape[1]
    if x.stride(-1) != 1 or centers.stride(-1) != 1 or centers.dtype != x.dtype:
        raise ValueError("assign needs x and centers of one dtype with a contiguous last dimension")
    labels = torch.empty(heads, n, dtype=torch.int32, device=x.device)
    best = torch.empty(heads, n, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(dim))
    # float32 tiles take twice the shared memory of bfloat16 ones (the coarse tree clusters fp32 centroids)
    block_n, block_k, warps, stages = ASSIGN_CONFIG if block_d * x.element_size() <= 256 else (64, 64, 4, 2)
    grid = (triton.cdiv(n, block_n), heads)
    _assign_kernel[grid](
        x, centers, labels, best, n, k, dim,
        x.stride(0), x.stride(1), centers.stride(0), centers.stride(1),
        BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    return labels.long(), best


@triton.jit
def _cluster_sums_kernel(
    x_ptr, order_ptr, offsets_ptr, out_ptr,
    N, K, D,
    stride_xh, stride_xn,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cluster = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    start = tl.load(offsets_ptr + head * (K + 1) + cluster)
    stop = tl.load(offsets_ptr + head * (K + 1) + cluster + 1)
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for r0 in range(start, stop, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        point = tl.load(order_ptr + head * N + r, mask=r < stop, other=0)
        acc += tl.load(
            x_ptr + head * stride_xh + point[:, None].to(tl.int64) * stride_xn + dims[None, :],
            mask=(r[:, None] < stop) & (dims[None, :] < D), other=0.0,
        ).to(tl.float32)
    tl.store(out_ptr + (head * K + cluster) * D + dims, tl.sum(acc, axis=0), mask=dims < D)


def cluster_sums(x: torch.Tensor, order: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sum of the points of each cluster, in float32: x [H, N, D], `order` [H, N] the points sorted by
    cluster, `offsets` [H, K + 1] the CSR offsets of the clusters in `order` -> [H, K, D]."""
    heads, n, dim = x.shape
    k = offsets.shape[1] - 1
    out = torch.empty(heads, k, dim, dtype=torch.float32, device=x.device)
    block_d = max(16, triton.next_power_of_2(dim))
    grid = (k, heads)
    _cluster_sums_kernel[grid](
        x, order.contiguous(), offsets.contiguous(), out, n, k, dim, x.stride(0), x.stride(1),
        BLOCK_R=16, BLOCK_D=block_d, num_warps=4,
    )
    return out


@triton.jit
def _gains_kernel(
    c_ptr, x_ptr, dist_ptr, out_ptr,
    N, M, D, rows_per_split,
    stride_ch, stride_cm, stride_xh, stride_xn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    cands = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    c = _load_rows(c_ptr, head, stride_ch, cands, stride_cm, dims, M, D)
    acc = tl.zeros([BLOCK_M], tl.float32)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        x = _load_rows(x_ptr, head, stride_xh, rows, stride_xn, dims, stop, D)
        # dist - 1 + sim = dist - (1 - sim): how much closer the candidate is than the nearest center.
        # Rows past the end get -3, below any similarity, so they add nothing.
        slack = tl.load(dist_ptr + head * N + rows, mask=rows < stop, other=-2.0) - 1.0
        sim = tl.dot(c, tl.trans(x))
        acc += tl.sum(tl.maximum(sim + slack[None, :], 0.0), axis=1)
    tl.store(out_ptr + (head * tl.num_programs(1) + split) * M + cands, acc, mask=cands < M)


def seeding_gains(x: torch.Tensor, candidates: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Drop of the K-means potential if each candidate alone became a center.

    x [H, N, D], candidates [H, M, D] (same dtype), dist [H, N] float32 distance (1 - cosine) of each
    point to its nearest center -> [H, M] float32, sum over points of max(0, dist - (1 - cos)).
    Points are split across programs (partial sums added in a fixed order) so that a handful of
    candidates still fills the GPU.
    """
    heads, n, dim = x.shape
    m = candidates.shape[1]
    block_d = max(16, triton.next_power_of_2(dim))
    block_m, block_n = (64, 128) if block_d * x.element_size() <= 256 else (32, 64)
    blocks_m = triton.cdiv(m, block_m)
    # A fixed split of the points (not one sized to fill this GPU with this many heads): the order
    # of the additions, so every head's result, is then the same whatever heads share the batch
    # and whatever the GPU.
    rows_per_split = GAINS_ROWS_PER_SPLIT
    splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(heads, splits, m, dtype=torch.float32, device=x.device)
    _gains_kernel[(blocks_m, splits, heads)](
        candidates, x, dist.contiguous(), partial, n, m, dim, rows_per_split,
        candidates.stride(0), candidates.stride(1), x.stride(0), x.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=3,
    )
    return partial.sum(1)
