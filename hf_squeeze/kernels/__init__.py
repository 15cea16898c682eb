"""Triton kernels of the online path: the centroid lookup (`lookup.py`: `scoring.py` then
`selection.py`) and sparse attention (`attention.py`) over the device view of a layer index
(`layout.py`); an exact prefill reads the clustered keys through torch's fused attention
(`read_all.py`). `naive.py` holds the readable torch reference of each, which the tests check them
against. The cache uses the kernels on CUDA devices and the library's torch path elsewhere. (The
offline K-means kernels live with the clustering: `clustering/kernels.py`.)

Without Triton the package still imports (`naive` is plain torch); `supports` then says why the
kernels cannot serve.
"""

from __future__ import annotations

import math
import os

import torch

from . import layout, naive, read_all  # noqa: F401  (plain torch)
from .layout import KernelIndex, kernel_index

try:
    from .attention import gather_capacity, sparse_attention
    from .lookup import KeptRanges, lookup
    from .pins import key_weights
    from .selection import MAX_CLUSTERS
except ImportError as error:  # pragma: no cover - platforms without Triton
    _MISSING = f"Triton is not available ({error})"
else:
    _MISSING = None

__all__ = ["KernelIndex", "KeptRanges", "attend", "kernel_index", "key_weights", "lookup", "naive", "query_weights",
           "sparse_attention", "supports"]

# "auto" (default): kernels on CUDA devices; "0": torch reference everywhere; "1": also on the CPU
# under TRITON_INTERPRET=1 (slow; for tests).
_ENV = "HF_SQUEEZE_KERNELS"


def supports(index, query: torch.Tensor) -> str | None:
    """Why the kernels cannot serve this layer and query (None when they can)."""
    return query_unsupported(query) or index_unsupported(index)


def query_unsupported(query: torch.Tensor) -> str | None:
    """Why the kernels cannot serve this query, whatever the index (None when they can)."""
    mode = os.environ.get(_ENV, "auto")
    if _MISSING is not None:
        return _MISSING
    if mode == "0":
        return f"{_ENV}=0"
    if query.device.type != "cuda" and not (mode == "1" and os.environ.get("TRITON_INTERPRET") == "1"):
        return "not a CUDA device (on the CPU the kernels run only with TRITON_INTERPRET=1 and HF_SQUEEZE_KERNELS=1)"
    dim = query.shape[-1]
    if dim < 16 or dim & (dim - 1):
        return f"head dim {dim} is not a power of two >= 16"
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {query.dtype}"
    return None


def index_unsupported(index) -> str | None:
    """Why the kernels cannot serve this index, whatever the query (None when they can)."""
    if _MISSING is None and index.counts.shape[1] > MAX_CLUSTERS:
        return f"more than {MAX_CLUSTERS} clusters per KV head"
    if index.clustered_tokens == 0:
        return "no clustered tokens"
    return None


def query_weights(q_valid: torch.Tensor | None, batch: int, tokens: int, device) -> torch.Tensor:
    """log weight of each query token in the per-input mean: [B, T] (-inf for padding)."""
    if q_valid is None:
        return torch.full((batch, tokens), -math.log(tokens), device=device)
    w = q_valid.float()
    return (w / w.sum(-1, keepdim=True).clamp_min(1.0)).log()


def attend(
    query: torch.Tensor,
    dyn_keys: torch.Tensor,
    dyn_values: torch.Tensor,
    kindex: KernelIndex,
    rule,
    scaling: float,
    key_valid: torch.Tensor | None,
    q_valid: torch.Tensor | None,
    stats: torch.Tensor,
    splits: int | None = None,
    out: torch.Tensor | None = None,
    scored: torch.Tensor | None = None,
    pinned=None,
    lse: torch.Tensor | None = None,
    steps: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squeezed attention of `query` [B, Hq, T, D] -> [B, T, Hq, D], lookup and attention on the
    device with no host synchronisation. `stats` [1] int64 accumulates the keys read (the lookup's
    kept keys, and the pinned ones); `scored` [1] int64 (two-level index) the fine centroids scored;
    `pinned` (decode): a request's pinned keys (`selection.Pinned`), read besides the lookup's; `lse`
    (prefill): receives each query row's log-sum-exp (`sparse_attention`); `steps` [1] int64 (decode):
    one is added (by the attention kernel, as the pinned keys: no launch of their own)."""
    if query.stride(-1) != 1:
        query = query.contiguous()
    # A cache layer's dynamic part is a view of a buffer with room to grow: read in place through
    # its strides (a copy would cost two launches and the whole part per layer and step).
    if dyn_keys.stride(-1) != 1 or dyn_keys.stride() != dyn_values.stride():
        dyn_keys, dyn_values = dyn_keys.contiguous(), dyn_values.contiguous()
    if rule.exact:
        threshold, budget, coarse_threshold, coarse_budget = float("-inf"), None, float("-inf"), None
    else:
        threshold, budget, coarse_threshold, coarse_budget = rule.threshold, rule.budget, rule.coarse_threshold, rule.coarse_budget
    batch, _, tokens, _ = query.shape
    # an exact prefill selects nothing: the clustered keys through torch's fused attention where it
    # serves, the rest in our kernel
    context = read_all.clustered_attention(query, kindex, scaling) if rule.exact and tokens > 1 else None
    if context is not None:
        stats.add_(batch * kindex.heads * kindex.clustered_tokens)
        return sparse_attention(query, dyn_keys, dyn_values, kindex, None, scaling, key_valid, splits, out,
                                lse=lse, context=context)
    logw = query_weights(q_valid, batch, tokens, query.device) if tokens > 1 and not rule.exact else None
    work = lookup(query, kindex, scaling, threshold, budget, logw, stats, coarse_threshold, coarse_budget, scored,
                  every=rule.exact)
    capacity = gather_capacity(kindex, budget)
    decode = tokens == 1
    return sparse_attention(query, dyn_keys, dyn_values, kindex, work, scaling, key_valid, splits, out, capacity,
                            pinned, read_all=rule.exact, lse=lse, stats=stats if decode else None, steps=steps)
