"""Readable references of the kernels: what each one computes, written plainly in torch.

Slow and simple on purpose: dense masks instead of candidate lists, one softmax instead of merged
partials. The kernel tests check the Triton kernels against these, and the library's own torch
path (`hf_squeeze.selection`, `hf_squeeze.attention`) is checked against them too.

Shapes: B batch rows, H KV heads, G query heads per KV head, T query tokens, C clusters, D head dim.
"""

from __future__ import annotations

import math

import torch

# ---- centroid lookup (kernels/lookup.py) -----------------------------------------------------------
def _per_cluster_logp(q, centroids, counts, scaling, candidate=None, extra_log_terms=None):
    """log p of one key of each cluster, per query token: [B, H, G, T, C].

    p_j = exp(s_j) / sum_k N_k exp(s_k) over the `candidate` clusters (all non-empty ones by
    default), plus `extra_log_terms` [B, H, G, T, E] in the sum."""
    s = torch.einsum("bhgtd,hcd->bhgtc", q.float(), centroids.float()) * scaling
    usable = (counts > 0)[None, :, None, None, :].expand_as(s)
    if candidate is not None:
        usable = usable & candidate[:, :, None, None, :]
    terms = torch.where(usable, s + counts.float().log()[None, :, None, None, :], -math.inf)
    if extra_log_terms is not None:
        terms = torch.cat([terms, extra_log_terms], -1)
    return torch.where(usable, s - torch.logsumexp(terms, -1, keepdim=True), -math.inf), s


def _vote(logp, q_valid):
    """log of the mean of p over the real query tokens, then max over the query heads: [B, H, C]."""
    weight = torch.ones(logp.shape[0], logp.shape[3], device=logp.device) if q_valid is None else q_valid.float()
    log_weight = (weight / weight.sum(-1, keepdim=True).clamp_min(1.0)).log()
    return torch.logsumexp(logp + log_weight[:, None, None, :, None], dim=3).amax(2)


def _keep(logp, counts, threshold, budget):
    """Kept clusters [B, H, C]: log p >= threshold, or the most probable until `budget` keys (the
    crossing cluster kept; equal p in cluster order); neither: every non-empty one."""
    usable = (counts > 0) & (logp > -math.inf)
    if threshold is not None:
        return usable & (logp >= threshold)
    if budget is None:
        return usable
    kept = torch.zeros_like(usable)
    for b in range(logp.shape[0]):
        for h in range(logp.shape[1]):
            taken = 0
            for c in sorted(range(logp.shape[2]), key=lambda c: (-float(logp[b, h, c]), c)):
                if taken >= budget:
                    break
                if usable[b, h, c]:
                    kept[b, h, c] = True
                    taken += int(counts[b, h, c])
    return kept


def lookup(query, index, scaling: float, rule, q_valid=None) -> torch.Tensor:
    """The clusters a query keeps: [B, H, C] bool over the (fine) clusters of `index`.

    query [B, Hq, T, D]; q_valid [B, T] marks real (not padding) query tokens. A two-level index
    first keeps coarse clusters, then normalises the fine clusters under them with the coarse
    terms N_k exp(s_k) of the rejected coarse clusters."""
    batch, q_heads, tokens, dim = query.shape
    heads, clusters = index.counts.shape
    q = query.reshape(batch, heads, q_heads // heads, tokens, dim)
    counts = index.counts[None].expand(batch, -1, -1)
    if rule.exact:
        return counts > 0
    if index.coarse_centroids is None:
        logp, _ = _per_cluster_logp(q, index.centroids, index.counts, scaling)
        return _keep(_vote(logp, q_valid), counts, rule.threshold, rule.budget)
    coarse_counts = index.coarse_counts[None].expand(batch, -1, -1)
    coarse_logp, s1 = _per_cluster_logp(q, index.coarse_centroids, index.coarse_counts, scaling)
    coarse_kept = _keep(_vote(coarse_logp, q_valid), coarse_counts, rule.coarse_threshold, rule.coarse_budget)
    sizes = index.coarse_offsets[:, 1:] - index.coarse_offsets[:, :-1]  # fine clusters under each coarse one
    parent = torch.stack([torch.repeat_interleave(torch.arange(len(row), device=row.device), row) for row in sizes])
    candidate = coarse_kept.gather(2, parent[None].expand(batch, -1, -1))  # [B, H, C]
    rejected = torch.where(~coarse_kept[:, :, None, None, :] & (index.coarse_counts > 0)[None, :, None, None, :],
                           s1 + index.coarse_counts.float().log()[None, :, None, None, :], -math.inf)
    logp, _ = _per_cluster_logp(q, index.centroids, index.counts, scaling, candidate, rejected)
    return _keep(_vote(logp, q_valid), counts * candidate, rule.threshold, rule.budget)


def kept_pieces(kept: torch.Tensor, index, piece_rows: int):
    """What the lookup kernel hands to attention, per (row, head): the kept clusters in cluster order,
    cut into pieces of at most `piece_rows` keys, as (first key, keys, kept keys before it), and the
    kept keys in all."""
    pieces, totals = {}, {}
    for b in range(kept.shape[0]):
        for h in range(kept.shape[1]):
            row, before = [], 0
            for c in kept[b, h].nonzero().flatten().tolist():
                start, count = int(index.offsets[h, c]), int(index.counts[h, c])
                row += [(start + j, min(piece_rows, count - j), before + j) for j in range(0, count, piece_rows)]
                before += count
            pieces[b, h], totals[b, h] = row, before
    return pieces, totals


# ---- sparse attention (kernels/attention.py) -------------------------------------------------------
def attention(query, dyn_keys, dyn_values, index, rule, scaling: float, mask=None, pinned=None) -> torch.Tensor:
    """Squeezed attention as one softmax: query [B, Hq, T, D] over the keys of the kept clusters and
    the `pinned` keys ([B, H, Nc] bool or None), the sinks and window (`dense_keys`), and the
    dynamic keys [B, H, Ld, D] under `mask` (boolean [B, 1, T, Ld], True = attend; None: causal,
    aligned to the end). Returns [B, T, Hq, D]."""
    batch, q_heads, tokens, dim = query.shape
    heads = index.keys.shape[0]
    q_valid = None
    if mask is not None:  # a query token is real iff it may attend to itself
        t = torch.arange(tokens, device=query.device)
        q_valid = mask[:, 0, t, dyn_keys.shape[2] - tokens + t]
    kept = lookup(query, index, scaling, rule, q_valid)  # [B, H, C]
    cluster_of_key = torch.stack([torch.repeat_interleave(torch.arange(len(c), device=c.device), c) for c in index.counts])
    key_kept = kept.gather(2, cluster_of_key[None].expand(batch, -1, -1))  # [B, H, Nc]
    if pinned is not None:
        key_kept = key_kept | pinned
    if mask is None:
        dyn_len = dyn_keys.shape[2]
        mask = torch.ones(tokens, dyn_len, dtype=torch.bool, device=query.device).tril(dyn_len - tokens)[None, None]
    mask = mask.expand(batch, 1, tokens, -1)
    group = q_heads // heads
    out = torch.empty(batch, tokens, q_heads, dim, dtype=torch.float32, device=query.device)
    for b in range(batch):
        for qh in range(q_heads):
            h = qh // group
            keys = torch.cat([index.keys[h], index.dense_keys[h], dyn_keys[b, h]]).float()
            values = torch.cat([index.values[h], index.dense_values[h], dyn_values[b, h]]).float()
            visible = torch.cat([key_kept[b, h][None].expand(tokens, -1),
                                 torch.ones(tokens, index.dense_keys.shape[1], dtype=torch.bool, device=query.device),
                                 mask[b, 0]], 1)
            scores = (query[b, qh].float() @ keys.T * scaling).masked_fill(~visible, -math.inf)
            out[b, :, qh] = torch.softmax(scores, -1) @ values
    return out.to(query.dtype)
