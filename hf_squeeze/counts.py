"""What a layer's attention read: the statistics behind `SqueezedCache.stats()` and the eval's reads.

Counts live where each path can keep them without waiting for the device: the torch path adds
per-step totals to device tensors in place, the kernels add the keys they keep to a device
counter, and the host adds what it knows without looking (selections; every centroid of a flat
index). A step the host never sees is added later: the replays of a CUDA graph by `count_replays`,
a compiled step by a device count folded in on read (`fold_compiled_steps`).
"""

from __future__ import annotations

import torch


class ReadCounts:
    """The counts of one layer's `SparseAttention` (which holds `index`) since its last reset."""

    def reset_stats(self):
        """Start the counts over (a fresh request). The counters start where the index is, so that
        its steps add to them without copying them over (a copy from the host waits for the device)."""
        device = self.index.keys.device
        self.read_fraction_sum = torch.zeros((), dtype=torch.float64, device=device)  # reference path
        self.scored_sum = torch.zeros((), dtype=torch.float64, device=device)
        # The device counters of the kernel path and of compiled steps, one tensor (`kernel_keys`,
        # `kernel_fine_scored`, `compiled_steps` are its parts): a compiled step checks every tensor it
        # reads before it runs (dynamo's guards), so each one costs every step.
        self.kernel_counts = torch.zeros(3, dtype=torch.int64, device=device)
        self.kernel_scored = 0  # centroids the kernel path scored: all (flat) or all coarse ones, per inexact step
        self.last_selections, self.last_kernel = 0, False  # the last step's selections, its path
        self.last_exact = False  # whether it read every key (an exact rule: no centroid scored)
        self.selections = 0

    @property
    def kernel_keys(self) -> torch.Tensor:
        """[1] int64: keys the kernels read (the lookup's and the pinned ones)."""
        return self.kernel_counts[0:1]

    @property
    def kernel_fine_scored(self) -> torch.Tensor:
        """[1] int64: fine centroids the kernels scored (two-level index)."""
        return self.kernel_counts[1:2]

    @property
    def compiled_steps(self) -> torch.Tensor:
        """[1] int64: steps run compiled (see `fold_compiled_steps`)."""
        return self.kernel_counts[2:3]

    def count_selections(self, selections: int, times: int = 1, exact: bool = False):
        """Host-side statistics of the kernel path (a replayed CUDA graph calls `attend` only once,
        so the replay loop adds the other steps with `times`); `exact`: the steps read every key,
        scoring no centroid. A compiled step is counted on the device instead, by its attention
        kernel (`compiled_steps`; a host count would be a guard that changes every step)."""
        if torch.compiler.is_compiling():
            return
        self.selections += selections * times
        # all centroids of a flat index; of a two-level one all coarse ones (the fine ones scored
        # are counted on the device, in kernel_fine_scored)
        if not exact:
            self.kernel_scored += selections * self.first_level_centroids() * times
        self.last_selections, self.last_kernel, self.last_exact = selections, True, exact

    def first_level_centroids(self) -> int:
        """Centroids a lookup scores first: all of a flat index, the coarse ones of a two-level one."""
        first = self.index.counts if self.index.coarse_counts is None else self.index.coarse_counts
        return first.shape[1]

    def count_replays(self, times: int) -> None:
        """A CUDA graph of a decode step replayed `times` more times ran this layer's last step again
        without its Python: add that step's host-side counts (the device counters add themselves)."""
        if self.last_kernel:
            self.count_selections(self.last_selections, times, self.last_exact)
        else:
            self.selections += self.last_selections * times

    def count_reads(self, keys: torch.Tensor, scored: torch.Tensor) -> None:
        """Statistics of one step of the reference path: clustered keys read and centroids scored,
        per (batch row, KV head) [B, H]."""
        read = keys.double() / self.index.clustered_tokens
        # in place, so that a replayed CUDA graph of the step adds too (see `count_replays`)
        self.read_fraction_sum = self.read_fraction_sum.to(read.device).add_(read.sum())
        self.scored_sum = self.scored_sum.to(read.device).add_(scored.double().sum())
        self.kernel_counts = self.kernel_counts.to(read.device)
        if self._counted_on_device():
            return
        self.selections += keys.numel()
        self.last_selections, self.last_kernel = keys.numel(), False

    def _counted_on_device(self) -> bool:
        """In a compiled step: count it on the device (its host counts are added by
        `fold_compiled_steps`, as those of the request's last eager step) and say so."""
        if not torch.compiler.is_compiling():
            return False
        self.compiled_steps.add_(1)
        return True

    def fold_compiled_steps(self) -> None:
        """Add the host counts of the steps that ran compiled (one host sync)."""
        steps = int(self.compiled_steps.sum())
        if steps:
            self.compiled_steps.zero_()
            self.count_replays(steps)

    def read_and_scored(self) -> tuple[float, float]:
        """Totals since the last reset: clustered-key fractions read, centroids scored (host sync)."""
        self.fold_compiled_steps()
        read = float(self.read_fraction_sum) + float(self.kernel_keys.sum()) / self.index.clustered_tokens
        scored = float(self.scored_sum) + self.kernel_scored + float(self.kernel_fine_scored.sum())
        return read, scored
