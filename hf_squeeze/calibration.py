"""Selection rules of a fixed context: a budget of keys (top-k), or thresholds calibrated on the
observation window's queries (the paper's rule).

A threshold on the estimated probability of a key is chosen so that, over the observation-window
queries (each one taken as a decode step, which makes its own selection) and the KV heads, a
fraction `keep` of the clustered keys lies above it; one threshold per layer, or one for all
layers (`threshold_scope="global"`, as the paper).
"""

from __future__ import annotations

import torch

from .config import SqueezeConfig
from .selection import SelectionRule, score_coarse, score_fine, score_flat, select

# Calibration pools this many (query, cluster) pairs at most; beyond that a random subset is used.
_CALIBRATION_PAIRS = 1 << 24


def budget_rules(layers: int, clustered_tokens: int, config: SqueezeConfig) -> list[SelectionRule]:
    """The rule of every layer when no calibration is needed: exact (keep=1) or a top-k budget."""
    if config.keep >= 1.0:
        return [SelectionRule(exact=True)] * layers
    if config.selection != "topk":
        raise ValueError(f"selection={config.selection!r} is calibrated on the observation window: use calibrate()")
    budget = max(1, round(config.lookup_keep * clustered_tokens))  # pinned keys are part of keep
    coarse_budget = max(1, round(config.coarse_keep * clustered_tokens)) if config.hierarchical else None
    return [SelectionRule(budget=budget, coarse_budget=coarse_budget, **_extras(config, clustered_tokens))] * layers


def _extras(config: SqueezeConfig, clustered_tokens: int) -> dict:
    """The rule's fields that do not depend on the layer: the rest, the input's prefill, the pins."""
    pin_budget = max(1, round(config.keep * config.pin * clustered_tokens)) if config.pin > 0 else None
    return dict(estimate_rest=config.rest == "estimate", exact_prefill=config.prefill == "exact", pin_budget=pin_budget)


def calibrate(indices, window_queries: list[torch.Tensor], scalings: list[float], config: SqueezeConfig) -> list[SelectionRule]:
    """Resolve the selection rule of every layer for this context (thresholds calibrated; see above).

    indices: per layer, its `LayerIndex`; window_queries: per layer [Hq, W, D]; scalings: per
    layer, the attention scale. Likewise `coarse_keep` for the coarse level of a two-level index.
    """
    clustered = indices[0].clustered_tokens
    if config.keep >= 1.0 or config.selection == "topk":
        return budget_rules(len(indices), clustered, config)

    def as_steps(q, index):  # [Hq, W, D] -> [W, H, G, 1, D]: every window token is one decode step
        heads = index.keys.shape[0]
        return q.view(heads, -1, q.shape[1], q.shape[2]).permute(2, 0, 1, 3).unsqueeze(3)

    steps = [as_steps(q, index) for q, index in zip(window_queries, indices)]
    totals = [s.shape[0] * s.shape[1] * clustered for s in steps]  # (queries x heads) x keys per layer

    coarse_thresholds = [None] * len(indices)
    if config.hierarchical:
        coarse = [score_coarse(q, index, scaling, None) for q, index, scaling in zip(steps, indices, scalings)]
        coarse_thresholds = _thresholds([c for c, _ in coarse], totals, config.coarse_keep, config)
        cands = []
        for q, index, scaling, (c1, s1), t1 in zip(steps, indices, scalings, coarse, coarse_thresholds):
            coarse_kept = select(c1.logp, c1.counts, t1, None)
            cands.append(score_fine(q, index, scaling, None, coarse_kept, s1))
    else:
        cands = [score_flat(q, index, scaling, None)[0] for q, index, scaling in zip(steps, indices, scalings)]
    thresholds = _thresholds(cands, totals, config.lookup_keep, config)
    return [SelectionRule(threshold=t, coarse_threshold=t1, **_extras(config, clustered))
            for t, t1 in zip(thresholds, coarse_thresholds)]


def _thresholds(cands, totals: list[int], keep: float, config: SqueezeConfig) -> list[float]:
    if config.threshold_scope == "global":
        where = cands[0].logp.device  # layers may live on several devices
        logp = torch.cat([c.logp.flatten().to(where) for c in cands])
        counts = torch.cat([c.counts.flatten().to(where) for c in cands])
        return [_weighted_quantile(logp, counts, sum(totals), keep, config.seed)] * len(cands)
    return [
        _weighted_quantile(c.logp.flatten(), c.counts.flatten(), total, keep, config.seed)
        for c, total in zip(cands, totals)
    ]


def _weighted_quantile(logp: torch.Tensor, weight: torch.Tensor, total: float, keep: float, seed: int) -> float:
    """Largest t such that the weight of {logp >= t} reaches keep * total (weights: keys per cluster)."""
    usable = weight > 0
    logp, weight = logp[usable], weight[usable].float()
    if logp.numel() > _CALIBRATION_PAIRS:
        generator = torch.Generator(device=logp.device).manual_seed(seed)
        pick = torch.randperm(logp.numel(), generator=generator, device=logp.device)[:_CALIBRATION_PAIRS]
        total = total * _CALIBRATION_PAIRS / logp.numel()
        logp, weight = logp[pick], weight[pick]
    order = logp.argsort(descending=True)
    reached = weight[order].cumsum(0) >= keep * total
    if not bool(reached.any()):
        return float(logp.min())
    return float(logp[order][int(reached.nonzero()[0])])
