"""An exact step's attention over the clustered keys, through torch's fused attention kernels.

An exact rule (the default's input prefill, keep=1) reads every key of the fixed context: nothing
is selected, so that part of the step is plain dense attention, which cuDNN and flash attention run
near the matrix units' peak. No mask is needed there (the fixed context precedes every query), so
the G query heads of a KV head and the batch rows fold into one head's query rows: plain multi-head
attention over the index's keys in place, with no copy of the context. The operators also return
each row's log-sum-exp, from which the prefill kernel goes on over the sinks, the window and the
dynamic tokens (`sparse_attention(context=...)`), and which the pins need.

Below `MIN_ROWS` query rows per KV head those operators leave most of the GPU idle (one program
per block of rows, none split over the keys), and the prefill kernel, which splits the keys over
its programs, reads the context instead.
"""

from __future__ import annotations

import torch

# Query rows per KV head (batch x group x tokens) from which the fused kernels serve: H200, bf16,
# 8 KV heads x 128K keys, G = 4, the fused path's time over the prefill kernel's (two runs): 11x at
# 32 rows, 1.86-1.91 at 512, 0.79-0.80 at 1,024, 0.63-0.64 at 4,096 (4.0 vs 6.3 ms; cuDNN).
MIN_ROWS = 1024

# The fused operators that return the log-sum-exp, fastest first, with torch's check of whether each
# takes the inputs (dtype, head dim, GPU; the raw operators do not check); each returns (out, lse, ...).
_OPERATORS = {
    "cudnn": (lambda q, k, v, s: torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False,
                                                                                     False, scale=s),
              torch.backends.cuda.can_use_cudnn_attention),
    "flash": (lambda q, k, v, s: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False,
                                                                                     scale=s),
              torch.backends.cuda.can_use_flash_attention),
    "efficient": (lambda q, k, v, s: torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0,
                                                                                           False, scale=s),
                  torch.backends.cuda.can_use_efficient_attention),
}


def _cpu_operator(q, k, v, s):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=s)


def _folded(query: torch.Tensor, heads: int) -> torch.Tensor:
    """query [B, Hq, T, D] -> [1, H, B * G * T, D]: row (b * G + g) * T + t of head h is query head
    h * G + g of token t in batch row b."""
    return query.unflatten(1, (heads, query.shape[1] // heads)).transpose(0, 1).reshape(1, heads, -1, query.shape[-1])


def _operator(rows: torch.Tensor, keys: torch.Tensor):
    """The first fused operator that takes these inputs, or None."""
    if rows.device.type != "cuda":
        return _cpu_operator
    params = torch.backends.cuda.SDPAParams(rows, keys, keys, None, 0.0, False, False)
    return next((run for run, takes in _OPERATORS.values() if takes(params, False)), None)


def clustered_attention(query: torch.Tensor, kindex, scaling: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """query [B, Hq, T, D] -> (out [H, B * G * T, D] in the query's dtype, lse [H, B * G * T] float32,
    in the operator's strides): each query row's attention over every clustered key of its KV head
    and its log-sum-exp; row (b * G + g) * T + t of head h is query head h * G + g of token t in
    batch row b. None when the fused kernels do not serve: fewer than MIN_ROWS query rows per KV
    head, or no operator takes these inputs (the prefill kernel reads the keys then)."""
    batch, q_heads, tokens, _ = query.shape
    if batch * q_heads // kindex.heads * tokens < MIN_ROWS or query.dtype != kindex.keys.dtype:
        return None
    rows = _folded(query, kindex.heads)
    keys, values = kindex.keys[None], kindex.values[None]
    run = _operator(rows, keys)
    if run is None:
        return None
    out, lse = run(rows, keys, values, scaling)[:2]
    return out[0], lse.reshape(kindex.heads, -1)[:, :rows.shape[2]]  # (the efficient kernel pads its rows)
