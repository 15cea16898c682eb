"""End-to-end generation benchmark: time to first token and time per output token, dense vs squeezed.

One request = a fixed context (already processed: dense K/V for the baselines, a squeezed index for
ours) followed by a user input of `input_tokens` tokens, then `new_tokens` greedy tokens. For each
context length, in the same run:
- dense, eager: `model.generate` with a `DynamicCache` holding the context (transformers' default);
- dense, graphed: `generate_greedy` with a `StaticCache` (written in place, decode step replayed as
  a CUDA graph): the strongest dense baseline transformers offers without a compiler;
- squeezed, eager: `model.generate` with `cache.fork(keep=...)`;
- squeezed, graphed: `generate_greedy` with `cache.fork(keep=...)`.
Squeezed rows read the input as the default does (`--prefills exact`: every key, then the pins);
`--prefills exact lookup` adds rows whose forks read it by the lookup (`fork(prefill="lookup")`,
the paper's prefill: method "squeezed, lookup prefill").
Dense runs use transformers' "sdpa" attention, squeezed runs "squeezed"; all share one model and
one context, and the dense caches hold the same keys and values as the squeezed index. The model
has random weights (speed does not depend on them) and the Llama-3.1-8B shape by default; the
context is random token ids. TTFT includes the prompt's forward and the first token; TPOT is the
mean time of the later tokens (what a request's answer takes per token, its one-off steps included:
benchmarks/bench_requests.py shows them), "TPOT median" the median one (the steady state). Each row
times the second request of its kind (the first compiles). Peak memory is measured over each request.

transformers' dense paths do not reach the hardware limit (with a mask, its sdpa path repeats the
KV heads and cannot use the fused GQA kernels), so the run also times, per layer, the best dense
SDPA (cuDNN or flash, no mask, GQA) and the squeezed kernels on the same keys; "x ideal dense"
is the squeezed request's time with its attention swapped for that dense attention, over its own
time: the speedup against a dense implementation whose attention runs at the limit. "TPOT / bound"
is a request's TPOT over the dense TPOT of the run's shortest context (pass a short one, e.g. 2048,
first): the step without long attention, which no attention can beat; "median / bound" the same of
the medians.

    PYTHONPATH=. python3 benchmarks/bench_generate.py --contexts 32768 131072 --inputs 64 1024 --keeps 0.1 0.3 --out results/
"""

from __future__ import annotations

import argparse
import csv
import gc
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from common import (SHAPES, common_prefix, dense_attention_time, dense_caches, gpu_time, memory_start, peak_memory,
                    random_model, run_compiled, run_eager, run_eager_ungraphed, run_graph, run_graph_compiled)
from hf_squeeze import SqueezedCache, SqueezeConfig


# The squeezed methods, by how a request reads its input (`SqueezedCache.fork(prefill=...)`).
METHODS = {"exact": "squeezed", "lookup": "squeezed, lookup prefill"}
PREFILLS = {method: prefill for prefill, method in METHODS.items()}


@dataclass
class Result:
    context: int
    input: int
    method: str  # "dense", "squeezed" (the input read exactly) or "squeezed, lookup prefill"
    keep: float  # 1.0 for dense
    mode: str  # "eager" (model.generate) or "graph" (generate_greedy)
    ttft_ms: float
    tpot_ms: float  # the mean of the later tokens (a request's one-off steps included)
    tpot_median_ms: float  # the median later token: the steady state (nan for generate_greedy)
    peak_gib: float  # peak GPU memory during the request (everything resident)
    request_gib: float  # of which allocated for the request (peak minus what was resident before)
    step_growth_kib: float  # memory still allocated after the last step minus after the second, per step
    tokens: list


def bench_context(model, tokens: int, inputs: list[int], keeps: list[float], new_tokens: int, modes: list[str],
                  config: SqueezeConfig, prefills: tuple[str, ...] = ("exact",),
                  progress: bool = True) -> tuple[list[Result], dict]:
    device = model.device
    g = torch.Generator().manual_seed(tokens)
    vocab = model.config.vocab_size
    context = torch.randint(vocab, (tokens,), generator=g).to(device)
    model.set_attn_implementation("squeezed")
    squeezed = SqueezedCache.from_context(model, context, config, progress=progress)
    build = dict(squeezed.build_stats)
    dynamic, static = dense_caches(squeezed, model, tokens + max(inputs) + new_tokens)
    runners = {"eager": run_eager, "eager-ungraphed": run_eager_ungraphed, "graph": run_graph, "compiled": run_compiled,
               "graph-compiled": run_graph_compiled}
    results = []
    jobs = [(n, "dense", 1.0, m) for n in inputs for m in modes]
    jobs += [(n, METHODS[p], k, m) for n in inputs for p in prefills for k in keeps for m in modes]
    questions = {n: torch.randint(vocab, (n,), generator=g).to(device) for n in inputs}  # one per size, for every row
    for n, method, keep, mode in tqdm(jobs, desc=f"{tokens} tokens", disable=not progress):
        ids = torch.cat([context, questions[n]])[None]
        model.set_attn_implementation("sdpa" if method == "dense" else "squeezed")

        def fresh():
            if method != "dense":  # (a fork reuses the step memory of the last one collected: recycle.py)
                return squeezed.fork(keep=keep, prefill=PREFILLS[method])
            if mode == "eager":
                return dynamic()
            return static(reuse=True)  # one StaticCache for every request (as a fork reuses its spares)

        runners[mode](model, ids, fresh(), min(4, new_tokens))  # warm-up: kernels compiled, allocator warm
        cache = fresh()
        before = memory_start(device)
        timing = runners[mode](model, ids, cache, new_tokens)
        peak, request = peak_memory(device, before)
        del cache
        results.append(Result(tokens, n, method, keep, mode, timing.ttft * 1e3, timing.tpot * 1e3,
                              timing.tpot_median * 1e3, peak, request, timing.growth / 1024,
                              timing.out[0, ids.shape[1]:].tolist()))
    model.set_attn_implementation("squeezed")
    attention = {}
    if device.type == "cuda":
        found = attention_times(squeezed, model, inputs, keeps, prefills)
        attention = {(tokens,) + key: us for key, us in found.items()}
    del squeezed, dynamic, static
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, build, attention


def attention_times(squeezed: SqueezedCache, model, inputs: list[int], keeps: list[float],
                    prefills: tuple[str, ...] = ("exact",)) -> dict:
    """Per-layer attention time (us) in this run, on layer 0's index: the best dense SDPA over the
    context + input, and the squeezed kernels at each keep as the request runs them (the input's
    prefill under its rule: the default's reads every key and finds the pins' key weights; the
    decode's lookup + attention, over its pins too); decode (one query after the input) and the
    input's prefill. Used to place the end-to-end numbers against a dense
    attention at the bandwidth/compute limit, which transformers' sdpa path does not reach."""
    from hf_squeeze import kernels

    index = squeezed.fixed.layers[0]
    kindex = kernels.kernel_index(index)
    heads, _, dim = index.keys.shape
    q_heads = model.config.num_attention_heads
    dtype, device = index.keys.dtype, index.keys.device
    g = torch.Generator(device=device).manual_seed(0)
    stats = torch.zeros(1, dtype=torch.int64, device=device)
    context_k = torch.cat([index.dense_keys, index.keys], 1)[None]
    context_v = torch.cat([index.dense_values, index.values], 1)[None]
    times = {}
    for n in inputs:
        dyn_k, dyn_v = (torch.randn(1, heads, n, dim, device=device, dtype=dtype, generator=g) for _ in range(2))
        all_k, all_v = torch.cat([context_k, dyn_k], 2), torch.cat([context_v, dyn_v], 2)
        queries = {}
        for phase, tokens in (("decode", 1), ("prefill", n)):
            queries[phase] = torch.randn(1, q_heads, tokens, dim, device=device, dtype=dtype, generator=g)
            times[(n, phase, None, None)] = dense_attention_time(queries[phase], all_k, all_v)
        for keep, prefill in itertools.product(keeps, prefills):
            # what the request runs: the default's input prefill reads every key and pins by the
            # key weights, and its decode steps read those pins besides the lookup's keys
            layer = squeezed.fork(keep=keep, prefill=prefill).layers[0].attention
            for phase in ("prefill", "decode"):  # (the prefill first: it pins)
                q = queries[phase]
                tokens = q.shape[2]
                rule = layer.step_rule(tokens)
                lse = torch.empty(1, heads, tokens * q_heads // heads, device=device) if layer.pins_now(tokens) else None
                pinned = layer.pinned if tokens == 1 else None

                def ours():
                    out = kernels.attend(q, dyn_k, dyn_v, kindex, rule, dim**-0.5, None, None, stats, pinned=pinned,
                                         lse=lse)
                    if lse is not None:
                        kernels.key_weights(q, kindex, lse, dim**-0.5)
                    return out

                times[(n, phase, keep, prefill)] = gpu_time(ours)
                if lse is not None:
                    layer.pin(kernels.key_weights(q, kindex, lse, dim**-0.5))
        del all_k, all_v
    return times


def ratios(results: list[Result], attention: dict | None = None, layers: int = 0) -> list[dict]:
    """Each squeezed row against the dense row of the same context, input and mode, and against the
    faster dense mode; its TPOT over the attention-free bound: the dense TPOT of the run's shortest
    context (same input and mode; NaN when that is the row's own context)."""
    dense = {(r.context, r.input, r.mode): r for r in results if r.method == "dense"}
    shortest = min(r.context for r in results)
    rows = []
    for r in results:
        d = dense.get((r.context, r.input, r.mode))
        best_ttft = min((x.ttft_ms for k, x in dense.items() if k[:2] == (r.context, r.input)), default=float("nan"))
        best_tpot = min((x.tpot_ms for k, x in dense.items() if k[:2] == (r.context, r.input)), default=float("nan"))
        row = {k: getattr(r, k) for k in ("context", "input", "method", "keep", "mode", "ttft_ms", "tpot_ms",
                                            "tpot_median_ms", "peak_gib", "request_gib", "step_growth_kib")}
        eager = next((x for x in results if (x.context, x.input, x.method, x.keep, x.mode) ==
                      (r.context, r.input, r.method, r.keep, "eager")), r)
        row["same_tokens_as_eager"] = common_prefix(r.tokens, eager.tokens)
        row["ttft_x"] = d.ttft_ms / r.ttft_ms if d else float("nan")
        row["tpot_x"] = d.tpot_ms / r.tpot_ms if d else float("nan")
        row["ttft_x_best_dense"] = best_ttft / r.ttft_ms
        row["tpot_x_best_dense"] = best_tpot / r.tpot_ms
        bound = dense.get((shortest, r.input, r.mode))
        row["tpot_over_bound"] = r.tpot_ms / bound.tpot_ms if bound and r.context > shortest else float("nan")
        row["median_over_bound"] = (r.tpot_median_ms / bound.tpot_median_ms if bound and r.context > shortest
                                    else float("nan"))
        # Against a dense attention at the hardware limit: this request's time with each layer's
        # squeezed attention swapped for the best dense SDPA, both timed in this run.
        row["ttft_x_ideal_dense"] = row["tpot_x_ideal_dense"] = float("nan")
        if attention and r.method in PREFILLS:
            for phase, ms, key in (("prefill", r.ttft_ms, "ttft_x_ideal_dense"), ("decode", r.tpot_ms, "tpot_x_ideal_dense")):
                dense_us = attention[(r.context, r.input, phase, None, None)]
                ours_us = attention[(r.context, r.input, phase, r.keep, PREFILLS[r.method])]
                row[key] = (ms + layers * (dense_us - ours_us) / 1e3) / ms
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| context | input | method | keep | mode | TTFT ms | TPOT ms | TPOT median ms | TTFT x | TPOT x | "
            "TTFT x best dense | TPOT x best dense | TTFT x ideal dense | TPOT x ideal dense | TPOT / bound | "
            "median / bound | peak GiB | request GiB | growth KiB/step | tokens = eager |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['input']} | {r['method']} | {r['keep']:g} | {r['mode']} | {r['ttft_ms']:.1f} | "
            f"{r['tpot_ms']:.2f} | {r['tpot_median_ms']:.2f} | {r['ttft_x']:.2f} | {r['tpot_x']:.2f} | "
            f"{r['ttft_x_best_dense']:.2f} | {r['tpot_x_best_dense']:.2f} | {r['ttft_x_ideal_dense']:.2f} | "
            f"{r['tpot_x_ideal_dense']:.2f} | {r['tpot_over_bound']:.2f} | {r['median_over_bound']:.2f} | {r['peak_gib']:.1f} | {r['request_gib']:.2f} | {r['step_growth_kib']:.0f} | "
            f"{r['same_tokens_as_eager']} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Speedups of each squeezed request against transformers' faster dense path and against a
    dense attention at the hardware limit (see the module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The graph rows: with eager decode the host's per-layer work, not attention, sets the pace.
    squeezed = [r for r in rows if r["method"] in PREFILLS and r["mode"] == "graph"] or \
        [r for r in rows if r["method"] in PREFILLS]
    labels = [f"{int(r['context']) // 1024}K+{r['input']}\nkeep {float(r['keep']):g}"
              + ("\nlookup prefill" if PREFILLS.get(r["method"]) == "lookup" else "") for r in squeezed]
    x = range(len(squeezed))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, what, title in ((axes[0], "ttft", "time to first token"), (axes[1], "tpot", "time per output token")):
        for shift, key, name in ((-0.2, f"{what}_x_best_dense", "vs transformers dense (faster of eager/graph)"),
                                 (0.2, f"{what}_x_ideal_dense", "vs dense attention at the hardware limit")):
            ax.bar([i + shift for i in x], [float(r[key]) for r in squeezed], width=0.4, label=name)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_ylabel("speedup (dense time / squeezed time)")
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle("squeezed vs dense generate (decode as CUDA graph replays; context K + input tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args) -> int:
    dtype = getattr(torch, args.dtype)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    modes = args.modes
    if device != "cuda" and any(m.startswith("graph") for m in modes):
        modes = [m for m in modes if not m.startswith("graph")]
        print("no CUDA device: CUDA-graph runs skipped")
    if not modes:
        raise ValueError("nothing to run: --modes graph needs a CUDA device")
    longest = max(args.contexts) + max(args.inputs) + args.new_tokens
    model = random_model(args.shape, longest, dtype, device)
    config = SqueezeConfig(keep=min(args.keeps), selection="topk")
    results, builds, attention = [], {}, {}
    for tokens in args.contexts:
        found, builds[tokens], times = bench_context(model, tokens, args.inputs, args.keeps, args.new_tokens, modes, config,
                                                     tuple(args.prefills))
        results += found
        attention.update(times)
    rows = ratios(results, attention, model.config.num_hidden_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "generate.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "generate_speedup.png")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"\n{args.shape} (random weights), {args.dtype}, {name}, {args.new_tokens} new tokens")
    for tokens, build in builds.items():
        print(f"context {tokens}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in build.items()))
    if attention:
        print("\nper-layer attention, us (layer 0's index; dense = best of cuDNN/flash SDPA):")
        print("| context | input | phase | keep | input read | us |\n| --- | --- | --- | --- | --- | --- |")
        for (tokens, n, phase, keep, prefill), us in sorted(attention.items(), key=lambda kv: tuple(map(str, kv[0]))):
            print(f"| {tokens} | {n} | {phase} | {'dense' if keep is None else keep} | {prefill or '-'} | {us:.1f} |")
    print(table(rows))
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--inputs", type=int, nargs="+", default=[64, 1024], help="user input tokens")
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.1, 0.3])
    parser.add_argument("--prefills", nargs="+", choices=["exact", "lookup"], default=["exact"],
                        help="how the squeezed requests read their input (exact: the default)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--modes", nargs="+", choices=["eager", "eager-ungraphed", "graph", "compiled", "graph-compiled"],
                        default=["eager", "graph"],
                        help="eager: model.generate(disable_compile=True) (each layer's decode step replayed as a CUDA "
                             "graph); eager-ungraphed: the same, the steps launched kernel by kernel; graph: "
                             "generate_greedy (the model's step as one CUDA graph); compiled: "
                             "model.generate as users call it (transformers' compile path, its default CompileConfig); "
                             "graph-compiled: generate_greedy(compile=True)")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device")
    parser.add_argument("--out", default="benchmarks/results")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
