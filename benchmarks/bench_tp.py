"""Tensor parallel (transformers' tp_plan): dense vs squeezed time to first token and per output
token at one tensor-parallel size, and the tokens, so that sizes can be compared.

    PYTHONPATH=. python3 benchmarks/bench_tp.py --make DIR            # once: random weights of --shape
    PYTHONPATH=. torchrun --nproc_per_node N benchmarks/bench_tp.py --model DIR --out OUT   # N = 1, 2, 4
    PYTHONPATH=. python3 benchmarks/bench_tp.py --report OUT          # the table across sizes

Each rank holds N-th of the KV heads and builds its slice of the index from its own prefill. Dense
attention reads the same context keys (a DynamicCache made from the squeezed index), so both
methods answer over one prefill. Every size appends its rows to OUT/tp.jsonl (rank 0); the report
gives each method's speedup over dense at each size, its scaling from one process, and whether the
tokens equal the one-process run's (random weights: near-tied logits may differ in the last bit
between sizes, since the ranks add the heads' outputs in another order).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_squeeze import SqueezedCache, SqueezeConfig
from common import SHAPES, common_prefix, dense_caches, random_model, run_eager


def make(args) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # every size loads this checkpoint the same way
    model = random_model(args.shape, args.context + args.input + args.new_tokens, torch.bfloat16, device)
    model.save_pretrained(args.make)
    print(f"random {args.shape} saved to {args.make}")


def measure(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    load = dict(tp_plan="auto") if world > 1 else dict(device_map={"": 0} if torch.cuda.is_available() else None)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="squeezed",
                                                 **load).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (args.context + args.input,), generator=g)[None].to(model.device)
    cache = SqueezedCache.from_context(model, ids[0, : args.context], SqueezeConfig(keep=args.keep), progress=False)
    rows = []
    run_eager(model, ids, cache.fork(), 4)  # warm-up
    ttft, tpot, _, _, out = run_eager(model, ids, cache.fork(), args.new_tokens)
    rows.append(dict(method="squeezed", ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3, tokens=out[0, ids.shape[1]:].tolist()))
    dynamic, _ = dense_caches(cache, model, 0)
    model.set_attn_implementation("sdpa")
    run_eager(model, ids, dynamic(), 4)
    ttft, tpot, _, _, out = run_eager(model, ids, dynamic(), args.new_tokens)
    rows.append(dict(method="dense", ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3, tokens=out[0, ids.shape[1]:].tolist()))
    if int(os.environ.get("RANK", "0")) == 0:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu"
        with open(out_dir / "tp.jsonl", "a") as handle:
            for row in rows:
                handle.write(json.dumps(dict(row, ranks=world, context=args.context, input=args.input, keep=args.keep,
                                             kv_heads_per_rank=cache.layers[0].index.keys.shape[0], device=device)) + "\n")
        print("\n".join(f"{world} rank(s) {r['method']}: TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms" for r in rows))


def report(args) -> None:
    rows = [json.loads(line) for line in (Path(args.report) / "tp.jsonl").read_text().splitlines() if line.strip()]
    first = {r["method"]: r for r in rows if r["ranks"] == 1}
    print("| ranks | method | TTFT ms | TPOT ms | TTFT x dense | TPOT x dense | TPOT scaling vs 1 | tokens = 1 rank |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows, key=lambda r: (r["ranks"], r["method"])):
        dense = next(x for x in rows if x["ranks"] == r["ranks"] and x["method"] == "dense")
        one = first.get(r["method"])
        scaling = one["tpot_ms"] / r["tpot_ms"] if one else float("nan")
        same = f"{common_prefix(r['tokens'], one['tokens'])}/{len(r['tokens'])}" if one else "-"
        print(f"| {r['ranks']} | {r['method']} | {r['ttft_ms']:.1f} | {r['tpot_ms']:.2f} | {dense['ttft_ms'] / r['ttft_ms']:.2f} | "
              f"{dense['tpot_ms'] / r['tpot_ms']:.2f} | {scaling:.2f} | {same} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--make", metavar="DIR", help="save a model of --shape with random weights to DIR")
    parser.add_argument("--model", metavar="DIR", help="measure the model saved in DIR (under torchrun for N > 1)")
    parser.add_argument("--report", metavar="OUT", help="print the table of OUT/tp.jsonl")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--input", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.make:
        make(args)
    elif args.model:
        measure(args)
    elif args.report:
        report(args)
    else:
        parser.error("give --make DIR, --model DIR or --report OUT")
    sys.exit(0)
