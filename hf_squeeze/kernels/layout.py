"""The device-side view of a layer index that the Triton kernels read.

Derived once per layer (and device) from a `LayerIndex`, never saved: the cluster-sorted K/V are
shared, not copied; what is added is small (per-row cluster ids, per-tile cluster bounds, the
centroids in the keys' dtype, log counts).

The kernels read the selected keys in *tiles* of `TILE_ROWS` consecutive rows of the
cluster-sorted order. A tile is needed when one of its rows belongs to a kept cluster; rows of
dropped clusters inside a needed tile are masked at load, so the bytes read are exactly the kept
keys while the work list stays a plain array of tile ids (built on the device by a cumulative sum,
with no per-key index list and no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE_ROWS = 32


@dataclass(frozen=True)
class KernelIndex:
    keys: torch.Tensor  # [H, Nc, D] cluster-sorted keys (shared with the LayerIndex)
    values: torch.Tensor  # [H, Nc, D]
    dense_keys: torch.Tensor  # [H, S + W, D] sinks + observation window
    dense_values: torch.Tensor  # [H, S + W, D]
    centroids: torch.Tensor  # [H, C, D] in the keys' dtype: centroids are read like keys
    log_counts: torch.Tensor  # [H, C] float32 log of keys per cluster, -inf if empty
    counts: torch.Tensor  # [H, C] int32
    row_cluster: torch.Tensor  # [H, Nc] int32 cluster of each row
    tile_first: torch.Tensor  # [H, NT] int32 cluster of the first row of each tile
    tile_last: torch.Tensor  # [H, NT] int32 cluster of the last row of each tile

    @property
    def heads(self) -> int:
        return self.keys.shape[0]

    @property
    def clusters(self) -> int:
        return self.counts.shape[1]

    @property
    def clustered_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def tiles(self) -> int:
        return self.tile_first.shape[1]


def kernel_index(index, dtype: torch.dtype | None = None) -> KernelIndex:
    """Build the kernel view of a flat `LayerIndex` on its own device."""
    keys = index.keys
    dtype = dtype or keys.dtype
    heads, rows, _ = keys.shape
    clusters = index.counts.shape[1]
    counts = index.counts
    ids = torch.arange(clusters, device=keys.device).expand(heads, clusters)
    row_cluster = torch.repeat_interleave(ids.flatten(), counts.flatten(), output_size=heads * rows)
    row_cluster = row_cluster.view(heads, rows).to(torch.int32)
    tiles = -(-rows // TILE_ROWS)
    first = torch.arange(tiles, device=keys.device) * TILE_ROWS
    last = (first + TILE_ROWS - 1).clamp_max(rows - 1)
    return KernelIndex(
        keys=keys.to(dtype).contiguous(),
        values=index.values.to(dtype).contiguous(),
        dense_keys=index.dense_keys.to(dtype).contiguous(),
        dense_values=index.dense_values.to(dtype).contiguous(),
        centroids=index.centroids.to(dtype).contiguous(),
        log_counts=counts.float().log().contiguous(),
        counts=counts.to(torch.int32).contiguous(),
        row_cluster=row_cluster.contiguous(),
        tile_first=row_cluster[:, first].contiguous(),
        tile_last=row_cluster[:, last].contiguous(),
    )
