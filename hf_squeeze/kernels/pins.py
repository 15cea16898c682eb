"""Which keys a user input leans on: the input's exact attention probability of every clustered key,
summed over the input's tokens, per query head (what `SqueezeConfig.pin` pins by).

The torch reference (`selection.key_weights`) scores every key against every input token again; on
the kernel path the input's prefill already read every key once and left each query row's
log-sum-exp (`sparse_attention(lse=...)`), so one pass over the keys gives each key's probability
exp(q . k * scaling - lse) directly. A program owns a tile of one KV head's keys, loads it once and
streams the input's tokens past it for each query head of the group: the keys are read once, and
the weights are written once, with no atomics. The keys are the rows of each score tile and the
tokens its columns, so the sum over tokens is a row reduction (within a few threads of one warp, as
a flash attention's row sums), not a reduction across the program's warps at every step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import LOG2E, dot_precision
from .layout import KernelIndex

# keys per program, input tokens per step, warps, pipelined loads: the fastest of 54 configurations
# at 1,024 tokens over 128K keys (H200, bf16: 2.35 ms per layer with keys as the score tile's rows,
# 2.93 ms with tokens as its rows, the same tile; BENCHMARKS.md)
BLOCK_N, BLOCK_T, WARPS, STAGES = 128, 128, 4, 2


@triton.jit
def _key_weights_kernel(
    q_ptr, k_ptr, lse_ptr, w_ptr, out_ptr,
    scaling, H, G, T, NC, sq_b, sq_h, sq_t,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, HAS_W: tl.constexpr,
    PRECISION: tl.constexpr, STAGES: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < NC
    d = tl.arange(0, D)
    k = tl.load(k_ptr + (h * NC + n)[:, None] * D + d[None, :], mask=nmask[:, None], other=0.0)
    tt = tl.arange(0, BLOCK_T)
    qk_scale = scaling * LOG2E
    for g in range(G):
        acc = tl.zeros([BLOCK_N], tl.float32)
        for t0 in tl.range(0, T, BLOCK_T, num_stages=STAGES):
            t = t0 + tt
            tmask = t < T
            q = tl.load(q_ptr + b * sq_b + (h * G + g) * sq_h + t[:, None] * sq_t + d[None, :],
                        mask=tmask[:, None], other=0.0)
            # a row's log-sum-exp over everything it saw; +inf where the token does not count
            lse = tl.load(lse_ptr + bh * T * G + t * G + g, mask=tmask, other=float("inf"))
            if HAS_W:
                w = tl.load(w_ptr + b * T + t, mask=tmask, other=0.0)
                lse = tl.where(w > 0, lse, float("inf"))
            # keys are the rows of the score tile: the sum over tokens stays within a row's threads
            s = tl.dot(k, tl.trans(q.to(k.dtype)), input_precision=PRECISION) * qk_scale
            p = tl.exp2(s - (lse * LOG2E)[None, :])
            if HAS_W:
                p = p * w[None, :]
            acc += tl.sum(p, 1)
        tl.store(out_ptr + (bh * G + g) * NC + n, acc, mask=nmask)


def key_weights(query: torch.Tensor, kindex: KernelIndex, lse: torch.Tensor, scaling: float,
                q_valid: torch.Tensor | None = None) -> torch.Tensor:
    """query [B, Hq, T, D] (the input's prefill); lse float32 [B, H, T * G] (each query row's
    log-sum-exp over all it saw, rows token-major: `sparse_attention(lse=...)`); q_valid [B, T]
    (weight of each token: 1 real, 0 padding) or None -> [B, H, G, Nc] float32, as
    `selection.key_weights`."""
    batch, q_heads, tokens, dim = query.shape
    heads, n = kindex.heads, kindex.clustered_tokens
    group = q_heads // heads
    if lse.shape != (batch, heads, tokens * group) or not lse.is_contiguous():
        raise ValueError(f"lse must be a contiguous [{batch}, {heads}, {tokens * group}] tensor")
    if query.stride(-1) != 1:
        query = query.contiguous()
    out = torch.empty(batch, heads, group, n, device=query.device, dtype=torch.float32)
    w = lse if q_valid is None else q_valid.to(torch.float32).contiguous()
    _key_weights_kernel[(batch * heads, triton.cdiv(n, BLOCK_N))](
        query, kindex.keys, lse, w, out,
        scaling, heads, group, tokens, n, query.stride(0), query.stride(1), query.stride(2),
        D=dim, BLOCK_N=BLOCK_N, BLOCK_T=BLOCK_T, HAS_W=q_valid is not None,
        PRECISION=dot_precision(kindex.keys.dtype), STAGES=STAGES, num_warps=WARPS, enable_fp_fusion=True,
    )
    return out
