"""How far apart a real model's centroid scores are, against the kernel benchmarks' synthetic data.

Kernel choices can hang on the range of the scores: a sum of exponentials taken against a fixed
reference instead of a running max works only while no term leaves float32's range, and a search
over the values of log p takes more steps the wider they spread. This measures, for a lookup of
the embedded model (SmolLM2, a document of `--tokens` tokens as the demo's, one of its questions as
the input, keep 0.1, the lookup prefill), in every layer:

- normaliser gap: how far (log2) a query row's largest term N_k 2^(s_k log2 e) lies above the
  largest among the first `--block` centroids (what a prefill normaliser's first block would take
  as its reference);
- prefill log2 mean p: each cluster's probability averaged over the input's tokens (log2; what a
  prefill aggregate sums);
- decode log p: each cluster's log p at a decode step (nats), relative to the head's largest.

The same is computed on `bench_kernels.synthetic_index` with its queries (a centroid plus unit
noise) times each `--query-scales`: bench_kernels.py --query-scale picks one. The queries of the
real model are recorded from the library's own scoring (`selection._score_every`), on the CPU.

    PYTHONPATH=.:benchmarks python3 benchmarks/score_ranges.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from bench_kernels import synthetic_index
from hf_squeeze import selection
from hf_squeeze.assets import load_default_model
from hf_squeeze.cache import SqueezedCache
from hf_squeeze.config import SqueezeConfig
from hf_squeeze.demo import FACTS, chat_prompt_ids, document

LOG2E = 1 / math.log(2)


def ranges(scored, block: int) -> dict:
    """The three measures over recorded lookups: [(q [B, H, G, T, D], centroids [H, M, D], counts [H, M], scaling)]."""
    gaps, mean_p, decode = [], [], []
    for q, centroids, counts, scaling in scored:
        s = torch.einsum("bhgtd,hmd->bhgtm", q.float(), centroids.float()) * scaling
        valid = (counts > 0)[None, :, None, None, :]
        log2n = counts.float().clamp_min(1).log2()[None, :, None, None, :]
        w = (s * LOG2E + log2n).masked_fill(~valid, -math.inf)  # log2 N_k 2^(s_k log2 e)
        norm = torch.logsumexp(w / LOG2E, -1, keepdim=True) * LOG2E
        if q.shape[3] > 1:  # a prefill
            gaps.append((w.amax(-1) - w[..., :block].amax(-1)).flatten())
            terms = w - log2n - norm - math.log2(q.shape[3])  # log2 of a token's weight times its p
            p = torch.logsumexp(terms / LOG2E, 3) * LOG2E  # [B, H, G, M]
            mean_p.append(p[valid[:, :, :, 0].expand_as(p)])
        else:
            logp = ((w - log2n - norm) / LOG2E).amax(2)[:, :, 0]  # nats, max over the group: [B, H, M]
            rel = logp - logp.amax(-1, keepdim=True)
            decode.append(rel[valid[:, :, 0, 0].expand_as(rel)])
    out = {}
    for name, parts, qs in (("normaliser gap (log2)", gaps, (0.5, 0.99, 1.0)),
                            ("prefill log2 mean p", mean_p, (0.0, 0.01, 0.5)),
                            ("decode log p below the largest (nats)", decode, (0.0, 0.01, 0.5))):
        if parts:
            x = torch.cat(parts)
            out[name] = {f"q{q:g}": float(x.quantile(q)) if x.numel() < 2**24 else float(x.sort().values[int(q * (x.numel() - 1))])
                         for q in qs}
            out[name]["values"] = x
    return out


def real_model(tokens: int) -> list:
    model, tokenizer = load_default_model()
    text = document(tokenizer, tokens)
    context, _ = chat_prompt_ids(tokenizer, text, "")
    cache = SqueezedCache.from_context(model, context, SqueezeConfig(keep=0.1, prefill="lookup", pin=0))
    recorded, original = [], selection._score_every

    def spy(q, centroids, counts, scaling, q_weight):
        recorded.append((q.detach().clone(), centroids, counts, scaling))
        return original(q, centroids, counts, scaling, q_weight)

    _, user = chat_prompt_ids(tokenizer, text, FACTS[1].question)
    selection._score_every = spy
    try:
        model.generate(torch.cat([context, user])[None], past_key_values=cache.fork(), max_new_tokens=4,
                       do_sample=False)
    finally:
        selection._score_every = original
    return recorded


def synthetic(context: int, scale: float, tokens: int, group: int = 4, heads: int = 2, dim: int = 128) -> list:
    """bench_kernels.py's index and queries (run_case), the queries times `scale`."""
    index = synthetic_index(context, heads, dim, 0.05, 4, 100, torch.float32, "cpu")
    g = torch.Generator().manual_seed(1)
    recorded = []
    for t in (tokens, 1):
        centre = index.centroids[:, torch.randint(index.centroids.shape[1], (group * t,), generator=g)]
        q = (centre.view(heads, group, t, dim) + torch.randn(heads, group, t, dim, generator=g)) * scale
        recorded.append((q[None], index.centroids, index.counts, dim**-0.5))
    return recorded


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=6000, help="the real model's document")
    p.add_argument("--synthetic-context", type=int, default=16384)
    p.add_argument("--query-scales", type=float, nargs="+", default=[1.0, 0.3, 0.15, 0.1])
    p.add_argument("--block", type=int, default=64, help="centroids in a normaliser's first block")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    rows = {"SmolLM2 (real)": ranges(real_model(args.tokens), args.block)}
    for scale in args.query_scales:
        rows[f"synthetic, query scale {scale:g}"] = ranges(synthetic(args.synthetic_context, scale, 256), args.block)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list(next(iter(rows.values())))
    print(f"\nnormaliser gap over the first {args.block} centroids; quantiles 50% / 99% / max; "
          "the others 0% (min) / 1% / 50%")
    print("| data | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for data, measures in rows.items():
        cells = [" / ".join(f"{v:.1f}" for k, v in measures[n].items() if k != "values") for n in names]
        print(f"| {data} | " + " | ".join(cells) + " |")
    (out / "score_ranges.json").write_text(json.dumps(
        {d: {n: {k: v for k, v in m.items() if k != "values"} for n, m in ms.items()} for d, ms in rows.items()},
        indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.6))
    for ax, name in zip(axes, names):
        for data, measures in rows.items():
            ax.hist(measures[name]["values"].numpy(), bins=80, histtype="step", density=True, label=data)
        ax.set_title(name, fontsize=9)
        ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "score_ranges.png", dpi=110)
    print(f"wrote {out / 'score_ranges.json'}, {out / 'score_ranges.png'}")


if __name__ == "__main__":
    main()
