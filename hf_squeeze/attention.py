"""The attention function registered as `attn_implementation="squeezed"` (torch reference path).

transformers calls it with the query of a layer and exactly what the cache's `update` returned.
A squeezed cache layer tags the key tensor it returns with itself (`LAYER_ATTR`), which is how this
function reaches the layer's index without global state: the link travels with the data of the
forward pass, so two caches used in turn, or in two threads, never see each other's state.
Untagged keys (no cache, a `DynamicCache`, training) get ordinary exact attention with correct
causal and padding masking, so the implementation is safe to leave on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAYER_ATTR = "_hf_squeeze_layer"


def squeezed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, L, D] -> ([B, T, Hq, D], None)."""
    for name in ("sliding_window", "softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(
                f"attn_implementation='squeezed' does not support `{name}` (layer {getattr(module, 'layer_idx', '?')}); "
                "load this model with attn_implementation='sdpa' instead."
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    layer = getattr(key, LAYER_ATTR, None)
    if layer is not None:
        return layer.attention(module, query, key, value, attention_mask, scaling), None
    return exact_attention(query, key, value, attention_mask, scaling, dropout if module.training else 0.0), None


def exact_attention(query, key, value, attention_mask, scaling, dropout=0.0) -> torch.Tensor:
    """Plain causal attention with GQA; `attention_mask` is None, boolean or additive [B, 1, T, L]."""
    q_len, kv_len = query.shape[-2], key.shape[-2]
    is_causal = False
    if attention_mask is None and q_len > 1:
        if q_len == kv_len:
            is_causal = True
        else:  # causal, aligned to the end of the keys (the queries are the last tokens)
            attention_mask = causal_mask(q_len, kv_len, query.device)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous()


def causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """Boolean [T, L]: query t (the (L - T + t)-th token) sees keys up to itself."""
    return torch.ones(q_len, kv_len, dtype=torch.bool, device=device).tril(kv_len - q_len)


def partial_attention(q, k, v, mask, scaling) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention over one part of the keys, returning (out, lse) for a later merge.

    q [B, H, G, T, D]; k, v [B, H, L, D] (or broadcastable); mask broadcastable to
    [B, H, G, T, L] (True = attend) or None. Rows with no key get lse = -inf and out = 0.
    """
    s = torch.einsum("bhgtd,bhld->bhgtl", q, k) * scaling
    if s.shape[-1] == 0:  # nothing selected in this part
        return torch.zeros_like(q), torch.full(s.shape[:-1], float("-inf"), device=q.device)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bhgtl,bhld->bhgtd", p, v) / denom.clamp_min(torch.finfo(p.dtype).tiny)
    return out, (m + denom.log()).squeeze(-1)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine partial attentions over disjoint key sets with a stable log-sum-exp."""
    lse = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lse, dim=0)
    safe_total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lse - safe_total)  # exp(-inf) = 0 for empty parts
    return sum(w.unsqueeze(-1) * out for w, (out, _) in zip(weights, parts))
