"""The sparse attention kernels alone, in many shapes of their programs, on one lookup: which tile
reads the kept keys fastest.

One layer (Llama-3.1-8B attention shape, bf16, keep 0.1 by top-k) is looked up once per case; then
`kernels.attention.sparse_attention` alone is timed graph-replayed for each variant of its program:

- decode (one query token after a 64-token input; the decode kernel and its merge), with and without
  pins (half of keep pinned, as the default's decode): pieces per tile, warps, most splits per KV
  head;
- prefill (a `--prefill-tokens` input read by the lookup, `prefill="lookup"`; the gather of the kept
  keys, the prefill kernel and any merge): query rows and keys per tile, warps, pipelined loads.

The tables: microseconds per variant and context, with the decode's bytes per second (TB/s) or the
prefill's TFLOP/s (QK and PV over the keys each query row sees), and the whole step (lookup +
attention) under the defaults. Same index and keys as `bench_kernels.py`.

    PYTHONPATH=.:benchmarks python3 benchmarks/bench_attention_tiles.py --contexts 131072,524288 --out $OUT
    TRITON_INTERPRET=1 HF_SQUEEZE_KERNELS=1 PYTHONPATH=.:benchmarks python3 benchmarks/bench_attention_tiles.py --smoke
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

# name -> the knobs it sets; the others keep the module's defaults
DECODE_VARIANTS = {
    "default": {},
    "warps8": dict(warps=8),
    "splits32": dict(splits=32),
    "splits128": dict(splits=128),
    "pieces4": dict(pieces=4),
    "pieces16": dict(pieces=16),
    "default-again": {},
}
PREFILL_VARIANTS = {  # rows x keys per tile, warps, stages
    "default": {},
    "64x64/4w/2s": dict(tile=(64, 64, 4, 2)),
    "64x128/4w/3s": dict(tile=(64, 128, 4, 3)),
    "64x64/8w/3s": dict(tile=(64, 64, 8, 3)),
    "128x64/4w/3s": dict(tile=(128, 64, 4, 3)),
    "64x64/4w/3s": dict(tile=(64, 64, 4, 3)),
    "128x64/8w/2s": dict(tile=(128, 64, 8, 2)),
    "128x128/8w/2s": dict(tile=(128, 128, 8, 2)),
    "128x128/8w/3s": dict(tile=(128, 128, 8, 3)),
    "default-again": {},
}
KNOBS = ("DECODE_TILE", "PINNED_DECODE_TILE", "DECODE_MAX_SPLITS", "PREFILL_BLOCK_M", "PREFILL_BLOCK_N",
         "PREFILL_WARPS", "PREFILL_STAGES")
DEFAULTS = {name: getattr(attention, name) for name in KNOBS}


def configure(variant: dict, pinned: bool = False):
    """Set the module's knobs for `variant` (the others to their defaults)."""
    for name, value in DEFAULTS.items():
        setattr(attention, name, value)
    tile_name = "PINNED_DECODE_TILE" if pinned else "DECODE_TILE"
    pieces, warps = DEFAULTS[tile_name]
    setattr(attention, tile_name, (variant.get("pieces", pieces), variant.get("warps", warps)))
    attention.DECODE_MAX_SPLITS = variant.get("splits", DEFAULTS["DECODE_MAX_SPLITS"])
    if "tile" in variant:
        (attention.PREFILL_BLOCK_M, attention.PREFILL_BLOCK_N, attention.PREFILL_WARPS,
         attention.PREFILL_STAGES) = variant["tile"]


def cases(index, kindex, keep: float, prefill_tokens: int, heads: int, group: int, dim: int, dev, dtype):
    """(mode, query, dynamic K/V, rule, pins, query-token weights) per case of one context."""
    n = index.keys.shape[1]

    def query_near_centroids(tokens):
        centre = index.centroids[:, torch.randint(index.centroids.shape[1], (group * tokens,), device=dev)]
        q = centre.view(heads, group, tokens, dim) + torch.randn(heads, group, tokens, dim, device=dev)
        return q.reshape(1, heads * group, tokens, dim).to(dtype)

    def dynamic(tokens):
        return tuple(torch.randn(1, heads, tokens, dim, device=dev, dtype=dtype) for _ in range(2))

    budget = max(1, round(keep * n))
    yield "decode", query_near_centroids(1), dynamic(65), SelectionRule(budget=budget), None
    pins = random_pins(heads, n, max(1, round(keep / 2 * n)), dev)
    yield "pinned decode", query_near_centroids(1), dynamic(65), SelectionRule(budget=max(1, round(keep / 2 * n))), pins
    yield (f"prefill {prefill_tokens}", query_near_centroids(prefill_tokens), dynamic(prefill_tokens),
           SelectionRule(budget=budget), None)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="131072,524288")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--prefill-tokens", type=int, default=1024)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--smoke", action="store_true", help="tiny run on the CPU under TRITON_INTERPRET=1 (checks it runs)")
    args = p.parse_args()
    bench_kernels.SMOKE = args.smoke
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            p.error("--smoke needs TRITON_INTERPRET=1 and HF_SQUEEZE_KERNELS=1 in the environment")
        dev, dtype, contexts = torch.device("cpu"), torch.float32, [2048]
        heads, group, dim, prefill_tokens = 2, 2, 64, 48
    else:
        dev, dtype, contexts = torch.device("cuda"), torch.bfloat16, [int(c) for c in args.contexts.split(",")]
        heads, group, dim, prefill_tokens = 8, 4, 128, args.prefill_tokens
        print(f"device: {torch.cuda.get_device_name(dev)}, torch {torch.__version__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows, whole = [], {}
    for ctx in contexts:
        start = time.time()
        index = flat_view(synthetic_index(ctx, heads, dim, 0.05, 4, 100, dtype, dev))
        kindex = kernels.kernel_index(index)
        print(f"context {ctx}: index built in {time.time() - start:.1f} s, {index.counts.shape[1]} clusters/head")
        scaling = dim**-0.5
        stats = torch.zeros(1, dtype=torch.int64, device=dev)
        for mode, query, (dyn_k, dyn_v), rule, pinned in cases(
                index, kindex, args.keep, prefill_tokens, heads, group, dim, dev, dtype):
            tokens = query.shape[2]
            logw = kernels.query_weights(None, 1, tokens, dev) if tokens > 1 else None
            work = kernels.lookup(query, kindex, scaling, None, rule.budget, logw, stats)
            kept = int(work.nkeys.sum()) + (0 if pinned is None else int(pinned.count.sum()))
            dense_rows = index.dense_keys.shape[1]
            if tokens == 1:
                variants = DECODE_VARIANTS
                needed = (kept + heads * (dense_rows + dyn_k.shape[2])) * dim * 2 * index.keys.element_size()
            else:
                variants = PREFILL_VARIANTS
                # each query row: the kept keys of its head, the dense part and the input up to itself
                pairs = group * tokens * (kept + heads * dense_rows) + heads * group * tokens * (tokens + 1) / 2
                needed = 4 * pairs * dim  # QK and PV, two FLOPs per multiply-add
            capacity = kernels.attention.gather_capacity(kindex, rule.budget)
            reference = None
            for name, variant in variants.items():
                configure(variant, pinned is not None)

                def attend_only():
                    return attention.sparse_attention(query, dyn_k, dyn_v, kindex, work, scaling, capacity=capacity,
                                                      pinned=pinned)

                got = attend_only().float()
                if reference is None:
                    reference = got
                err = (got - reference).abs().max().item()
                if err > 2e-2:
                    raise AssertionError(f"{mode}, {name}: output differs from the default's by {err:.3g}")
                us = bench_kernels.bench(attend_only, graph=not args.smoke)
                rate = needed / (us * 1e-6) / 1e12
                rows.append(dict(context=ctx, mode=mode, variant=name, us=us, rate=rate))
                print(f"  {mode}, {name}: {us:.1f} us, {rate:.2f} {'TB/s' if tokens == 1 else 'TFLOP/s'}", flush=True)
            configure({})
            whole[(ctx, mode)] = bench_kernels.bench(
                lambda: kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, None, None, stats, pinned=pinned),
                graph=not args.smoke)
        del index, kindex
    with open(out / "attention_tiles.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    for kind, variants, unit in (("decode", DECODE_VARIANTS, "TB/s"), ("prefill", PREFILL_VARIANTS, "TFLOP/s")):
        columns = [c for c in dict.fromkeys((r["context"], r["mode"]) for r in rows) if kind in c[1]]
        print(f"\n| {kind} variant | " + " | ".join(f"{c // 1024}K {m} us ({unit})" for c, m in columns) + " |")
        print("|---|" + "---|" * len(columns))
        for name in variants:
            cells = [next(r for r in rows if r["variant"] == name and (r["context"], r["mode"]) == c) for c in columns]
            print(f"| {name} | " + " | ".join(f"{r['us']:.1f} ({r['rate']:.2f})" for r in cells) + " |")
        print("| whole step, default (lookup + attention) | " + " | ".join(f"{whole[c]:.1f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
