"""Where the time of a RULER evaluation goes: one fixed context, every method's answer through the
eval's own caches and `generate_greedy` (`hf-squeeze eval --decode greedy`), timed by phase.

A model of Qwen2.5-0.5B's shape with random weights (time does not depend on the weights; the
answers run to `--new-tokens`), bf16, one process. Phases per method: building its cache from the
shared prefill (calibration), the question's prefill (eager; the default reads every key and pins),
the warm-up step and the CUDA graph capture, and the decode tokens (replays).

    PYTHONPATH=. python benchmarks/bench_eval.py --context 8192 --out $OUT [--compile]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hf_squeeze import generate_greedy
from hf_squeeze.eval.contexts import KERNEL_FAMILIES, ContextCaches
from hf_squeeze.eval.methods import parse_methods
from hf_squeeze.generation import GenerationTimes

from common import random_model

METHODS = "full,flat-topk-0.1,flat-topk+exact+pin0.5-0.1,quest@0.125,oracle@0.125"


def clock(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--question", type=int, default=64, help="question tokens")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--answers", type=int, default=3, help="answers per method (the first one warms up)")
    p.add_argument("--methods", default=METHODS)
    p.add_argument("--shape", default="qwen2.5-0.5b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--compile", action="store_true", help="the decode step through torch.compile (eval --decode compiled)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    device = torch.device(args.device)
    model = random_model(args.shape, args.context + args.question + args.new_tokens, torch.bfloat16, args.device)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    context = torch.randint(3, vocab, (args.context,), generator=g).tolist()
    questions = [torch.randint(3, vocab, (args.question,), generator=g).tolist() for _ in range(args.answers)]

    rows = []
    for attempt in range(2):  # the first context compiles and warms everything up
        start = clock(device)
        caches = ContextCaches(model, context)
        build = clock(device) - start
        for method in parse_methods(args.methods):
            start = clock(device)
            cache = caches.cache([method], kernels=method.family in KERNEL_FAMILIES)
            calibrate = clock(device) - start
            for k, question in enumerate(questions):
                times = GenerationTimes()
                ids = torch.tensor([context + question], device=device)
                start = clock(device)
                generate_greedy(model, ids, cache.fork(), args.new_tokens, times=times, compile=args.compile)
                total = clock(device) - start
                if attempt == 1 and k > 0:
                    rows.append(dict(method=method.name, context_build_s=build, cache_s=calibrate, answer_s=total,
                                     prefill_s=times.prefill, capture_s=times.capture,
                                     token_ms=1e3 * times.decode / max(1, times.decode_tokens)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_phases.json").write_text(json.dumps(rows, indent=1))
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else device}, context {args.context}, "
          f"question {args.question}, {args.new_tokens} new tokens, decode step {'compiled' if args.compile else 'eager'}; "
          f"context prefill + indices: {rows[0]['context_build_s']:.2f} s")
    print("| method | cache build s | answer s | question prefill s | warm-up + capture s | decode ms/token |")
    print("|---|---|---|---|---|---|")
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        mean = {k: sum(r[k] for r in mine) / len(mine) for k in ("cache_s", "answer_s", "prefill_s", "capture_s", "token_ms")}
        print(f"| {name} | {mean['cache_s']:.3f} | {mean['answer_s']:.3f} | {mean['prefill_s']:.3f} | "
              f"{mean['capture_s']:.3f} | {mean['token_ms']:.2f} |")


if __name__ == "__main__":
    main()
