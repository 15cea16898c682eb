"""A prefill lookup's two scoring kernels alone, each at many tiles: which shape of program scores
the centroids fastest.

A prefill's lookup scores every centroid against every input token twice: `_row_norm_kernel` sums
each query row's probability mass over the centroids (a program owns a block of tokens of one query
head and steps over centroids), then `_aggregate_kernel` averages each centroid's probability over
the tokens (a program owns a block of centroids and steps over tokens). Their best tiles differ, so
each is timed apart through the library's launchers, which take a tile (`scoring.prefill_normaliser`,
`scoring.prefill_log_p`; median of `triton.testing.do_bench`, no graph: each call is ~150 us), for
block sizes x warps x pipelined loads; each variant's output is checked against the default tile's.
Same index, queries and shape as `bench_kernels.py` (Llama-3.1-8B attention, bf16, 5% centroids).

    PYTHONPATH=.:benchmarks python3 benchmarks/bench_scoring_tiles.py [--context 131072] [--tokens 1024] --out $OUT
    TRITON_INTERPRET=1 PYTHONPATH=.:benchmarks python3 benchmarks/bench_scoring_tiles.py --smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from bench_kernels import synthetic_index
from hf_squeeze import kernels
from hf_squeeze.kernels import scoring

BLOCKS = (32, 64, 128, 256)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1, default warps")
    args = p.parse_args()
    if args.smoke:
        args.context, args.tokens, args.dim = 2048, 64, 64
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    heads, group, dim, tokens = args.heads, args.group, args.dim, args.tokens
    index = synthetic_index(args.context, heads, dim, 0.05, 4, 100, torch.bfloat16, dev)
    kindex = kernels.kernel_index(index)
    cent, logn = kindex.centroids, kindex.log_counts
    clusters = logn.shape[1]
    g = torch.Generator(device=dev).manual_seed(1)
    centre = index.centroids[:, torch.randint(clusters, (group * tokens,), device=dev, generator=g)]
    query = centre.view(heads, group, tokens, dim) + torch.randn(heads, group, tokens, dim, device=dev, generator=g)
    query = query.reshape(1, heads * group, tokens, dim).to(torch.bfloat16)
    logw = kernels.query_weights(None, 1, tokens, dev)
    scaling = dim**-0.5
    norm = scoring.prefill_normaliser(query, cent, logn, scaling)  # (the default tile's, for the aggregate)
    logp = torch.empty(1, heads, clusters, device=dev)

    def normaliser(*tile):
        return scoring.prefill_normaliser(query, cent, logn, scaling, tile)

    def aggregate(*tile):
        return scoring.prefill_log_p(query, cent, logn, scaling, logw, norm, logp, tile)

    defaults = {
        "normaliser": (scoring.NORM_BLOCK_T, scoring.NORM_BLOCK_C, scoring.NORM_WARPS, scoring.NORM_STAGES),
        "aggregate": (scoring.PREFILL_BLOCK_C, scoring.PREFILL_BLOCK_T, scoring.PREFILL_WARPS, scoring.PREFILL_STAGES),
    }
    rows = []
    for name, fn in (("normaliser", normaliser), ("aggregate", aggregate)):
        reference = fn(*defaults[name]).clone()
        shapes = itertools.product(BLOCKS[1:] if name == "normaliser" else BLOCKS[:3],
                                   BLOCKS[:3] if name == "normaliser" else BLOCKS[1:], (4, 8), (2, 3, 4))
        for tile in [defaults[name]] + [t for t in shapes if t != defaults[name]]:
            if args.smoke and tile[2:] != (4, 3):
                continue
            try:
                logp.fill_(float("nan"))  # (poisoned: each variant writes every value)
                same = bool(torch.allclose(fn(*tile), reference, rtol=1e-4, atol=1e-3))
                us = float("nan") if dev == "cpu" else triton.testing.do_bench(
                    lambda: fn(*tile), warmup=25, rep=150, return_mode="median") * 1e3
            except triton.runtime.errors.OutOfResources:
                same, us = "out of resources", float("nan")
            rows.append(dict(kernel=name, tile=tile, us=us, matches=same, default=tile == defaults[name]))
            print(rows[-1], flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "scoring_tiles.json").write_text(json.dumps(rows, indent=1))
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU (interpreter)"
    print(f"\n{name}, {tokens} tokens over {args.context} keys, {clusters} centroids per KV head, "
          f"{heads} KV heads x {group}, dim {dim}; tile = blocks (the program's, the step's), warps, loads")
    print("| kernel | tile | us | matches the default's output |\n|---|---|---|---|")
    for kernel in defaults:
        timed = sorted((r for r in rows if r["kernel"] == kernel and r["us"] == r["us"]), key=lambda r: r["us"])
        for r in [r for r in rows if r["kernel"] == kernel and r["default"]] + timed[:6]:
            label = f"{kernel} (default)" if r["default"] else kernel
            print(f"| {label} | {r['tile']} | {r['us']:.1f} | {r['matches']} |")


if __name__ == "__main__":
    main()
