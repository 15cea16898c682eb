"""Draw the offline-index results: time per KV head (GPU vs scikit-learn) and build times.

    python3 benchmarks/plot_offline_index.py benchmarks/results/offline_index_h100.json benchmarks/results/offline_index_h100.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src, dst):
    r = json.loads(open(src).read())
    heads = 32 * 8
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    per_head = {
        "scikit-learn KMeans\n(CPU, 15 threads)": r["sklearn_seconds_one_head"],
        "hf_squeeze\n(H100, all 256 heads\nbatched, per head)": r["build_128k_seconds"] / heads,
    }
    bars = left.bar(list(per_head), list(per_head.values()), color=["#999999", "#2a7ab9"])
    left.set_yscale("log")
    left.set_ylabel("seconds per KV head (log)")
    left.set_title(f"K-means of one KV head, 128K tokens, K={r['clusters_per_head']}, 20 iterations\n"
                   f"objective (sum of cosine distances) ours / sklearn: {r['objective_ratio_ours_over_sklearn']:.4f}",
                   fontsize=9)
    left.set_ylim(top=max(per_head.values()) * 8)
    for bar, value in zip(bars, per_head.values()):
        left.annotate(f"{value:.3g} s", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    builds = {
        "128K tokens,\n32 layers": r["build_128k_seconds"],
        f"1M tokens,\n{r['build_1m_layers']} layers\n(measured)": r["build_1m_seconds"],
        "1M tokens,\n32 layers\n(extrapolated)": r["build_1m_seconds_per_layer"] * 32,
    }
    bars = right.bar(list(builds), list(builds.values()), color=["#2a7ab9", "#2a7ab9", "#bbbbbb"])
    right.axhline(10, color="red", linestyle="--", linewidth=1)
    right.text(2.45, 10, "10 s target (128K)", color="red", ha="right", va="bottom", fontsize=8)
    right.set_yscale("log")
    right.set_ylim(top=max(builds.values()) * 3)
    right.set_ylabel("seconds (log)")
    right.set_title("Whole offline index on an H100 (8 KV heads x 128, bf16)", fontsize=9)
    for bar, value in zip(bars, builds.values()):
        right.annotate(f"{value:.1f} s", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(dst, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
