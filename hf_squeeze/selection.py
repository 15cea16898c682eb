"""Selection: query -> selected clusters -> key ranges, the torch reference of the online lookup.

Shapes: B batch rows, H KV heads, G query heads per KV head, T query tokens, M candidate clusters,
D head dim. Everything is computed in float32 and in the log domain, so that tiny probabilities
never underflow to a tie.

The estimated attention probability of one key of cluster j (paper, eq. 2) is

    p_j = exp(s_j) / sum_k N_k exp(s_k),   s_j = q . C_j * scaling,

with empty clusters (N_k = 0) left out of both the max and the sum. One selection is made per KV
head, shared by its G query heads (max over the group), and per batch row; for a user-input prefill
the per-token probabilities are averaged over the input first (one selection per input, as the
paper), for decode T = 1 and the selection is per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SelectionRule:
    """How clusters are kept, resolved for one fixed context.

    `exact` reads every key (keep=1.0) and short-circuits the lookup. Otherwise exactly one of
    `threshold` (a log probability) or `budget` (keys per KV head) is set for the fine level, and
    likewise `coarse_threshold` / `coarse_budget` for the coarse level of a two-level index.
    `estimate_rest`: the clusters left out are estimated from their centroids and value means
    (`SqueezeConfig.rest="estimate"`) instead of dropped. `exact_prefill`: a user input's prefill
    (more than one query token) reads every key; `pin_budget` (keys per KV head, besides the
    lookup's `budget`): the keys that prefill pins stay selected for the request (`pin_keys`).
    """

    exact: bool = False
    threshold: float | None = None
    budget: int | None = None
    coarse_threshold: float | None = None
    coarse_budget: int | None = None
    estimate_rest: bool = False
    exact_prefill: bool = False
    pin_budget: int | None = None


@dataclass
class Candidates:
    """Clusters that were scored for each (batch row, KV head), padded to a common M."""

    ids: torch.Tensor  # [B, H, M] int64 cluster indices
    logp: torch.Tensor  # [B, H, M] float32 aggregated log probability (-inf where padding / empty)
    counts: torch.Tensor  # [B, H, M] int64 keys per cluster (0 where padding / empty)


@dataclass
class Selection:
    """Selected key ranges of the cluster-sorted keys, per (batch row, KV head)."""

    starts: torch.Tensor  # [B, H, M] int64 first key of each candidate cluster
    lengths: torch.Tensor  # [B, H, M] int64 keys read from it (0 if not selected)
    scored: torch.Tensor  # [B, H] number of centroids scored (both levels)
    clusters: torch.Tensor | None = None  # [B, H, M] int64 the candidate clusters (the lookup's)
    counts: torch.Tensor | None = None  # [B, H, M] int64 their keys (0 where padding)
    coarse_kept: torch.Tensor | None = None  # [B, H, C1] bool: two-level, the coarse clusters kept


def centroid_logits(q: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, scaling: float) -> torch.Tensor:
    """Scores s of every query token against candidate centroids: [B, H, G, T, M], -inf if empty.

    q [B, H, G, T, D]; centroids [B or 1, H, M, D]; counts [B or 1, H, M].
    """
    s = torch.einsum("bhgtd,bhmd->bhgtm", q.float(), centroids.float()) * scaling
    return s.masked_fill((counts == 0)[:, :, None, None, :], NEG_INF)


def log_mass(s: torch.Tensor, counts: torch.Tensor, include: torch.Tensor | None = None) -> torch.Tensor:
    """log sum_k N_k exp(s_k) over the candidates (optionally only where `include`): [B, H, G, T]."""
    weighted = s + counts.float().log()[:, :, None, None, :]
    if include is not None:
        weighted = weighted.masked_fill(~include[:, :, None, None, :], NEG_INF)
    return torch.logsumexp(weighted, dim=-1)


def aggregate(logp: torch.Tensor, q_weight: torch.Tensor | None) -> torch.Tensor:
    """Per-token log p [B, H, G, T, M] -> one log p per (row, KV head, cluster): [B, H, M].

    Mean over the (valid) query tokens, then max over the query heads of the group.
    """
    tokens = logp.shape[3]
    if q_weight is None:
        log_w = torch.full((logp.shape[0], tokens), -math.log(tokens), device=logp.device)
    else:
        w = q_weight.float()
        log_w = (w / w.sum(-1, keepdim=True).clamp_min(1.0)).log()
    mean = torch.logsumexp(logp + log_w[:, None, None, :, None], dim=3)
    return mean.amax(dim=2)


def select(logp: torch.Tensor, counts: torch.Tensor, threshold: float | None, budget: int | None) -> torch.Tensor:
    """Which candidates to keep: [B, H, M] bool.

    With a threshold: log p >= threshold. With a budget: clusters in decreasing p until `budget`
    keys are reached (the cluster that crosses the budget is kept); equal probabilities are taken
    in cluster order, so the selection does not depend on the sort. With neither: all non-empty.
    """
    nonempty = counts > 0
    if threshold is not None:
        return (logp >= threshold) & nonempty
    if budget is None:
        return nonempty
    order = logp.sort(dim=-1, descending=True, stable=True).indices
    sorted_counts = counts.gather(-1, order)
    before = sorted_counts.cumsum(-1) - sorted_counts
    keep_sorted = (before < budget) & (sorted_counts > 0)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def expand_ranges(starts: torch.Tensor, lengths: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ranges into padded index lists, with work proportional to the selected items.

    starts, lengths [..., M] -> (indices [..., L], valid [..., L]) where row r lists
    starts[r, m] + i for i < lengths[r, m], m ascending. L is the longest row (found with one host
    synchronisation), or `width` when the caller knows a bound: then nothing waits for the device
    (a CUDA graph can capture it), and a row longer than `width` is an error of the caller's bound.
    """
    if width is not None:
        return _expand_ranges_static(starts, lengths, width)
    lead, m = starts.shape[:-1], starts.shape[-1]
    rows = math.prod(lead)
    starts, lengths = starts.reshape(rows, m), lengths.reshape(rows, m)
    per_row = lengths.sum(-1)
    # The output shape depends on the data: one host sync (both numbers in one transfer).
    width, total = torch.stack([per_row.max(), per_row.sum()]).tolist() if rows and m else (0, 0)
    flat_len = lengths.flatten()
    segment = torch.repeat_interleave(torch.arange(flat_len.numel(), device=starts.device), flat_len, output_size=total)
    seg_begin = flat_len.cumsum(0) - flat_len  # position of each range in the flat list
    row_begin = (per_row.cumsum(0) - per_row).repeat_interleave(m)  # position of each row's first item
    within = torch.arange(total, device=starts.device) - seg_begin[segment]
    col = seg_begin[segment] - row_begin[segment] + within
    indices = torch.zeros(rows, width, dtype=torch.long, device=starts.device)
    indices[segment // m, col] = starts.flatten()[segment] + within
    valid = torch.arange(width, device=starts.device) < per_row.unsqueeze(1)
    return indices.view(*lead, width), valid.view(*lead, width)


def _expand_ranges_static(starts, lengths, width: int):
    """`expand_ranges` into a known width: slot i of a row belongs to the first range that ends after
    i (a binary search over the row's running lengths), so the shapes never depend on the data."""
    lead, m = starts.shape[:-1], starts.shape[-1]
    slots = torch.arange(width, device=starts.device).expand(*lead, width)
    if m == 0:
        return torch.zeros_like(slots), torch.zeros_like(slots, dtype=torch.bool)
    ends = lengths.cumsum(-1)
    seg = torch.searchsorted(ends, slots.contiguous(), right=True).clamp(max=m - 1)
    begin = (ends - lengths).gather(-1, seg)
    valid = slots < ends[..., -1:]
    indices = torch.where(valid, starts.gather(-1, seg) + slots - begin, 0)
    return indices, valid


def _gather_heads(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table [H, M0, ...], ids [B, H, M] -> table[h, ids[b, h, m]]: [B, H, M, ...]."""
    heads = torch.arange(table.shape[0], device=ids.device)[None, :, None]
    return table[heads, ids]


def _score_every(q, centroids, counts, scaling, q_weight) -> tuple[Candidates, torch.Tensor]:
    """Score all centroids [H, M, D]: the candidates and the per-token scores s [B, H, G, T, M]."""
    batch = q.shape[0]
    s = centroid_logits(q, centroids[None], counts[None], scaling)
    logp = s - log_mass(s, counts[None]).unsqueeze(-1)
    heads, clusters = counts.shape
    ids = torch.arange(clusters, device=q.device).expand(batch, heads, clusters)
    return Candidates(ids, aggregate(logp, q_weight), counts[None].expand(batch, heads, clusters)), s


def score_flat(q, index, scaling, q_weight) -> tuple[Candidates, torch.Tensor]:
    """Score every (fine) centroid."""
    return _score_every(q, index.centroids, index.counts, scaling, q_weight)


def score_coarse(q, index, scaling, q_weight) -> tuple[Candidates, torch.Tensor]:
    """Score the coarse centroids."""
    return _score_every(q, index.coarse_centroids, index.coarse_counts, scaling, q_weight)


def score_fine(q, index, scaling, q_weight, coarse_kept: torch.Tensor, s1: torch.Tensor) -> Candidates:
    """Score only the fine centroids under the kept coarse clusters.

    The normaliser mixes resolutions: fine terms where fine centroids were scored, coarse terms
    (N_k exp(s1_k) of the coarse centroid) for the rejected coarse clusters, so it estimates the
    full sum without scoring any fine centroid under a rejected coarse cluster.
    """
    first = index.coarse_offsets[:, :-1][None].expand_as(coarse_kept)
    sizes = (index.coarse_offsets[:, 1:] - index.coarse_offsets[:, :-1])[None].expand_as(coarse_kept)
    ids, valid = expand_ranges(first, sizes * coarse_kept)
    counts = _gather_heads(index.counts, ids) * valid
    s2 = centroid_logits(q, _gather_heads(index.centroids, ids), counts, scaling)
    rejected = log_mass(s1, index.coarse_counts[None].expand_as(coarse_kept), include=~coarse_kept)
    log_norm = torch.logaddexp(log_mass(s2, counts), rejected)
    logp2 = s2 - log_norm.unsqueeze(-1)
    return Candidates(ids, aggregate(logp2, q_weight), counts)


def lookup(q: torch.Tensor, index, scaling: float, rule: SelectionRule, q_weight=None) -> Selection:
    """Select the key ranges of the fixed context that queries `q` [B, H, G, T, D] attend to."""
    batch, heads = q.shape[:2]
    if rule.exact:
        return every_cluster(index, batch)
    coarse_kept = None
    if index.coarse_centroids is None:
        cand, _ = score_flat(q, index, scaling, q_weight)
        scored = torch.full((batch, heads), index.counts.shape[1], device=q.device)
    else:
        coarse, s1 = score_coarse(q, index, scaling, q_weight)
        coarse_kept = select(coarse.logp, coarse.counts, *_level_rule(rule, coarse=True))
        cand = score_fine(q, index, scaling, q_weight, coarse_kept, s1)
        fine_per_coarse = index.coarse_offsets[:, 1:] - index.coarse_offsets[:, :-1]
        scored = index.coarse_counts.shape[1] + (fine_per_coarse[None] * coarse_kept).sum(-1)
    kept = select(cand.logp, cand.counts, *_level_rule(rule, coarse=False))
    starts = _gather_heads(index.offsets, cand.ids)
    return Selection(starts, cand.counts * kept, scored, cand.ids, cand.counts, coarse_kept)


# A pinned key brings the keys around it in the text: up to PIN_BEFORE before it and PIN_AFTER after
# it (what a generated answer copies follows the words the question matched: a value after its key).
PIN_BEFORE = 2
PIN_AFTER = 24


@dataclass
class Pinned:
    """Keys that stay selected for a request, per (batch row, KV head): cluster-sorted indices, in
    the forms the torch path and the kernels read."""

    rows: torch.Tensor  # [B, H, P] int32 the pinned keys, ascending (the first `count` of each row)
    count: torch.Tensor  # [B, H] int32
    mask: torch.Tensor  # [B, H, Nc] int8: 1 where pinned, so the lookup's ranges skip the key
    weights: torch.Tensor  # [B, H, G, Nc] float32: the input's attention that chose them (`key_weights`)

    @property
    def valid(self) -> torch.Tensor:
        return torch.arange(self.rows.shape[-1], device=self.rows.device) < self.count.unsqueeze(-1)

    def index_rows(self, rows: torch.Tensor) -> "Pinned":
        """The pins of batch rows `rows` (beam search, batch repeats)."""
        return Pinned(*(t[rows].contiguous() for t in (self.rows, self.count, self.mask, self.weights)))


def key_weights(q, index, scaling: float, q_valid, lse_rest: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """Per clustered key (cluster-sorted), its exact attention probability summed over the input's
    real query tokens (`q_valid` [B, T], or all), per query head: [B, H, G, Nc].

    q [B, H, G, T, D]; lse_rest [B, H, G, T]: log sum exp of the scores outside the clustered keys
    (sinks, window, dynamic tokens). Query tokens go `chunk` at a time: memory B H G chunk Nc.
    """
    batch, heads, group, tokens, _ = q.shape
    w = torch.ones(batch, tokens, device=q.device) if q_valid is None else q_valid.float()
    keys = index.keys  # in the model's dtype: no float copy of the context (scores come out in float32)
    total = torch.zeros(batch, heads, group, keys.shape[1], device=q.device)
    for t in range(0, tokens, chunk):
        s = torch.einsum("bhgtd,hnd->bhgtn", q[:, :, :, t : t + chunk].to(keys.dtype), keys).float() * scaling
        lse = torch.logaddexp(torch.logsumexp(s, -1), lse_rest[:, :, :, t : t + chunk])
        total += torch.einsum("bhgtn,bt->bhgn", torch.exp(s - lse.unsqueeze(-1)), w[:, t : t + chunk])
    return total


def pin_keys(weights: torch.Tensor, index, budget) -> Pinned:
    """The keys a user input pins: those within PIN_BEFORE / PIN_AFTER context positions of the keys
    of most weight (`key_weights` [B, H, G, Nc] summed over every input step of the request so far;
    a key's weight is the largest over the query heads of its group), about `budget` per (row, KV
    head) (an int, [B, 1, 1] per row, or [B, H] per row and head). A position's weight is the largest within its neighbourhood."""
    if index.positions is None:
        raise ValueError(
            "this index has no key positions, which pin reads: build the cache again with this version of "
            "hf_squeeze (SqueezedCache.from_context), or use SqueezeConfig(pin=0)"
        )
    per_key = weights.amax(2)
    batch, heads, n = per_key.shape
    positions = index.positions.long()[None].expand(batch, -1, -1)
    by_position = torch.zeros_like(per_key).scatter(-1, positions, per_key)
    # position i takes the largest weight of positions i - PIN_AFTER .. i + PIN_BEFORE
    padded = torch.nn.functional.pad(by_position, (PIN_AFTER, PIN_BEFORE), value=-1.0)
    pooled = padded.unfold(-1, PIN_AFTER + PIN_BEFORE + 1, 1).amax(-1)
    # positions, best first; equal weights (a neighbourhood shares one) in context order, so a row's
    # pins do not depend on the rows beside it
    if torch.is_tensor(budget):  # per row (or head): the largest decides the length (a host wait)
        budget = budget.to(weights.device)
        budget = budget.reshape(batch, heads, 1) if budget.numel() == batch * heads > 1 else budget.reshape(-1, 1, 1)
        order = pooled.sort(dim=-1, descending=True, stable=True).indices[..., : min(int(budget.max()), n)]
        count = budget.clamp(max=order.shape[-1]).expand(batch, heads, 1).squeeze(-1)
    else:  # an int budget waits for no device (a host value copied to the device would)
        order = pooled.sort(dim=-1, descending=True, stable=True).indices[..., : min(int(budget), n)]
        count = torch.full((batch, heads), order.shape[-1], dtype=torch.long, device=weights.device)
    valid = torch.arange(order.shape[-1], device=weights.device) < count.unsqueeze(-1)
    rank = torch.empty_like(positions).scatter_(-1, positions, torch.arange(n, device=weights.device).expand_as(positions))
    rows = rank.gather(-1, order)
    mask = torch.zeros(batch, heads, n, dtype=torch.int8, device=weights.device).scatter(-1, rows, valid.to(torch.int8))
    # in index order, so that the decode kernel's tiles read neighbouring rows (a cluster's keys are
    # stored together); the rows past `count` are 0
    rows = torch.where(valid, rows, n).sort(dim=-1).values.masked_fill(~valid, 0)
    return Pinned(rows.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(), mask, weights)


def rest_parts(q: torch.Tensor, index, scaling: float, selection: Selection):
    """What the clusters left out by `selection` contribute, estimated: each as N_j keys equal to its
    centroid with its mean value. Returns (centroids, value means, log N_j + where left out else
    -inf), each [B, H, M', ...]: a part of the keys for `attention.partial_attention` with that bias.

    Flat: the candidates not kept. Two-level: those under kept coarse clusters, and every rejected
    coarse cluster as a whole (its centroid and value mean).
    """
    if index.value_means is None:
        raise ValueError(
            "this index has no value means, which rest='estimate' reads: build the cache again with this "
            "version of hf_squeeze (SqueezedCache.from_context), or use rest='drop'"
        )
    counts = selection.counts
    left = (selection.lengths == 0) & (counts > 0)
    centroids = _gather_heads(index.centroids, selection.clusters)
    means = _gather_heads(index.value_means, selection.clusters)
    bias = counts.float().log().masked_fill(~left, NEG_INF)
    if selection.coarse_kept is not None:
        batch = q.shape[0]
        rejected = ~selection.coarse_kept & (index.coarse_counts[None] > 0)
        coarse_bias = index.coarse_counts[None].float().log().masked_fill(~rejected, NEG_INF)
        centroids = torch.cat([centroids, index.coarse_centroids[None].expand(batch, -1, -1, -1)], 2)
        means = torch.cat([means, index.coarse_value_means[None].expand(batch, -1, -1, -1)], 2)
        bias = torch.cat([bias, coarse_bias.expand(batch, -1, -1)], 2)
    return centroids, means, bias


def every_cluster(index, batch: int) -> Selection:
    """What an exact rule reads: every (fine) cluster of `index`, no centroid scored."""
    heads, clusters = index.counts.shape
    counts = index.counts[None].expand(batch, -1, -1)
    coarse_kept = None if index.coarse_counts is None else (index.coarse_counts[None] > 0).expand(batch, -1, -1)
    return Selection(
        starts=index.offsets[:, :-1][None].expand(batch, -1, -1),
        lengths=counts,
        scored=torch.zeros(batch, heads, dtype=torch.long, device=counts.device),
        clusters=torch.arange(clusters, device=counts.device).expand(batch, heads, -1),
        counts=counts,
        coarse_kept=coarse_kept,
    )


def _level_rule(rule: SelectionRule, coarse: bool) -> tuple[float | None, int | None]:
    if coarse:
        return rule.coarse_threshold, rule.coarse_budget
    return rule.threshold, rule.budget
