"""Where a decode step's GPU time goes: per kernel, squeezed vs dense, in the same run.

One request per method (a fixed context of `--context` random tokens, a `--input`-token user input,
greedy tokens through `generate_greedy`, its decode step replayed as a CUDA graph, or compiled first
with `--compile`, the step `model.generate` runs by default). Each method is profiled twice, with
`--steps` and with twice as many new tokens; the difference, per kernel name, over the extra steps is
one decode step's time and launches without the prefill and the capture. Dense: transformers' sdpa
attention over a StaticCache holding the same keys. The table lists the kernels by time per step,
the attention's own (ours, or dense SDPA) apart from the rest of the model.

`--generate` profiles `model.generate` instead (transformers' own loop and compile path, what users
call): besides the kernels, the host's launches per token (kernels launched one by one, and CUDA
graph replays), its waits for the GPU, its top-level operators, and the wall time per token, so
that the time outside the kernels shows (the profiler slows the host: compare host times between
the methods, not with the wall time).

    PYTHONPATH=. python3 benchmarks/profile_decode.py --context 2048 --keep 0.1 --compile --out $OUT
    PYTHONPATH=. python3 benchmarks/profile_decode.py --context 2048 --keep 0.1 --generate --out $OUT
    PYTHONPATH=. python3 benchmarks/profile_decode.py --context 131072 --input 1024 --generate --eager --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from common import SHAPES, dense_caches, random_model
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs, generate_greedy

# The host's launch calls, counted per step under the name "host: ..." (CUDA runtime and driver).
HOST_LAUNCHES = {"cudaLaunchKernel": "kernel", "cuLaunchKernel": "kernel", "cuLaunchKernelEx": "kernel",
                 "cudaLaunchKernelExC": "kernel", "cudaGraphLaunch": "CUDA graph", "cuGraphLaunch": "CUDA graph"}
# The host's waits for the device (an .item(), a copy to the CPU, a synchronize), timed per step as
# "host: waiting for the GPU".
HOST_WAITS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cuStreamSynchronize",
              "cuEventSynchronize", "cuCtxSynchronize"}


def kernel_times(run) -> dict[str, tuple[float, int]]:
    """Per kernel name: total device microseconds and launches while `run()` runs; besides, per host
    operator called at the top level ("cpu: <name>"), its host microseconds and calls, and the host's
    launches and waits for the device ("host: ...")."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA, ProfilerActivity.CPU] if torch.cuda.is_available() else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    totals = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        kind = getattr(event, "device_type", None)
        if event.name in HOST_LAUNCHES:
            totals[f"host: {HOST_LAUNCHES[event.name]} launches"][1] += 1
            continue
        if event.name in HOST_WAITS:
            totals["host: waiting for the GPU"][0] += event.cpu_time_total
            totals["host: waiting for the GPU"][1] += 1
            continue
        if torch.cuda.is_available() and kind != torch.autograd.DeviceType.CUDA:
            if event.cpu_parent is None:
                totals[f"cpu: {event.name}"][0] += event.cpu_time_total
                totals[f"cpu: {event.name}"][1] += 1
            continue
        if not torch.cuda.is_available() and event.cpu_parent is not None:
            continue  # on a CPU: top-level operators only
        name = event.name
        duration = event.device_time if torch.cuda.is_available() else event.cpu_time_total
        totals[name][0] += duration
        totals[name][1] += 1
    return {name: (t, n) for name, (t, n) in totals.items()}


def per_step(model, ids, fresh, steps: int, compile: bool, generate: bool,
             eager: bool = False) -> dict[str, tuple[float, float]]:
    """Per kernel: (microseconds, launches) of one decode step: the profile of 2 x steps new tokens
    minus that of `steps`, over `steps`; with `generate`, through `model.generate`, and also the wall
    time per token ("wall: ms per token", unprofiled, the median of three); `eager`: generate's
    compile path off (the squeezed layers replay their own steps, kernels/graphs.py)."""
    def run(tokens):
        if generate:
            model.generate(ids, **cache_kwargs(model, fresh()), max_new_tokens=tokens, min_new_tokens=tokens,
                           do_sample=False, disable_compile=eager)
        else:
            generate_greedy(model, ids, fresh(), tokens, compile=compile)

    run(2 * steps)  # warm-up: compile, allocator
    short = kernel_times(lambda: run(steps))
    long = kernel_times(lambda: run(2 * steps))
    out = {}
    for name in set(short) | set(long):
        t1, n1 = short.get(name, (0.0, 0))
        t2, n2 = long.get(name, (0.0, 0))
        if n2 - n1 > 0:
            out[name] = ((t2 - t1) / steps, (n2 - n1) / steps)
    if generate:
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

        def wall(tokens):
            sync()
            start = time.perf_counter()
            run(tokens)
            sync()
            return time.perf_counter() - start

        # the median of three differenced requests (one sample can catch a stall of the host)
        per_token = sorted((wall(2 * steps) - wall(steps)) / steps for _ in range(3))[1]
        out["wall: ms per token"] = (per_token * 1e3, 0.0)
    return out


def is_attention(name: str, method: str) -> bool:
    if method == "dense":
        return any(w in name.lower() for w in ("flash", "cudnn", "fmha", "attention", "sdpa", "efficient"))
    return name.startswith("_") and name.split("_")[-1].startswith("kernel")


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    model = random_model(args.shape, args.context + args.input + 4 * args.steps + 8, dtype, device)
    model.generation_config.eos_token_id = None  # every run generates the tokens asked for
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    context = torch.randint(vocab, (args.context,), generator=g).to(device)
    ids = torch.cat([context, torch.randint(vocab, (args.input,), generator=g).to(device)])[None]
    squeezed = SqueezedCache.from_context(model, context, SqueezeConfig(keep=args.keep), progress=False)
    _, static = dense_caches(squeezed, model, ids.shape[1] + 2 * args.steps + 1)
    profiles = {}
    for method in ("dense", "squeezed"):
        model.set_attn_implementation("sdpa" if method == "dense" else "squeezed")
        fresh = static if method == "dense" else squeezed.fork
        profiles[method] = per_step(model, ids, fresh, args.steps, args.compile, args.generate, args.eager)
    model.set_attn_implementation("squeezed")

    unit = "us" if torch.cuda.is_available() else "us (CPU, top-level operators)"
    how = ("model.generate eager" if args.eager else "model.generate") if args.generate else \
        "compiled + graph" if args.compile else "graph"
    lines = [f"# decode step, {args.shape}, context {args.context}, input {args.input}, keep {args.keep}, {how}, {device}", ""]
    summary = {}
    for method, profile in profiles.items():
        extra = {name: v for name, v in profile.items() if name.startswith(("host:", "wall:"))}
        host_ops = {name[5:]: v for name, v in profile.items() if name.startswith("cpu: ")}
        kernels = {name: v for name, v in profile.items() if name not in extra and not name.startswith("cpu: ")}
        total = sum(t for t, _ in kernels.values())
        launches = sum(n for _, n in kernels.values())
        attention = sum(t for name, (t, _) in kernels.items() if is_attention(name, method))
        summary[method] = dict(total_us=total, launches=launches, attention_us=attention,
                               **{name: (n if name.endswith("launches") else t) for name, (t, n) in extra.items()})
        lines += [f"## {method}: {total:.1f} {unit} per step, {launches:.0f} launches, attention {attention:.1f}", ""]
        lines += [f"- {name}: {t:.2f}" if name.startswith("wall:") else
                  f"- {name} per step: {t / 1e3:.2f} ms in {n:.1f} calls" if name == "host: waiting for the GPU" else
                  f"- {name} per step: {n:.1f}" for name, (t, n) in sorted(extra.items())]
        if host_ops:
            lines += ["", "| host operator (top level) | host us per step | calls per step |", "|---|---|---|"]
            lines += [f"| `{name[:90]}` | {t:.1f} | {n:.1f} |"
                      for name, (t, n) in sorted(host_ops.items(), key=lambda kv: -kv[1][0])[:10]]
        lines += ["", f"| kernel | {unit} per step | launches per step |", "|---|---|---|"]
        for name, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]:
            lines.append(f"| `{name[:90]}` | {t:.1f} | {n:.1f} |")
        lines.append("")
    layers = model.config.num_hidden_layers
    extra = summary["squeezed"]["total_us"] - summary["dense"]["total_us"]
    lines.append(f"squeezed - dense: {extra:+.1f} {unit} per step ({extra / layers:+.1f} per layer); launches "
                 f"{summary['squeezed']['launches'] - summary['dense']['launches']:+.0f} per step")
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"profile_decode_{args.shape}_{args.context}_{how.replace('.', '-').replace(' + ', '-').replace(' ', '-')}"
        (out / f"{stem}.md").write_text(text + "\n")
        (out / f"{stem}.json").write_text(json.dumps(
            {m: {name: list(v) for name, v in k.items()} for m, k in profiles.items()}, indent=1))
    return 0


def request_arguments(p, context: int, input_tokens: int) -> None:
    """The arguments of a profiled request (model shape and dtype, context, input, keep, device, output)."""
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    p.add_argument("--context", type=int, default=context)
    p.add_argument("--input", type=int, default=input_tokens, help="user input tokens")
    p.add_argument("--keep", type=float, default=0.1)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--device")
    p.add_argument("--out")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    request_arguments(p, context=2048, input_tokens=64)
    p.add_argument("--steps", type=int, default=16, help="decode steps of the shorter profile")
    p.add_argument("--compile", action="store_true", help="the step through torch.compile first (what generate runs)")
    p.add_argument("--generate", action="store_true", help="profile model.generate itself (its loop and compile path)")
    p.add_argument("--eager", action="store_true",
                   help="with --generate: generate(disable_compile=True), the eager steps (each squeezed layer replays "
                        "its own CUDA graph)")
    p.add_argument("--top", type=int, default=25, help="kernels listed per method")
    sys.exit(main(p.parse_args()))
