"""Per-layer attention time: squeezed kernels (lookup + sparse attention) vs dense SDPA, same run.

Llama-3.1-8B attention shape by default (32 query heads, 8 KV heads, head dim 128, bf16), batch 1.
For each fixed-context length, the dense anchor is torch SDPA over all keys with the cuDNN and the
flash backends (the faster one is the anchor); ours is `hf_squeeze.kernels.attend` on an index with
5% centroids and top-k selection at each `keep`. Both are timed as CUDA graphs (median of
`triton.testing.do_bench`), ours also eagerly, and for decode as an eager fixed-capacity step
runs it (replayed by a layer's `DecodeGraph`: query in, replay, output out). Decode = 1 query token after a 64-token user input;
prefill = a user input of `--prefill-tokens` tokens (causal among themselves).

Modes "hier-decode" / "hier-prefill" run the same on a two-level index (coarse clusters at
`--coarse-ratio` of the keys, the SqueezeConfig default 1%; fine ones at `--centroid-ratio`, 5%) with
top-k at both levels, the coarse level keeping `coarse_margin * keep` (SqueezeConfig default 2x): the
fine level scores only the fine centroids under the kept coarse clusters. When a hier mode is
asked for, the flat modes of the same run use the fine level of the same index (same keys).
"lookup share" is the lookup's part of ours; "lookup/attention" the lookup against the rest.

The keys have cluster structure (Gaussian clusters around random centres, as K-means would find on
real keys) and the index is built from the generating labels: the kernels' speed depends on the
number and sizes of clusters, not on how they were found. Bytes "needed" = kept keys and values +
centroids + sinks/window + dynamic tokens, all at 2 bytes per element.

    PYTHONPATH=. python benchmarks/bench_kernels.py --out $OUT
    PYTHONPATH=. python benchmarks/bench_kernels.py --modes decode,hier-decode,prefill,hier-prefill --out $OUT

`--decode-pieces` / `--decode-warps` set the decode kernel's tile and warps (with and without pins),
`--decode-splits` the most programs sharing one KV head's decode, `--select-warps` the selection
program's warps, `--piece-rows` the keys per piece of the kept lists (the decode tile is
`--decode-pieces` pieces), `--score-block` the centroids per decode scoring program,
`--prefill-score-block` / `--score-tokens` / `--score-warps` / `--score-stages` a prefill's aggregate
tile (centroids, tokens per step, warps, pipelined loads) and `--norm-tile` its normaliser's: for
sweeps in one GPU call (`tools/device_kernels.sh`; `bench_scoring_tiles.py` times the two alone).

`--smoke` runs tiny shapes on the CPU under TRITON_INTERPRET=1 (no CUDA graphs, wall-clock
times of one call, meaningless as speed): it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

from hf_squeeze import kernels
from hf_squeeze.kernels import graphs
from common import gpu_time
from hf_squeeze.index import LayerIndex
from hf_squeeze.selection import Pinned, SelectionRule

L1_MARGIN = 2.0  # SqueezeConfig.coarse_margin: the coarse level keeps this times `keep` of the keys
SMOKE = False  # --smoke: CPU interpreter, wall-clock times


def synthetic_index(tokens, heads, dim, ratio, sinks, window, dtype, device, seed=0, coarse_ratio=None) -> LayerIndex:
    """Keys in Gaussian clusters around random centres; with `coarse_ratio`, the centres themselves
    in Gaussian groups (the coarse clusters), fine clusters numbered by their group."""
    g = torch.Generator(device=device).manual_seed(seed)
    rows = tokens - sinks - window
    clusters = max(1, round(ratio * rows))
    if coarse_ratio is None:
        centers = torch.randn(heads, clusters, dim, device=device, generator=g) * 3
    else:
        coarse = min(clusters, max(1, round(coarse_ratio * rows)))
        parent = torch.randint(coarse, (heads, clusters), device=device, generator=g).sort(-1).values
        coarse_centers = torch.randn(heads, coarse, dim, device=device, generator=g) * 3
        centers = coarse_centers.gather(1, parent[..., None].expand(-1, -1, dim))
        centers += torch.randn(heads, clusters, dim, device=device, generator=g) * 1.5
    labels = torch.randint(clusters, (heads, rows), device=device, generator=g).sort(-1).values
    keys = torch.empty(heads, rows, dim, device=device, dtype=dtype)
    centroids = torch.zeros(heads, clusters, dim, device=device)
    for h in range(heads):  # one head at a time keeps the float32 temporaries small
        k = centers[h, labels[h]] + torch.randn(rows, dim, device=device, generator=g)
        centroids[h].index_add_(0, labels[h], k)
        keys[h] = k.to(dtype)
    counts = torch.zeros(heads, clusters, dtype=torch.long, device=device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    centroids /= counts.clamp_min(1)[..., None]
    offsets = torch.cat([counts.new_zeros(heads, 1), counts.cumsum(-1)], 1)
    values = torch.randn(heads, rows, dim, device=device, generator=g).to(dtype)
    dense = torch.randn(2, heads, sinks + window, dim, device=device, generator=g).to(dtype)
    tree = {}
    if coarse_ratio is not None:  # a coarse centroid is the mean of the keys under it
        coarse_counts = torch.zeros(heads, coarse, dtype=torch.long, device=device).scatter_add_(1, parent, counts)
        sums = torch.zeros(heads, coarse, dim, device=device)
        sums.scatter_add_(1, parent[..., None].expand(-1, -1, dim), centroids * counts[..., None])
        children = torch.zeros_like(coarse_counts).scatter_add_(1, parent, torch.ones_like(parent))
        tree = dict(
            coarse_centroids=sums / coarse_counts.clamp_min(1)[..., None],
            coarse_counts=coarse_counts,
            coarse_offsets=torch.cat([children.new_zeros(heads, 1), children.cumsum(-1)], 1),
        )
    return LayerIndex(keys, values, centroids, counts, offsets, dense[0], dense[1], **tree)


def flat_view(index: LayerIndex) -> LayerIndex:
    """The fine level of a two-level index alone."""
    return dataclasses.replace(index, coarse_centroids=None, coarse_counts=None, coarse_offsets=None)


def bench(fn, graph: bool) -> float:
    """Median microseconds of fn, replayed from a CUDA graph when `graph`."""
    if SMOKE:  # CPU interpreter: one call's wall-clock time
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e6
    return gpu_time(fn, graph)


def dense_time(q, k, v) -> dict[str, float]:
    """SDPA over all keys with each backend; the queries are the last tokens (no mask needed for
    decode; for prefill the anchor attends to every key, a slight over-count of causal work)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if SMOKE:
        return {"flash": bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=False)}
    times = {}
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            times[name] = bench(run, graph=True)
        except RuntimeError as err:  # a backend may refuse a shape
            print(f"  dense {name}: {str(err).splitlines()[0]}")
    return times


def random_pins(heads: int, rows: int, count: int, device) -> Pinned:
    """`count` pinned keys per KV head, spread over the cluster-sorted layout as real pins are."""
    order = torch.stack([torch.randperm(rows, device=device)[:count] for _ in range(heads)])[None]
    mask = torch.zeros(1, heads, rows, dtype=torch.int8, device=device).scatter(-1, order, 1)
    return Pinned(order.to(torch.int32).contiguous(), torch.full((1, heads), count, dtype=torch.int32, device=device),
                  mask, torch.zeros(1, heads, 1, rows, device=device))


def run_case(index, kindex, tokens_ctx, keep, query_tokens, dyn_len, args, dense_cache, mode):
    heads, rows, dim = index.keys.shape
    q_heads = heads * args.group
    dtype = index.keys.dtype
    dev = index.keys.device
    scaling = dim**-0.5
    centre = index.centroids[:, torch.randint(index.centroids.shape[1], (args.group * query_tokens,), device=dev)]
    query = (centre.view(heads, args.group, query_tokens, dim) + torch.randn(heads, args.group, query_tokens, dim, device=dev))
    query = (query * args.query_scale).reshape(1, q_heads, query_tokens, dim).to(dtype)
    dyn_k = torch.randn(1, heads, dyn_len, dim, device=dev, dtype=dtype)
    dyn_v = torch.randn(1, heads, dyn_len, dim, device=dev, dtype=dtype)
    coarse_budget = None
    if kindex.hierarchical:  # the view's fine room is bounded for the coarse budget
        coarse_budget = max(1, round(min(1.0, L1_MARGIN * keep) * rows))
        kindex = kernels.kernel_index(index, coarse_budget=coarse_budget)
    pinned = None
    if mode == "pinned-decode":  # the default's decode: half of keep pinned (random keys), half looked up
        pinned = random_pins(heads, rows, max(1, round(keep / 2 * rows)), dev)
        keep = keep / 2
    rule = SelectionRule(budget=max(1, round(keep * rows)), coarse_budget=coarse_budget)
    stats = torch.zeros(1, dtype=torch.int64, device=dev)
    scored = torch.zeros(1, dtype=torch.int64, device=dev)

    def ours(query=query):
        return kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, None, None, stats, scored=scored,
                              pinned=pinned)

    logw = kernels.query_weights(None, 1, query_tokens, dev) if query_tokens > 1 else None

    def lookup_only():
        return kernels.lookup(query, kindex, scaling, None, rule.budget, logw, stats, None, coarse_budget, scored)

    ours()
    stats.zero_()
    scored.zero_()
    ours()
    kept = int(stats)  # keys read from the clustered part, over all KV heads
    if pinned is not None:  # the pinned keys too (one read each: an upper bound where they overlap)
        kept += int(pinned.count.sum())
        keep = keep * 2
    # centroids scored per KV head: all (flat), or all coarse ones + the fine ones under the kept
    clusters = index.counts.shape[1]
    fine_scored = int(scored) / heads if kindex.hierarchical else clusters
    if args.profile and not SMOKE and tokens_ctx == args.profile_context and keep == args.profile_keep:
        profile(ours, f"{mode}, {tokens_ctx} tokens, {query_tokens} query tokens, keep {keep}")
    t_graph = bench(ours, graph=True)
    t_eager = bench(ours, graph=False)
    t_step_graph = step_graph_time(ours, query) if query_tokens == 1 and not SMOKE else math.nan
    t_lookup = bench(lookup_only, graph=True)

    key = (tokens_ctx, query_tokens)
    if key not in dense_cache:
        k_all = torch.cat([index.dense_keys, index.keys], 1)[None]
        v_all = torch.cat([index.dense_values, index.values], 1)[None]
        k_all = torch.cat([k_all, dyn_k], 2)
        v_all = torch.cat([v_all, dyn_v], 2)
        dense_cache[key] = dense_time(query, k_all, v_all)
        del k_all, v_all
    dense = dense_cache[key]
    best = min(dense.values())
    elem = index.keys.element_size()
    needed = (kept + heads * (index.dense_keys.shape[1] + dyn_len)) * dim * 2 * elem
    needed += (fine_scored + kindex.coarse_clusters) * heads * dim * elem
    return dict(
        context=tokens_ctx,
        mode=("hier-" if kindex.hierarchical else "") + ("pinned-" if pinned is not None else "")
        + ("decode" if query_tokens == 1 else f"prefill{query_tokens}"),
        keep=keep,
        kept_fraction=kept / (heads * rows),
        fine_scored_fraction=fine_scored / clusters,
        fine_room=(kindex.candidates(coarse_budget) if kindex.hierarchical else clusters) / clusters,
        dense_cudnn_us=dense.get("cudnn", math.nan),
        dense_flash_us=dense.get("flash", math.nan),
        ours_graph_us=t_graph,
        ours_eager_us=t_eager,
        ours_step_graph_us=t_step_graph,
        lookup_us=t_lookup,
        lookup_share=t_lookup / t_graph,
        lookup_vs_attention=t_lookup / max(t_graph - t_lookup, 1e-9),
        speedup=best / t_graph,
        speedup_eager=best / t_eager,
        needed_MB=needed / 1e6,
        achieved_TBps=needed / (t_graph * 1e-6) / 1e12,
    )


def step_graph_time(ours, query) -> float:
    """Microseconds per call of the decode step as an eager fixed-capacity step runs it: replayed by
    a layer's `DecodeGraph` (the query copied in, the output copied out), timed as the host issues
    it (no graph around the calls), so the host's work per step counts when it exceeds the GPU's."""
    step = graphs.DecodeGraph(graphs.GraphPools())
    valid = torch.ones(1, 1, dtype=torch.bool, device=query.device)  # (the kernels read it as the written slots)

    def replayed():
        return step.run(("bench",), None, lambda q, _: ours(q), query, valid)

    replayed()  # eager: compiles
    replayed()  # captured
    time = bench(replayed, graph=False)
    assert step.replays > 2 and step.captures == 1
    return time


def profile(fn, title: str, steps: int = 20):
    """Per-kernel device time of `fn`, averaged over `steps` calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    print(f"  profile ({title}), per call:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total):
        print(f"    {e.key[:60]:60s} {e.device_time_total / steps:8.1f} us  x{e.count // steps}")


def plot(rows, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for ctx in sorted({r["context"] for r in rows}):
            pts = sorted((r["keep"], r["speedup"]) for r in rows if r["mode"] == mode and r["context"] == ctx)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{ctx // 1024}K context")
        ax.set_xscale("log")
        ax.set_xlabel("keep (fraction of clustered keys read)")
        ax.set_ylabel("speedup vs best dense SDPA (same run)")
        ax.set_title(f"{mode}, one layer, Llama-3.1-8B shape")
        ax.axhline(1, color="grey", lw=0.5)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="32768,131072,524288")
    p.add_argument("--keeps", default="0.3,0.1,0.05")
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--centroid-ratio", type=float, default=0.05)
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--query-scale", type=float, default=1.0,
                   help="queries times this: at 1 a query's own cluster scores ~100 nats above the rest, far more "
                        "spread than a real model's scores; 0.1-0.3 spreads them as SmolLM2's (score_ranges.py)")
    p.add_argument("--decode-input", type=int, default=64, help="user-input tokens before the decode step")
    p.add_argument("--modes", default="decode,pinned-decode,prefill",
                   help="any of decode, pinned-decode (half of keep pinned), prefill, hier-decode, hier-prefill")
    p.add_argument("--coarse-ratio", type=float, default=0.01, help="coarse clusters per key in the hier modes")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--profile", action="store_true", help="print a per-kernel breakdown of one case")
    p.add_argument("--profile-context", type=int, default=131072)
    p.add_argument("--profile-keep", type=float, default=0.1)
    p.add_argument("--smoke", action="store_true", help="tiny run on the CPU under TRITON_INTERPRET=1 (checks it runs)")
    p.add_argument("--decode-pieces", type=int, help="pieces of kept rows per decode step (the tile: x --piece-rows rows)")
    p.add_argument("--decode-warps", type=int, help="warps per decode program")
    p.add_argument("--decode-splits", type=int, help="most decode programs per (row, KV head) (a power of two)")
    p.add_argument("--select-warps", type=int, help="warps per selection program")
    p.add_argument("--piece-rows", type=int, help="keys per piece of the kept lists (a power of two, >= 8)")
    p.add_argument("--score-block", type=int, help="centroids per decode scoring program (a power of two, >= 16)")
    p.add_argument("--prefill-score-block", type=int,
                   help="centroids per prefill aggregate program (a power of two, >= 16)")
    p.add_argument("--score-tokens", type=int, help="input tokens per step of a prefill's aggregate (a power of two, >= 16)")
    p.add_argument("--score-warps", type=int, help="warps of a prefill's aggregate programs")
    p.add_argument("--score-stages", type=int, help="pipelined loads of a prefill's aggregate programs")
    p.add_argument("--norm-tile", help="a prefill normaliser's tile: tokens,centroids,warps,stages (e.g. 128,128,4,2)")
    args = p.parse_args()
    attention = importlib.import_module("hf_squeeze.kernels.attention")
    for name in ("DECODE_TILE", "PINNED_DECODE_TILE"):  # the same tile with and without pins
        pieces, warps = getattr(attention, name)
        setattr(attention, name, (args.decode_pieces or pieces, args.decode_warps or warps))
    attention.DECODE_MAX_SPLITS = args.decode_splits or attention.DECODE_MAX_SPLITS
    importlib.import_module("hf_squeeze.kernels.selection").SELECT_WARPS = args.select_warps
    layout = importlib.import_module("hf_squeeze.kernels.layout")  # (before any view is built)
    layout.PIECE_ROWS = args.piece_rows or layout.PIECE_ROWS
    scoring = importlib.import_module("hf_squeeze.kernels.scoring")
    scoring.SCORE_BLOCK_C = args.score_block or scoring.SCORE_BLOCK_C
    scoring.PREFILL_BLOCK_C = args.prefill_score_block or scoring.PREFILL_BLOCK_C
    scoring.PREFILL_BLOCK_T = args.score_tokens or scoring.PREFILL_BLOCK_T
    scoring.PREFILL_WARPS = args.score_warps or scoring.PREFILL_WARPS
    scoring.PREFILL_STAGES = args.score_stages or scoring.PREFILL_STAGES
    if args.norm_tile:
        scoring.NORM_BLOCK_T, scoring.NORM_BLOCK_C, scoring.NORM_WARPS, scoring.NORM_STAGES = map(
            int, args.norm_tile.split(","))
    global SMOKE
    SMOKE = args.smoke
    modes = args.modes.split(",")
    unknown = set(modes) - {"decode", "pinned-decode", "prefill", "hier-decode", "hier-prefill"}
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if SMOKE:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke needs TRITON_INTERPRET=1 and HF_SQUEEZE_KERNELS=1 in the environment")
        dev, dtype = torch.device("cpu"), torch.float32
        print(f"smoke run on the CPU (Triton interpreter), torch {torch.__version__}, triton {triton.__version__}")
    else:
        dev, dtype = torch.device("cuda"), torch.bfloat16
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton {triton.__version__}")
    if args.query_scale != 1.0:
        print(f"queries scaled by {args.query_scale:g}")
    hier = any(m.startswith("hier-") for m in modes)
    rows = []
    for ctx in [int(c) for c in args.contexts.split(",")]:
        start = time.time()
        coarse_ratio = args.coarse_ratio if hier else None
        index = synthetic_index(ctx, args.heads, args.dim, args.centroid_ratio, 4, 100, dtype, dev, coarse_ratio=coarse_ratio)
        views = {}  # kernel views by index kind, built when first needed
        reason = kernels.supports(index, torch.empty(1, 1, 1, args.dim, device=dev, dtype=dtype))
        coarse_info = f", {index.coarse_counts.shape[1]} coarse" if hier else ""
        print(f"context {ctx}: index built in {time.time() - start:.1f} s, {index.counts.shape[1]} clusters/head{coarse_info}")
        if reason:
            print(f"  skipped: {reason}")
            continue
        dense_cache = {}
        for mode in modes:
            kind = "hier" if mode.startswith("hier-") else "flat"
            if kind not in views:
                views[kind] = kernels.kernel_index(index if kind == "hier" else flat_view(index))
            tokens = mode.removeprefix("hier-").removeprefix("pinned-")
            q_tokens, dyn = (1, args.decode_input + 1) if tokens == "decode" else (args.prefill_tokens, args.prefill_tokens)
            for keep in [float(k) for k in args.keeps.split(",")]:
                try:
                    r = run_case(index, views[kind], ctx, keep, q_tokens, dyn, args, dense_cache, mode)
                except Exception as err:  # report and go on: one failing shape should not hide the rest
                    print(f"  {mode} keep={keep}: FAILED {type(err).__name__}: {err}")
                    continue
                rows.append(r)
                print("  " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
        del index, views
        if not SMOKE:
            torch.cuda.empty_cache()
    if not rows:
        return
    with open(out / "kernels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, out / "kernels_speedup.png")
    print()
    print("| context | mode | keep | read | fine centroids scored | dense cuDNN us | dense flash us | ours us (graph) "
          "| ours us (eager) | ours us (eager, step graph) | lookup us | lookup share | lookup/attention | speedup | TB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['context'] // 1024}K | {r['mode']} | {r['keep']} | {r['kept_fraction']:.3f} | {r['fine_scored_fraction']:.2f} | "
            f"{r['dense_cudnn_us']:.1f} | {r['dense_flash_us']:.1f} | {r['ours_graph_us']:.1f} | {r['ours_eager_us']:.1f} | "
            f"{r['ours_step_graph_us']:.1f} | "
            f"{r['lookup_us']:.1f} | {r['lookup_share']:.0%} | {r['lookup_vs_attention']:.0%} | "
            f"**{r['speedup']:.2f}x** | {r['achieved_TBps']:.2f} |"
        )


if __name__ == "__main__":
    main()
