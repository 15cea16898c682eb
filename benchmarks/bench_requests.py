"""What each request of a stream costs: several requests in a row through `model.generate`'s compile
path, each step timed.

A server answers one request after another over the same fixed context: for ours, each request
is a new `cache.fork()`; for dense, a new `StaticCache` holding the context, or one `StaticCache`
reused (transformers' own habit with `cache_implementation="static"`, its context written again).
After the compiled step exists (the first request), a later request should cost what its steps
cost: this prints, per request, the TTFT, its first decode step, the median and slowest later
step, and the mean of all steps (bench_generate.py's TPOT), and how often torch.compile compiled
meanwhile, the slowest later step's number, and the time the garbage collector ran. A step far
above the median is work done once per request (a CUDA graph recorded again for new buffers, a
recompilation, a collection); `--why` logs torch.compile's recompilations and CUDA-graph
recordings with their reasons (stderr).

    PYTHONPATH=.:benchmarks python3 benchmarks/bench_requests.py --context 2048 --requests 4
"""

from __future__ import annotations

import argparse
import csv
import gc
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from common import SHAPES, StepClock, cache_kwargs, dense_caches, random_model
from hf_squeeze import SqueezedCache, SqueezeConfig


def one_request(model, ids, cache, new_tokens: int) -> dict:
    clock = StepClock(ids.device)
    collecting = []  # the garbage collector's time in this request, seconds

    def on_gc(phase, info):
        collecting.append(time.perf_counter() * (1 if phase == "stop" else -1))

    gc.callbacks.append(on_gc)
    start = time.perf_counter()
    try:
        model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, logits_processor=LogitsProcessorList([clock]))
    finally:
        gc.callbacks.remove(on_gc)
    steps = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    later = steps[1:]
    return {"ttft_ms": (clock.marks[0] - start) * 1e3, "first_step_ms": steps[0] * 1e3,
            "median_ms": statistics.median(later) * 1e3, "slowest_ms": max(later) * 1e3,
            "slowest_step": 2 + later.index(max(later)), "mean_ms": statistics.fmean(steps) * 1e3,
            "gc_ms": sum(collecting) * 1e3, "steps_ms": [t * 1e3 for t in steps]}


def compilations() -> int:
    return torch._dynamo.utils.counters["stats"].get("unique_graphs", 0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--input", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--why", action="store_true", help="log recompilations and CUDA-graph recordings (stderr)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="requests.csv and requests_steps.png")
    args = p.parse_args()
    if args.why:
        torch._logging.set_logs(recompiles=True, cudagraphs=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(args.shape, args.context + args.input + args.new_tokens + 8, dtype, device)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(model.config.vocab_size, (args.context,), generator=g).to(device)
    squeezed = SqueezedCache.from_context(model, context, SqueezeConfig(), progress=False)
    _, static = dense_caches(squeezed, model, args.context + args.input + args.new_tokens)

    variants = {"squeezed, new fork": lambda: squeezed.fork(keep=args.keep),
                "dense, new StaticCache": static, "dense, one StaticCache": lambda: static(reuse=True)}
    rows = []
    for name, make in variants.items():
        model.set_attn_implementation("squeezed" if name.startswith("squeezed") else "sdpa")
        for r in range(args.requests):
            question = torch.randint(model.config.vocab_size, (args.input,), generator=g).to(device)
            ids = torch.cat([context, question])[None]
            before = compilations()
            row = one_request(model, ids, make(), args.new_tokens)
            rows.append({"variant": name, "request": r + 1, **row, "compiled graphs": compilations() - before})
            print({k: v for k, v in rows[-1].items() if k != "steps_ms"}, flush=True)
    save(rows, args.out)
    print(f"\n{args.shape}, context {args.context}, input {args.input}, {args.new_tokens} new tokens, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}")
    print("| variant | request | TTFT ms | first step ms | median step ms | slowest later step ms (step) | mean step ms "
          "| gc ms | graphs compiled |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['request']} | {r['ttft_ms']:.1f} | {r['first_step_ms']:.2f} | "
              f"{r['median_ms']:.2f} | {r['slowest_ms']:.2f} ({r['slowest_step']}) | {r['mean_ms']:.2f} | "
              f"{r['gc_ms']:.1f} | {r['compiled graphs']} |")


def save(rows: list[dict], out: Path) -> None:
    """Every step of every request (requests.csv), and drawn: each variant's later requests step by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "requests.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "request", "step", "ms"])
        for r in rows:
            writer.writerows([r["variant"], r["request"], i + 1, f"{ms:.3f}"] for i, ms in enumerate(r["steps_ms"]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(5 * len(variants), 3.5), sharey=True, squeeze=False)
    for ax, variant in zip(axes[0], variants):
        for r in rows:
            if r["variant"] == variant and r["request"] > 1:  # (the first compiles)
                ax.plot(range(1, len(r["steps_ms"]) + 1), r["steps_ms"], marker=".", label=f"request {r['request']}")
        ax.set_yscale("log")
        ax.set_title(variant)
        ax.set_xlabel("decode step")
        ax.legend()
    axes[0][0].set_ylabel("ms")
    fig.tight_layout()
    fig.savefig(out / "requests_steps.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
