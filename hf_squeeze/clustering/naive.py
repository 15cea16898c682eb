"""Readable references of the K-means kernels (`kernels.py`), in plain torch; also the CPU path of
the clustering."""

from __future__ import annotations

import torch

_SIM_CHUNK = 1 << 26  # similarity matrix entries computed at once


def assign(x: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best center (largest dot product) of every point: labels [H, N] int64, similarity [H, N] fp32."""
    heads, n, _ = x.shape
    step = max(1, _SIM_CHUNK // max(1, heads * centers.shape[1]))
    labels = torch.empty(heads, n, dtype=torch.long, device=x.device)
    best = torch.empty(heads, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, step):
        sim = torch.bmm(x[:, start : start + step], centers.transpose(1, 2))
        best[:, start : start + step], labels[:, start : start + step] = sim.max(-1)
    return labels, best


def cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Sum of the points of each cluster, in float32: [H, k, D]."""
    heads = x.shape[0]
    flat = (labels + (torch.arange(heads, device=x.device) * k).unsqueeze(1)).flatten()
    sums = torch.zeros(heads * k, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, flat, x.flatten(0, 1).float())
    return sums.view(heads, k, -1)


def seeding_gains(x: torch.Tensor, candidates: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Drop of the potential if each candidate [H, M, D] alone became a center: [H, M] float32."""
    heads, n, _ = x.shape
    step = max(1, _SIM_CHUNK // max(1, heads * n))
    out = []
    for start in range(0, candidates.shape[1], step):
        sim = torch.bmm(candidates[:, start : start + step], x.transpose(1, 2)).float()
        out.append((sim + (dist - 1.0)[:, None]).clamp_min_(0.0).sum(-1))
    return torch.cat(out, 1)
