"""Baselines built from the squeezed cache's own parts, so that every method shares one harness.

A baseline is a `LayerIndex` laid out differently (what a "cluster" is) plus, where needed, another
way of choosing clusters (`SparseAttention.select_ranges`); attention over the chosen key ranges, the
sinks, the observation window and the new tokens is the squeezed cache's, unchanged.

- Oracle top-k: every key is its own cluster and its own centroid, so the lookup's "estimated"
  probability is the exact attention probability; top-k then keeps the truly highest-scoring keys.
  It is the ceiling of any selection made at the same granularity (one selection per KV head,
  shared by its query heads, per user input and per generated token).
- Quest (Tang et al., 2024): pages of 16 consecutive keys; a page's score is the upper bound
  sum_d max(q_d * min_d, q_d * max_d) over its element-wise min/max keys; the top pages are read.
  Quest selects per query head at decode only; here it selects at the same granularity as every
  other method (bounds turned into page probabilities, averaged over the input, max over the query
  heads of a KV head), including the question's prefill.
- StreamingLLM (Xiao et al., 2023): the attention sinks plus a recent window, nothing else: the
  observation window extended by `budget` tokens (the page layout, in context order, read as one
  range ending where the window starts).

Rows of one batch may carry different budgets or thresholds (tensors [B, 1, 1] in the rule), so every
keep of a method answers in one `generate` call: the torch path is bound by kernel launches, and a
batch of 30 rows costs about what one row costs.
"""

from __future__ import annotations

import torch

from .. import kernels as _kernels
from ..attention import SparseAttention
from ..cache import SqueezedCache, SqueezedLayer
from ..index import LayerIndex
from ..kernels.graphs import GraphPools
from ..selection import Selection, aggregate, log_mass, lookup, select


def clustered_span(n: int, sinks: int, window: int) -> slice:
    """The context tokens that the squeezed index clusters: all but the sinks and the window."""
    return slice(sinks, n - window)


def _per_head(values: torch.Tensor, heads: int) -> torch.Tensor:
    return values[None].expand(heads, -1).contiguous()


def oracle_index(key: torch.Tensor, value: torch.Tensor, sinks: int, window: int) -> LayerIndex:
    """Every clustered key is a cluster of one, with itself as centroid. key/value: [H, N, D]."""
    heads, n, _ = key.shape
    span = clustered_span(n, sinks, window)
    keys = key[:, span].contiguous()
    count = keys.shape[1]
    dense = torch.cat([key[:, :sinks], key[:, span.stop :]], 1)
    dense_v = torch.cat([value[:, :sinks], value[:, span.stop :]], 1)
    return LayerIndex(
        keys=keys,
        values=value[:, span].contiguous(),
        centroids=keys.float(),
        counts=torch.ones(heads, count, dtype=torch.long, device=key.device),
        offsets=_per_head(torch.arange(count + 1, device=key.device), heads),
        dense_keys=dense.contiguous(),
        dense_values=dense_v.contiguous(),
    )


def page_index(key: torch.Tensor, value: torch.Tensor, sinks: int, window: int, page: int):
    """Pages of `page` consecutive clustered keys, in context order, and their min/max keys [H, P, D]."""
    heads, n, dim = key.shape
    span = clustered_span(n, sinks, window)
    keys, values = key[:, span].contiguous(), value[:, span].contiguous()
    count = keys.shape[1]
    pages = -(-count // page)
    starts = torch.arange(pages + 1, device=key.device) * page
    starts[-1] = count
    padded = torch.full((heads, pages * page, dim), float("nan"), device=key.device)
    padded[:, :count] = keys.float()
    padded = padded.view(heads, pages, page, dim)
    low = torch.where(padded.isnan(), torch.inf, padded).amin(2)
    high = torch.where(padded.isnan(), -torch.inf, padded).amax(2)
    sizes = (starts[1:] - starts[:-1])[None].expand(heads, -1).contiguous()
    means = torch.nan_to_num(padded, nan=0.0).sum(2) / sizes.unsqueeze(-1)
    dense = torch.cat([key[:, :sinks], key[:, span.stop :]], 1)
    dense_v = torch.cat([value[:, :sinks], value[:, span.stop :]], 1)
    index = LayerIndex(
        keys=keys,
        values=values,
        centroids=means,
        counts=sizes,
        offsets=_per_head(starts, heads),
        dense_keys=dense.contiguous(),
        dense_values=dense_v.contiguous(),
    )
    return index, low, high


def quest_scores(q: torch.Tensor, low: torch.Tensor, high: torch.Tensor, scaling: float) -> torch.Tensor:
    """Quest's upper bound of q.k over each page: [B, H, G, T, P] from q [B, H, G, T, D], low/high [H, P, D]."""
    q = q.float()
    bound = torch.einsum("bhgtd,hpd->bhgtp", q.clamp(min=0), high) + torch.einsum("bhgtd,hpd->bhgtp", q.clamp(max=0), low)
    return bound * scaling


# ---- selection policies: (layer, q, scaling, q_weight) -> Selection --------------------------------


def centroid_policy(layer, q, scaling, q_weight) -> Selection:
    """The method's own lookup (also the oracle's, whose centroids are the keys themselves)."""
    return lookup(q, layer.index, scaling, layer.rule, q_weight)


def quest_policy(layer, q, scaling, q_weight) -> Selection:
    """Top pages by Quest's bound, turned into page probabilities like the centroid estimate."""
    index = layer.index
    batch, heads = q.shape[:2]
    counts = index.counts[None].expand(batch, -1, -1)
    s = quest_scores(q, layer.extra[0], layer.extra[1], scaling)
    logp = s - log_mass(s, index.counts[None]).unsqueeze(-1)
    keep = select(aggregate(logp, q_weight), counts, None, layer.rule.budget)
    starts = index.offsets[:, :-1][None].expand(batch, -1, -1)
    pages = torch.full((batch, heads), index.counts.shape[1], device=q.device)
    return Selection(starts, counts * keep, pages)


def streaming_policy(layer, q, scaling, q_weight) -> Selection:
    """The `budget` clustered tokens just before the observation window: StreamingLLM's recent window."""
    index = layer.index
    batch, heads = q.shape[:2]
    budget = torch.as_tensor(layer.rule.budget, device=q.device).reshape(-1, 1, 1).expand(batch, heads, 1)
    total = index.clustered_tokens
    budget = budget.clamp(max=total)
    return Selection(total - budget, budget, torch.zeros(batch, heads, device=q.device))


class EvalAttention(SparseAttention):
    """A layer's attention whose selection policy is pluggable and whose reads are recorded per batch row.

    Rows of one batch may carry different rules (a budget or threshold per row, as tensors [B, 1, 1]),
    so that several keeps of one method answer in one `generate` call.
    """

    def __init__(self, index, rule, policy, extra=None, kernels: bool = False, graph_pools=None):
        super().__init__(index, rule, graph_pools=graph_pools)
        self.policy, self.extra, self.kernels = policy, extra, kernels
        self.row_read = self.row_scored = None
        self.row_selections = 0

    def attend(self, query, key, value, attention_mask, scaling):
        # The torch reference path, whose selection is pluggable, unless this layer serves the method's
        # own lookup with `kernels` (one rule for every row): then what users run, the Triton kernels
        # where they can serve (a CUDA device), with the reads of a step shared out evenly over its rows.
        if not self.kernels or _kernels.supports(self.index, query) is not None:
            return self.attend_reference(query, key, value, attention_mask, scaling)
        device = query.device
        keys_before = self.kernel_keys.to(device).sum()
        fine_before = self.kernel_fine_scored.to(device).sum()
        out = super().attend(query, key, value, attention_mask, scaling)
        rows = query.shape[0] * self.index.keys.shape[0]
        keys = (self.kernel_keys.sum() - keys_before).double() / rows
        # every centroid of a flat index (of a two-level one every coarse centroid; none for a step
        # that reads every key), and the fine ones the kernels counted on the device
        first = 0 if self.step_rule(query.shape[2]).exact else self.first_level_centroids()
        scored = first + (self.kernel_fine_scored.sum() - fine_before).double() / rows
        self.record_rows(keys.expand(query.shape[0]) / self.index.clustered_tokens, scored.expand(query.shape[0]))
        return out

    def select_ranges(self, q, scaling, q_weight):
        return self.policy(self, q, scaling, q_weight)

    def count_reads(self, keys, scored):
        super().count_reads(keys, scored)
        self.record_rows(keys.double().mean(-1) / self.index.clustered_tokens, scored.double().mean(-1))

    def record_rows(self, read: torch.Tensor, scored: torch.Tensor):
        """One step's reads per batch row [B]: the fraction of clustered keys, the centroids scored
        (added in place, so that a replayed CUDA graph of the step adds them again)."""
        if self.row_read is None:
            self.row_read, self.row_scored = torch.zeros_like(read), torch.zeros_like(scored)
        self.row_read.add_(read)
        self.row_scored.add_(scored)
        if not torch.compiler.is_compiling():  # a compiled step is counted by `fold_compiled_steps`
            self.row_selections += 1

    def count_replays(self, times: int) -> None:
        super().count_replays(times)
        self.row_selections += times


class EvalCache(SqueezedCache):
    """A SqueezedCache whose layers read through `EvalAttention`. `extras`: per layer, what the policy
    needs (Quest's bounds)."""

    def __init__(self, fixed, policy=centroid_policy, extras=None, kernels: bool = False):
        self.fixed, self.policy, self.kernels = fixed, policy, kernels
        self.extras = extras or [None] * len(fixed.layers)
        pools = GraphPools()
        layers = [
            SqueezedLayer(EvalAttention(index, rule, policy, extra, kernels, pools), fixed.num_tokens)
            for index, rule, extra in zip(fixed.layers, fixed.rules, self.extras)
        ]
        super(SqueezedCache, self).__init__(layers=layers)

    def fork(self) -> "EvalCache":
        return type(self)(self.fixed, self.policy, self.extras, self.kernels)

    def row_stats(self) -> tuple[list[float], list[float]]:
        """Per batch row: the fraction of clustered keys read and the centroids scored, per selection."""
        for layer in self.layers:
            layer.attention.fold_compiled_steps()
        layers = [layer.attention for layer in self.layers if layer.attention.row_selections]
        if not layers:
            return [], []
        steps = sum(layer.row_selections for layer in layers)
        read = sum(layer.row_read.cpu() for layer in layers) / steps
        scored = sum(layer.row_scored.cpu() for layer in layers) / steps
        return read.tolist(), scored.tolist()
