"""The decode attention kernel alone, in many shapes of its program, on one lookup: which tile reads
the kept keys fastest.

One layer's decode step (Llama-3.1-8B attention shape, bf16, keep 0.1 by top-k, a 64-token input
before it) is looked up once; then `kernels.attention.sparse_attention` alone (the decode kernel and
its merge) is timed graph-replayed for each variant of the program: pieces per tile, warps, most
splits per KV head. With and without pins (half of keep pinned, as the default's decode). The last
table: microseconds per variant and context, the bytes the kernel needs per microsecond (TB/s), and
the whole step (lookup + attention) for the default variant. Same index and keys as
`bench_kernels.py`.

    PYTHONPATH=.:benchmarks python3 benchmarks/bench_decode_tiles.py --contexts 131072,524288 --out $OUT
    TRITON_INTERPRET=1 HF_SQUEEZE_KERNELS=1 PYTHONPATH=.:benchmarks python3 benchmarks/bench_decode_tiles.py --smoke
"""

from __future__ import annotations

import argparse
import csv
import importlib
import os
import time
from pathlib import Path

import torch

import bench_kernels
from bench_kernels import flat_view, random_pins, synthetic_index
from hf_squeeze import kernels
from hf_squeeze.selection import SelectionRule

attention = importlib.import_module("hf_squeeze.kernels.attention")

# name -> the knobs it sets (pieces per tile, warps, most splits); the others keep the module's defaults
VARIANTS = {
    "default": {},
    "warps8": dict(warps=8),
    "splits32": dict(splits=32),
    "splits128": dict(splits=128),
    "pieces4": dict(pieces=4),
    "pieces16": dict(pieces=16),
    "pieces4+splits128": dict(pieces=4, splits=128),
    "default-again": {},
}


def configure(variant: dict, pinned: bool):
    """Set the module's decode knobs for `variant` (the defaults saved in DEFAULTS)."""
    tile_name = "PINNED_DECODE_TILE" if pinned else "DECODE_TILE"
    pieces, warps = DEFAULTS[tile_name]
    setattr(attention, tile_name, (variant.get("pieces", pieces), variant.get("warps", warps)))
    attention.DECODE_MAX_SPLITS = variant.get("splits", DEFAULTS["DECODE_MAX_SPLITS"])


DEFAULTS = {name: getattr(attention, name) for name in
            ("DECODE_TILE", "PINNED_DECODE_TILE", "DECODE_MAX_SPLITS")}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="131072,524288")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny run on the CPU under TRITON_INTERPRET=1 (checks it runs)")
    args = p.parse_args()
    names = args.variants.split(",")
    unknown = set(names) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    bench_kernels.SMOKE = args.smoke
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke needs TRITON_INTERPRET=1 and HF_SQUEEZE_KERNELS=1 in the environment")
        dev, dtype, contexts = torch.device("cpu"), torch.float32, [2048]
        heads, group, dim = 2, 2, 64
    else:
        dev, dtype, contexts = torch.device("cuda"), torch.bfloat16, [int(c) for c in args.contexts.split(",")]
        heads, group, dim = 8, 4, 128
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows, whole = [], {}
    for ctx in contexts:
        start = time.time()
        index = flat_view(synthetic_index(ctx, heads, dim, 0.05, 4, 100, dtype, dev))
        kindex = kernels.kernel_index(index)
        n = index.keys.shape[1]
        print(f"context {ctx}: index built in {time.time() - start:.1f} s, {index.counts.shape[1]} clusters/head")
        centre = index.centroids[:, torch.randint(index.centroids.shape[1], (group,), device=dev)]
        query = (centre.view(heads, group, 1, dim) + torch.randn(heads, group, 1, dim, device=dev)).reshape(
            1, heads * group, 1, dim).to(dtype)
        dyn_k, dyn_v = (torch.randn(1, heads, 65, dim, device=dev, dtype=dtype) for _ in range(2))
        scaling = dim**-0.5
        stats = torch.zeros(1, dtype=torch.int64, device=dev)
        for pinned in (None, random_pins(heads, n, max(1, round(args.keep / 2 * n)), dev)):
            keep = args.keep if pinned is None else args.keep / 2
            rule = SelectionRule(budget=max(1, round(keep * n)))
            work = kernels.lookup(query, kindex, scaling, None, rule.budget, None, stats)
            kept = int(work.nkeys.sum()) + (0 if pinned is None else int(pinned.count.sum()))
            needed = (kept + heads * (index.dense_keys.shape[1] + 65)) * dim * 2 * index.keys.element_size()
            mode = "decode" if pinned is None else "pinned decode"
            reference = None
            for name in names:
                configure(VARIANTS[name], pinned is not None)

                def attend_only():
                    return attention.sparse_attention(query, dyn_k, dyn_v, kindex, work, scaling, pinned=pinned)

                got = attend_only().float()
                if reference is None:
                    reference = got
                err = (got - reference).abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"{name}: output differs from the first variant's by {err:.3g}")
                us = bench_kernels.bench(attend_only, graph=not args.smoke)
                rows.append(dict(context=ctx, mode=mode, variant=name, us=us, TBps=needed / (us * 1e-6) / 1e12))
                print(f"  {mode}, {name}: {us:.1f} us, {rows[-1]['TBps']:.2f} TB/s", flush=True)
            configure({}, pinned is not None)
            whole[(ctx, mode)] = bench_kernels.bench(
                lambda: kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, None, None, stats, pinned=pinned),
                graph=not args.smoke)
        del index, kindex
    with open(out / "decode_tiles.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    columns = sorted({(r["context"], r["mode"]) for r in rows})
    print("\n| variant | " + " | ".join(f"{c // 1024}K {m} us (TB/s)" for c, m in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in names:
        cells = [next(r for r in rows if r["variant"] == name and (r["context"], r["mode"]) == c) for c in columns]
        print(f"| {name} | " + " | ".join(f"{r['us']:.1f} ({r['TBps']:.2f})" for r in cells) + " |")
    print("| whole step, default (lookup + attention) | " + " | ".join(f"{whole[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
