"""Where the lookup's selection spends its time: `_select_kernel` alone, replayed from a CUDA graph.

One program per (row, KV head) keeps the clusters of most probability up to a budget of keys: a
search for the crossing cluster's log p, then the keep flags, the per-block sums the compaction
places its pieces by, and the totals. A threshold keeps the same clusters without the search. So,
per number of clusters (8 KV heads, batch 1; log p of Gaussian scores, ~20 keys per cluster as
SmolLM2's), the kernel with the budget and with the threshold that keeps the same clusters, at
several warps: the difference is the search, the threshold's time the rest, and how both grow
with the clusters tells a fixed chain of reductions from work per cluster. The compaction after it
is timed too.

    PYTHONPATH=.:benchmarks python3 benchmarks/bench_select.py [--clusters 1024 6554 26214] [--warps 4 8 16 32]

(Without a GPU, under TRITON_INTERPRET=1, it runs each launch once and prints no times.)
"""

from __future__ import annotations

import argparse

import torch

from common import gpu_time
from hf_squeeze.kernels import selection

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn) -> float:
    if DEVICE == "cpu":  # the interpreter: that it runs
        fn()
        return float("nan")
    return gpu_time(fn)


def inputs(clusters: int, heads: int = 8, keep: float = 0.1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(torch.randn(1, heads, clusters, generator=g) * 2.5, -1)
    counts = (1 + torch.poisson(torch.full((heads, clusters), 19.0), generator=g)).int()
    budget = int(keep * counts.sum(-1).min())
    # the threshold that keeps the same clusters: the crossing cluster's log p, per head (the smallest
    # of the heads' crossings keeps at least as much in every head; the kernel takes one threshold)
    order = logp[0].argsort(-1, descending=True)
    reached = counts.gather(-1, order).cumsum(-1) >= budget
    crossing = logp[0].gather(-1, order).gather(-1, reached.int().argmax(-1, keepdim=True))
    return logp.to(DEVICE), counts.to(DEVICE), budget, float(crossing.min())


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clusters", type=int, nargs="+", default=[1024, 2048, 4096, 6554, 13107, 26214])
    p.add_argument("--warps", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="0: the default choice")
    args = p.parse_args()
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    rows = []
    for clusters in args.clusters:
        logp, counts, budget, threshold = inputs(clusters)
        largest = int(counts.max())
        piece = 8
        for warps in args.warps:
            selection.SELECT_WARPS = warps or None

            def by_budget():
                return selection.select(logp, counts, counts, None, budget, largest, piece, stats)

            def by_threshold():
                return selection.select(logp, counts, counts, threshold, None, largest, piece, stats)

            keep, blocks, nsel, _ = by_budget()
            starts = torch.zeros_like(counts)
            out = torch.empty(1, counts.shape[0], int(nsel.max()) + 1, dtype=torch.int32, device=DEVICE)

            def compaction():
                selection.compact(keep, blocks, counts, starts, piece, -(-largest // piece), out)

            row = dict(clusters=clusters, warps=warps or "default", budget_us=timed(by_budget),
                       threshold_us=timed(by_threshold), compact_us=timed(compaction))
            rows.append(row)
            print(row, flush=True)
    selection.SELECT_WARPS = None
    device = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (interpreter)"
    print(f"\n{device}, 8 KV heads, batch 1, keep 0.1, pieces of 8 keys")
    print("| clusters | warps | budget us | threshold us | search us | compaction us |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clusters']} | {r['warps']} | {r['budget_us']:.1f} | {r['threshold_us']:.1f} | "
              f"{r['budget_us'] - r['threshold_us']:.1f} | {r['compact_us']:.1f} |")


if __name__ == "__main__":
    main()
