"""K-means quality on real keys: hf_squeeze's K-means against scikit-learn's, same K, same iterations.

    PYTHONPATH=. python3 benchmarks/kmeans_quality.py [--tokens 8000] [--out results/]

Keys: SmolLM2-135M-Instruct (30 layers x 3 KV heads x head_dim 64, float32) over the first
`--tokens` tokens of Paul Graham's essays (8,000 is about its whole 8K context), sinks and observation
window excluded as when indexing. Both sides cluster the L2-normalised keys of every head into 5% as
many clusters, 20 Lloyd iterations; scikit-learn is KMeans(init="k-means++", n_init=1, max_iter=20),
whose seeding is greedy k-means++. The objective is the sum over keys of (1 - cosine to the
normalised mean of its cluster). Runs on the CPU (the GPU path is compared at 128K tokens in
offline_index.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from hf_squeeze import SqueezeConfig, load_default_model
from hf_squeeze.context import prefill_context
from hf_squeeze.clustering import cosine_objective, kmeans
from hf_squeeze.assets import essays_text


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, tokenizer = load_default_model()
    ids = torch.tensor(tokenizer(essays_text()[: args.tokens * 8])["input_ids"][: args.tokens])
    config = SqueezeConfig()
    with torch.no_grad():
        keys, *_ = prefill_context(model, ids, config, progress=True)
    points = torch.cat(keys)[:, config.sinks : -config.window].float()  # [layers x heads, N, D]
    k = config.num_clusters(points.shape[1])
    rows = {}
    for seed in range(args.seeds):
        start = time.perf_counter()
        ours = cosine_objective(points, kmeans(points, k, args.iters, seed=seed), k).numpy()
        ours_s = time.perf_counter() - start
        start = time.perf_counter()
        ref = []
        for h in range(points.shape[0]):
            x = F.normalize(points[h], dim=-1).numpy().astype(np.float64)
            labels = KMeans(k, init="k-means++", n_init=1, max_iter=args.iters, random_state=seed).fit(x).labels_
            ref.append(float(cosine_objective(points[h : h + 1], torch.as_tensor(labels)[None], k)))
        ref = np.array(ref)
        ref_s = time.perf_counter() - start
        rows[seed] = {
            "ours": float(ours.sum()), "sklearn": float(ref.sum()), "ratio": float(ours.sum() / ref.sum()),
            "worst_head_ratio": float((ours / ref).max()), "best_head_ratio": float((ours / ref).min()),
            "ours_seconds_cpu": ours_s, "sklearn_seconds_cpu": ref_s,
        }
    result = {"tokens": ids.numel(), "heads": points.shape[0], "clustered_keys_per_head": points.shape[1],
              "clusters_per_head": k, "iters": args.iters, "threads": torch.get_num_threads(), "seeds": rows}
    print("| seed | ours (sum of cosine distances) | scikit-learn | ratio | worst head | best head |")
    print("| --- | --- | --- | --- | --- | --- |")
    for seed, r in rows.items():
        print(f"| {seed} | {r['ours']:.1f} | {r['sklearn']:.1f} | {r['ratio']:.4f} | {r['worst_head_ratio']:.4f} "
              f"| {r['best_head_ratio']:.4f} |")
    print(f"{result['heads']} heads x {result['clustered_keys_per_head']} keys, K = {k}, {args.iters} iterations")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kmeans_quality.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
