"""Offline index build at Llama-3.1-8B shapes on a GPU, against scikit-learn on the CPU.

    PYTHONPATH=. python3 benchmarks/offline_index.py --out results/   # on a machine with a GPU

What it measures (the model's own prefill is excluded; keys are synthetic, see `synthetic_keys`):
1. checks: the Triton kernels against their torch references on the GPU, and that two builds
   give identical indices (fixed seed -> same result);
2. the whole offline index of a 128K-token context, 32 layers x 8 KV heads x head_dim 128, bf16
   keys/values: fine K-means (5% centroids, 20 iterations, seeding included), the coarse tree
   (1%), the cluster-sorted K/V and CSR offsets; time and peak GPU memory;
3. scikit-learn KMeans (k-means++, n_init=1, same K, same 20 iterations) on one head of that
   context on the CPU, in a subprocess running beside steps 2-5; the ratio is
   (sklearn seconds per head x 256 heads) / (our seconds for all 256 heads). The objective (sum of
   cosine distances) of both on that head is compared too;
4. a 1M-token context: the layers are built one group at a time from pinned CPU memory, the
   finished index going back to pinned CPU memory (the K/V of all 32 layers at 1M tokens, 128 GiB,
   fit neither the GPU nor this host), time and peak GPU memory for `--layers-1m` layers;
5. `SqueezedCache.save` / `load` of the 128K index (a tiny model with the 8B attention shapes
   provides the fingerprint), time and file size.
Results: a table on stdout and `offline_index.json` in --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hf_squeeze import SqueezeConfig
from hf_squeeze.clustering import _counts, cosine_objective, kmeans, naive
from hf_squeeze.index import build_indices

LAYERS, HEADS, DIM = 32, 8, 128


def synthetic_keys(layer: int, tokens: int, device, heads=HEADS, dim=DIM, topics=4096) -> torch.Tensor:
    """Keys with cluster structure, like post-RoPE keys: each token is one of `topics` directions
    plus noise, every head has a shared mean direction and a few large-magnitude channels."""
    g = torch.Generator(device=device).manual_seed(1000 + layer)
    centers = torch.randn(heads, topics, dim, generator=g, device=device)
    mean = 2.0 * torch.randn(heads, 1, dim, generator=g, device=device)
    scale = torch.exp(0.7 * torch.randn(heads, 1, dim, generator=g, device=device))
    which = torch.randint(topics, (heads, tokens), generator=g, device=device)
    keys = torch.empty(heads, tokens, dim, dtype=torch.bfloat16, device=device)
    step = 1 << 17
    for s in range(0, tokens, step):
        w = which[:, s : s + step]
        noise = torch.randn(heads, w.shape[1], dim, generator=g, device=device)
        keys[:, s : s + step] = ((centers.gather(1, w[..., None].expand(-1, -1, dim)) + 0.8 * noise + mean) * scale)
    return keys


def synthetic_values(layer: int, tokens: int, device) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(2000 + layer)
    return torch.randn(HEADS, tokens, DIM, generator=g, device=device, dtype=torch.bfloat16)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    _sync()
    start = time.perf_counter()
    out = fn()
    _sync()
    return out, time.perf_counter() - start


def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.cpu().pin_memory() if torch.cuda.is_available() else t.cpu()


def check_kernels(device) -> dict:
    from hf_squeeze.clustering.kernels import assign, cluster_sums, seeding_gains

    g = torch.Generator(device=device).manual_seed(0)
    x = F.normalize(torch.randn(4, 5000, DIM, generator=g, device=device), dim=-1)
    c = F.normalize(torch.randn(4, 300, DIM, generator=g, device=device), dim=-1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        labels, best = assign(x.to(dtype), c.to(dtype))
        ref_labels, ref_best = naive.assign(x.to(dtype).float(), c.to(dtype).float())
        # Ties within rounding may pick another center: compare the similarity reached.
        out[f"assign_{str(dtype)[6:]}_max_sim_err"] = float((best - ref_best).abs().max())
        out[f"assign_{str(dtype)[6:]}_label_agree"] = float((labels == ref_labels).float().mean())
    lab = torch.randint(300, (4, 5000), generator=g, device=device)
    counts = _counts(lab, 300)
    sums = cluster_sums(x, lab.argsort(dim=1, stable=True), F.pad(counts.cumsum(1), (1, 0)))
    out["cluster_sums_max_err"] = float((sums - naive.cluster_sums(x, lab, 300)).abs().max())
    dist = torch.rand(4, 5000, generator=g, device=device)
    gains = seeding_gains(x, c, dist)
    out["gains_max_rel_err"] = float(((gains - naive.seeding_gains(x, c, dist)).abs() / gains.abs().clamp_min(1)).max())
    return out


def tune_assign(points: torch.Tensor, k: int) -> dict:
    """Time the fused assignment (one layer: 8 heads x 128K points x 6.5K centers) for each candidate
    tile configuration; keep the fastest for the rest of the run."""
    from hf_squeeze.clustering import kernels

    x = F.normalize(points.float(), dim=-1).to(torch.bfloat16)
    centers = x[:, :k].contiguous()
    flops = 2 * x.shape[0] * x.shape[1] * k * x.shape[2]
    times = {}
    for config in kernels.ASSIGN_CANDIDATES:
        kernels.ASSIGN_CONFIG = config
        try:
            kernels.assign(x, centers)  # compile
            _, seconds = timed(lambda: [kernels.assign(x, centers) for _ in range(3)])
            times[str(config)] = {"ms": seconds / 3 * 1e3, "tflops": flops / (seconds / 3) / 1e12}
        except Exception as error:  # a tile that does not fit is skipped, not fatal
            times[str(config)] = {"error": repr(error)[:200]}
    best = min((c for c in kernels.ASSIGN_CANDIDATES if "ms" in times[str(c)]), key=lambda c: times[str(c)]["ms"])
    kernels.ASSIGN_CONFIG = best
    times["chosen"] = str(best)
    return times


SKLEARN = r"""
import sys, time, numpy as np
from sklearn.cluster import KMeans
x = np.load(sys.argv[1]); k = int(sys.argv[2])
start = time.perf_counter()
labels = KMeans(k, init="k-means++", n_init=1, max_iter=20, random_state=0).fit(x).labels_
print(time.perf_counter() - start)
np.save(sys.argv[3], labels)
"""


def main():
    global LAYERS
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--tokens-1m", type=int, default=1 << 20)
    parser.add_argument("--layers-1m", type=int, default=2)
    parser.add_argument("--sklearn-timeout", type=int, default=300)
    parser.add_argument("--skip-save", action="store_true")
    parser.add_argument("--out", default="out")
    parser.add_argument("--layers", type=int, default=32, help="(smaller for a dry run on the CPU)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    LAYERS = args.layers
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__}
    import triton

    results["triton"] = triton.__version__
    results["cpu_cores"] = os.cpu_count()
    config = SqueezeConfig(hierarchical=True, centroid_ratio=0.05, coarse_ratio=0.01, kmeans_iters=20)
    results["config"] = config.to_dict()

    # 1. checks
    results["kernel_checks"] = check_kernels(device) if device.type == "cuda" else "skipped (no GPU)"
    print("kernel checks", results["kernel_checks"], flush=True)

    # 2. inputs of the 128K context
    n = args.tokens
    keys = [synthetic_keys(layer, n, device) for layer in range(LAYERS)]
    values = [synthetic_values(layer, n, device) for layer in range(LAYERS)]
    clustered = slice(config.sinks, n - config.window)
    k = config.num_clusters(clustered.stop - clustered.start)
    results["context_tokens"], results["clusters_per_head"] = n, k
    results["coarse_clusters_per_head"] = config.num_coarse_clusters(clustered.stop - clustered.start)

    # 3. scikit-learn on one head, on the CPU, beside the GPU work (one core left to drive the GPU)
    tmp = Path(tempfile.mkdtemp())
    head = F.normalize(keys[0][0, clustered].float(), dim=-1).cpu().numpy()
    np.save(tmp / "x.npy", head)
    threads = str(max(1, (os.cpu_count() or 2) - 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    sk = subprocess.Popen([sys.executable, "-c", SKLEARN, str(tmp / "x.npy"), str(k), str(tmp / "labels.npy")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    results["sklearn_threads"] = int(threads)

    head0 = keys[0][:1, clustered].cpu()
    if device.type == "cuda":
        results["assign_configs"] = tune_assign(keys[0][:, clustered], k)
        print("assign configs", results["assign_configs"], flush=True)
    # warm-up: Triton compiles each kernel once per dtype and shape class; a small build, not timed
    small = [synthetic_keys(0, 8192, device)] * 2
    build_indices(small, small, config)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    _reset_peak(device)
    first, seconds = timed(lambda: build_indices(keys, values, config))
    results["build_128k_seconds"] = seconds
    results["build_128k_inputs_gib"] = base / 2**30
    results["build_128k_peak_gib"] = _peak(device)
    second, seconds2 = timed(lambda: build_indices(keys, values, config))
    results["build_128k_seconds_again"] = seconds2
    results["reproducible"] = all(
        torch.equal(a.offsets, b.offsets) and torch.equal(a.keys, b.keys) and torch.equal(a.coarse_offsets, b.coarse_offsets)
        for a, b in zip(first, second)
    )
    del second
    print(f"128K build: {seconds:.2f} s, again {seconds2:.2f} s, reproducible={results['reproducible']}", flush=True)

    # K-means alone on layer 0 (its 8 heads): our objective on head 0, for the comparison with sklearn
    ours_labels = kmeans(keys[0][:, clustered], k, config.kmeans_iters, config.seed)
    results["ours_objective_head0"] = float(cosine_objective(keys[0][:1, clustered], ours_labels[:1], k))

    # 4. 1M tokens, layer groups streamed from pinned CPU memory
    n1 = args.tokens_1m
    del keys, values, first
    keys1 = [_pinned(synthetic_keys(layer, n1, device)) for layer in range(args.layers_1m)]
    values1 = [_pinned(synthetic_values(layer, n1, device)) for layer in range(args.layers_1m)]
    _reset_peak(device)
    index1, seconds = timed(lambda: build_indices(keys1, values1, config, device=device, storage="cpu", progress=True))
    results["build_1m_tokens"] = n1
    results["build_1m_layers"] = args.layers_1m
    results["build_1m_seconds"] = seconds
    results["build_1m_seconds_per_layer"] = seconds / args.layers_1m
    results["build_1m_peak_gib"] = _peak(device)
    results["build_1m_clusters_per_head"] = index1[0].centroids.shape[1]
    del index1, keys1, values1
    print(f"1M build: {seconds:.2f} s for {args.layers_1m} layers", flush=True)

    # 5. save / load at 128K
    if not args.skip_save:
        results.update(save_load(n, config, device, tmp))

    # 3 (end). scikit-learn
    try:
        stdout, stderr = sk.communicate(timeout=args.sklearn_timeout)
        results["sklearn_seconds_one_head"] = float(stdout.strip().splitlines()[-1])
        labels = torch.from_numpy(np.load(tmp / "labels.npy")).long()
        results["sklearn_objective_head0"] = float(cosine_objective(head0, labels[None], k))
        results["objective_ratio_ours_over_sklearn"] = results["ours_objective_head0"] / results["sklearn_objective_head0"]
        results["speedup_vs_sklearn"] = results["sklearn_seconds_one_head"] * LAYERS * HEADS / results["build_128k_seconds"]
    except subprocess.TimeoutExpired:
        sk.kill()
        results["sklearn_seconds_one_head"] = f"> {args.sklearn_timeout} (stopped)"
    except Exception as error:  # report, do not lose the other results
        results["sklearn_error"] = f"{error!r} {sk.stderr.read() if sk.stderr else ''}"

    (out_dir / "offline_index.json").write_text(json.dumps(results, indent=2))
    print()
    print("| step | value |")
    print("| --- | --- |")
    for key, value in results.items():
        if key not in ("config", "kernel_checks"):
            print(f"| {key} | {value:.3f} |" if isinstance(value, float) else f"| {key} | {value} |")


def save_load(n, config, device, tmp) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    import hf_squeeze  # noqa: F401
    from hf_squeeze import SqueezedCache
    from hf_squeeze.context import FixedContext
    from hf_squeeze.calibration import calibrate
    from hf_squeeze.integrations.fingerprint import model_fingerprint

    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=32,
        num_key_value_heads=HEADS, head_dim=DIM, max_position_embeddings=1 << 21,
    )).to(device, torch.bfloat16).eval()
    model.set_attn_implementation("squeezed")
    keys = [synthetic_keys(layer, n, device) for layer in range(LAYERS)]
    values = [synthetic_values(layer, n, device) for layer in range(LAYERS)]
    indices = build_indices(keys, values, config)
    del keys, values
    rules = calibrate(indices, [None] * LAYERS, [DIM**-0.5] * LAYERS, config)
    ids = torch.randint(256, (n,))
    cache = SqueezedCache(FixedContext(tuple(indices), tuple(rules), config, ids, model_fingerprint(model)))
    path = tmp / "ctx.squeeze"
    _, save_seconds = timed(lambda: cache.save(path, progress=False))
    del cache, indices
    _reset_peak(device)
    loaded, load_seconds = timed(lambda: SqueezedCache.load(path, model, progress=False))
    out = {"save_seconds": save_seconds, "load_seconds": load_seconds, "file_gib": path.stat().st_size / 2**30}
    moved, out["to_cpu_pinned_seconds"] = timed(lambda: loaded.to("cpu"))
    del loaded
    _, out["to_gpu_non_blocking_seconds"] = timed(lambda: moved.to(device, non_blocking=True))
    path.unlink()
    print(f"save {save_seconds:.1f} s, load {load_seconds:.1f} s, {out['file_gib']:.1f} GiB", flush=True)
    return out


if __name__ == "__main__":
    main()
