"""Where a request's time to first token goes: the GPU's kernels against the wall clock, dense vs
squeezed (the exact input prefill, the default, and the lookup prefill), in the same run.

Each method answers one request of one token through `model.generate` (a fixed context of
`--context` random tokens, a `--input`-token user input): profiled once after a warm-up, and timed
unprofiled (the median of three). Printed per method: the wall time, the GPU's kernel time (its sum:
what the device had to do), the host's launches and waits, the top host operators and kernels.
Wall time well above the kernels' is time the GPU waited for the host (Python, launches);
`--python` also lists where the host's time goes (cProfile of one more request: the functions with
the most time of their own, and the package's functions by their total time), and where the host
waits for the GPU (`torch.cuda.set_sync_debug_mode`: the code that asked, with its count).

    PYTHONPATH=.:benchmarks python3 benchmarks/profile_prefill.py --context 131072 --input 1024 --out $OUT
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from common import dense_caches, random_model
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs
from hf_squeeze.devices import host_waits
from profile_decode import is_attention, kernel_times, request_arguments


def main(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(args.shape, args.context + args.input + 8, getattr(torch, args.dtype), device)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    context = torch.randint(vocab, (args.context,), generator=g).to(device)
    ids = torch.cat([context, torch.randint(vocab, (args.input,), generator=g).to(device)])[None]
    squeezed = SqueezedCache.from_context(model, context, SqueezeConfig(keep=args.keep), progress=False)
    _, static = dense_caches(squeezed, model, ids.shape[1] + 2)
    methods = {"dense": lambda: static(reuse=True), "squeezed, exact prefill": squeezed.fork,
               "squeezed, lookup prefill": lambda: squeezed.fork(prefill="lookup")}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    lines = [f"# time to first token, {args.shape}, context {args.context}, input {args.input}, keep {args.keep}, "
             f"{torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}", ""]
    rows = []
    for name, fresh in methods.items():
        model.set_attn_implementation("sdpa" if name == "dense" else "squeezed")

        def request():
            model.generate(ids, **cache_kwargs(model, fresh()), max_new_tokens=1, do_sample=False)

        request()  # warm-up
        walls = []
        for _ in range(3):
            sync()
            start = time.perf_counter()
            request()
            sync()
            walls.append(time.perf_counter() - start)
        wall = sorted(walls)[1] * 1e3
        profile = kernel_times(request)
        kernels = {k: v for k, v in profile.items() if not k.startswith(("host:", "cpu: "))}
        gpu = sum(t for t, _ in kernels.values()) / 1e3
        attention = sum(t for k, (t, _) in kernels.items() if is_attention(k, "dense" if name == "dense" else "squeezed"))
        waits = profile.get("host: waiting for the GPU", (0.0, 0))
        launches = sum(n for k, (_, n) in profile.items() if k.startswith("host:") and k.endswith("launches"))
        rows.append((name, wall, gpu, attention / 1e3, launches, waits[0] / 1e3, waits[1]))
        lines += [f"## {name}: wall {wall:.1f} ms, kernels {gpu:.1f} ms (attention {attention / 1e3:.1f}), "
                  f"{launches:.0f} launches, waits for the GPU {waits[0] / 1e3:.1f} ms in {waits[1]:.0f} calls", ""]
        host_ops = sorted(((k[5:], v) for k, v in profile.items() if k.startswith("cpu: ")), key=lambda kv: -kv[1][0])
        lines += ["| host operator (top level) | host ms | calls |", "|---|---|---|"]
        lines += [f"| `{k[:90]}` | {t / 1e3:.2f} | {n:.0f} |" for k, (t, n) in host_ops[:10]]
        lines += ["", "| kernel | ms | launches |", "|---|---|---|"]
        lines += [f"| `{k[:90]}` | {t / 1e3:.2f} | {n:.0f} |"
                  for k, (t, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[: args.top]]
        lines.append("")
        if args.python:
            lines += python_profile(request, args.top)
            if device == "cuda":
                lines += sync_sites(request)
    model.set_attn_implementation("squeezed")
    lines += ["| method | wall ms | kernels ms | attention ms | wall - kernels ms | launches | waits ms (calls) |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {w:.1f} | {k:.1f} | {a:.1f} | {w - k:.1f} | {la:.0f} | {wt:.1f} ({wc:.0f}) |"
              for n, w, k, a, la, wt, wc in rows]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"profile_prefill_{args.shape}_{args.context}_{args.input}.md").write_text(text + "\n")
    return 0


def python_profile(request, top: int) -> list[str]:
    """cProfile of one `request()`: the functions with the most time of their own (the profiler's
    overhead inflates them alike), and hf_squeeze's functions by their total time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.runcall(request)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own s, total s, callers)
    rows = [(Path(f).name + f":{n}" + f" {name}", calls, own, total) for (f, n, name), (_, calls, own, total, _) in stats.items()]
    lines = [f"host, cProfile: {sum(r[2] for r in rows) * 1e3:.1f} ms in {sum(r[1] for r in rows)} calls", "",
             "| function (own time) | calls | own ms | total ms |", "|---|---|---|---|"]
    lines += [f"| `{f[:90]}` | {c} | {o * 1e3:.2f} | {t * 1e3:.2f} |" for f, c, o, t in sorted(rows, key=lambda r: -r[2])[:top]]
    ours = [(f"{Path(f).parent.name}/{Path(f).name}:{n} {name}", calls, own, total)
            for (f, n, name), (_, calls, own, total, _) in stats.items() if "hf_squeeze" in f]
    lines += ["", "| hf_squeeze function (total time) | calls | own ms | total ms |", "|---|---|---|---|"]
    lines += [f"| `{f[:90]}` | {c} | {o * 1e3:.2f} | {t * 1e3:.2f} |" for f, c, o, t in sorted(ours, key=lambda r: -r[3])[:top]]
    return lines + [""]


def sync_sites(request) -> list[str]:
    """Where one `request()` makes the host wait for the GPU, counted (`devices.host_waits`)."""
    sites = host_waits(request)
    lines = [f"host waits for the GPU: {sum(sites.values())}", "", "| where | waits |", "|---|---|"]
    return lines + [f"| `{site}` | {n} |" for site, n in sites.most_common()] + [""]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    request_arguments(p, context=131072, input_tokens=1024)
    p.add_argument("--top", type=int, default=15, help="kernels listed per method")
    p.add_argument("--python", action="store_true", help="also where the host's time goes (cProfile)")
    sys.exit(main(p.parse_args()))
