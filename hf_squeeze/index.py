"""Offline index of a fixed context: clusters, cluster-sorted K/V, the optional two-level tree.

Attention does not depend on the order of keys once RoPE is applied, so each head's clustered keys
(and their values) are stored permuted so that every cluster is one contiguous range, described by
CSR `offsets`. Selecting clusters then yields key ranges: no per-token mask over the context.
With the two-level tree, fine clusters are ordered by their coarse parent, so a coarse cluster is
also one contiguous range of fine clusters (`coarse_offsets`) and of keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from tqdm.auto import tqdm

from .clustering import cluster_means, cluster_sums, head_seeds, kmeans
from .config import SqueezeConfig
from .devices import on_device

# Heads of several layers are clustered together, in groups of at most this many elements of keys
# (one layer at 128K tokens and Llama-3.1-8B shapes holds 8 x 131K x 128 = 2^27): big enough to
# fill a GPU, small enough that a group's normalised copy stays a few GB at 1M tokens.
_KMEANS_GROUP_ELEMENTS = 1 << 31


@dataclass(frozen=True)
class LayerIndex:
    """The immutable fixed part of one layer. Shared by every fork and deep copy of a cache."""

    keys: torch.Tensor  # [H, Nc, D] clustered keys, sorted by cluster (model dtype)
    values: torch.Tensor  # [H, Nc, D]
    centroids: torch.Tensor  # [H, C, D] float32 mean of the raw keys of each cluster
    counts: torch.Tensor  # [H, C] int64 keys per cluster
    offsets: torch.Tensor  # [H, C + 1] int64 first key of each cluster
    dense_keys: torch.Tensor  # [H, S + W, D] attention sinks + observation window, always attended
    dense_values: torch.Tensor  # [H, S + W, D]
    coarse_centroids: torch.Tensor | None = None  # [H, C1, D] float32
    coarse_counts: torch.Tensor | None = None  # [H, C1] int64 keys under each coarse cluster
    coarse_offsets: torch.Tensor | None = None  # [H, C1 + 1] int64 first fine cluster of each
    # The mean value of each cluster (float32), what estimates the clusters attention leaves out
    # (SqueezeConfig.rest="estimate"); absent from indexes built without them.
    value_means: torch.Tensor | None = None  # [H, C, D]
    coarse_value_means: torch.Tensor | None = None  # [H, C1, D]
    # Where each clustered key stood in the context (0 = first clustered token), for selections that
    # follow the text's order (SqueezeConfig.pin); absent from indexes built without them.
    positions: torch.Tensor | None = None  # [H, Nc] int32

    def __deepcopy__(self, memo):
        return self

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def clustered_tokens(self) -> int:
        return self.keys.shape[1]

    def to(self, device, non_blocking: bool = False) -> "LayerIndex":
        """This index on `device`. Moved from a GPU to the CPU, the tensors are pinned, so that
        moving them back later can be non-blocking (overlapping other work)."""
        device = torch.device(device)
        pin = device.type == "cpu" and self.keys.device.type == "cuda"
        moved = {}
        for name, tensor in self.tensors().items():
            if pin:
                moved[name] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor, non_blocking=non_blocking)
            else:
                moved[name] = tensor.to(device, non_blocking=non_blocking)
        if pin and non_blocking:
            torch.cuda.current_stream(self.keys.device).synchronize()  # pinned copies are complete before use
        return LayerIndex(**moved)


def _groups(devices: list[torch.device], heads: int, n: int, dim: int) -> list[range]:
    """Consecutive layers clustered together: at most _KMEANS_GROUP_ELEMENTS, all on one device."""
    per_group = max(1, _KMEANS_GROUP_ELEMENTS // max(1, heads * n * dim))
    groups, start = [], 0
    for i in range(1, len(devices) + 1):
        if i == len(devices) or i - start == per_group or devices[i] != devices[start]:
            groups.append(range(start, i))
            start = i
    return groups


def _sort_by_cluster(labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation [H, N] that makes each cluster contiguous, and CSR offsets [H, k + 1]."""
    order = labels.argsort(dim=-1, stable=True)
    counts = torch.zeros(labels.shape[0], k, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    offsets = torch.cat([counts.new_zeros(labels.shape[0], 1), counts.cumsum(-1)], dim=1)
    return order, offsets


def build_indices(
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    config: SqueezeConfig,
    *,
    device=None,
    storage=None,
    progress: bool = False,
    heads_of: tuple[int, int] | None = None,
) -> list[LayerIndex]:
    """Build the index of every layer from its context keys/values [H, N, D] (post-RoPE keys).

    The work runs on `device` (default: where each layer's keys are; or one device per layer, as
    for a model spread over several GPUs), a group of layers at a time, so keys may wait in CPU
    memory while the GPU clusters them. Each finished `LayerIndex` is moved to `storage` (default:
    where it was built); with storage="cpu" only one group of layers is on the GPU at any time,
    which is how a context larger than GPU memory is indexed. `heads_of`: (first head, heads of the
    model) when `keys` hold a slice of the model's KV heads (a tensor-parallel rank's): each head
    draws the random numbers of its place in the whole model, so a rank builds the index one
    process builds for those heads.
    """
    if device is None:
        devices = [key.device for key in keys]
    elif isinstance(device, (list, tuple)):
        if len(device) != len(keys):
            raise ValueError(f"device lists {len(device)} devices for {len(keys)} layers: give one per layer")
        devices = [torch.device(d) for d in device]
    else:
        devices = [torch.device(device)] * len(keys)
    storage = torch.device(storage) if storage is not None else None
    heads, n, dim = keys[0].shape
    clustered = slice(config.sinks, n - config.window)
    num_clustered = clustered.stop - clustered.start
    k = config.num_clusters(num_clustered)
    k1 = config.num_coarse_clusters(num_clustered) if config.hierarchical else None
    indices = []
    bar = tqdm(total=len(keys), desc="cluster keys", unit="layer", disable=not progress)
    # One random stream per (layer, head): a head's clusters do not depend on how layers are grouped,
    # so a model spread over several GPUs gets the index it would get on one.
    first, total = heads_of or (0, heads)
    seeds = head_seeds(len(keys) * total, config.seed).view(len(keys), total)[:, first : first + heads]
    for group in _groups(devices, heads, num_clustered, dim):
        work = devices[group.start]
        with on_device(work):  # Triton launches on the current CUDA device
            group_keys = [keys[i].to(work, non_blocking=True) for i in group]
            group_seeds = seeds[group.start : group.stop].flatten()
            labels = kmeans(torch.cat([key[:, clustered] for key in group_keys]), k, config.kmeans_iters, group_seeds)
            labels = labels.split(heads)
            means = [cluster_means(key[:, clustered], label, k) for key, label in zip(group_keys, labels)]
            if k1 is not None:  # the tree: cluster the fine centroids of the group, again batched
                coarse_seeds = group_seeds + (1 << 40)  # streams apart from the fine level's
                parents = kmeans(torch.cat([c for c, _ in means]), k1, config.kmeans_iters, coarse_seeds).split(heads)
            else:
                parents = [None] * len(group)
            for i, key, label, (centroids, counts), parent in zip(group, group_keys, labels, means, parents):
                value = values[i].to(work, non_blocking=True)
                index = _layer_index(key, value, label, centroids, counts, parent, config)
                indices.append(index.to(storage) if storage is not None and storage != work else index)
                bar.update(1)
    bar.close()
    return indices


def _layer_index(key, value, label, centroids, counts, parent, config) -> LayerIndex:
    clustered = slice(config.sinks, key.shape[1] - config.window)
    dense = torch.cat([torch.arange(config.sinks), torch.arange(clustered.stop, key.shape[1])]).to(key.device)
    heads = torch.arange(key.shape[0], device=key.device)[:, None]
    # The clusters' mean values, read only by rest="estimate": not built (nor stored) otherwise.
    estimate = config.rest == "estimate"
    value_means = cluster_means(value[:, clustered], label, centroids.shape[1])[0] if estimate else None
    extra = {}
    if parent is not None:
        k1 = config.num_coarse_clusters(clustered.stop - clustered.start)
        # A coarse centroid is the mean of the raw keys under it: the count-weighted mean of its children.
        key_sums, _ = cluster_sums(centroids * counts.unsqueeze(-1), parent, k1)
        value_sums = cluster_sums(value_means * counts.unsqueeze(-1), parent, k1)[0] if estimate else None
        coarse_counts = torch.zeros(key.shape[0], k1, dtype=torch.long, device=key.device)
        coarse_counts.scatter_add_(1, parent, counts)
        # Renumber fine clusters so that the children of each coarse cluster are contiguous.
        fine_order, coarse_offsets = _sort_by_cluster(parent, k1)
        rank = torch.empty_like(fine_order)
        rank[heads, fine_order] = torch.arange(fine_order.shape[1], device=key.device).expand_as(fine_order)
        label = rank.gather(1, label)
        centroids, counts = centroids[heads, fine_order], counts[heads, fine_order]
        coarse_centroids = key_sums / coarse_counts.clamp_min(1).unsqueeze(-1)
        extra = dict(coarse_centroids=coarse_centroids, coarse_counts=coarse_counts, coarse_offsets=coarse_offsets)
        if estimate:
            value_means = value_means[heads, fine_order]
            extra["coarse_value_means"] = (value_sums / coarse_counts.clamp_min(1).unsqueeze(-1)).contiguous()
    order, offsets = _sort_by_cluster(label, centroids.shape[1])
    return LayerIndex(
        keys=key[:, clustered][heads, order].contiguous(),
        values=value[:, clustered][heads, order].contiguous(),
        centroids=centroids.contiguous(),
        counts=counts,
        offsets=offsets,
        dense_keys=key[:, dense].contiguous(),
        dense_values=value[:, dense].contiguous(),
        value_means=value_means.contiguous() if estimate else None,
        positions=order.to(torch.int32).contiguous(),
        **extra,
    )
