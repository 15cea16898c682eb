"""The default's decode against the paper's lookup and the oracle, on the answer's own queries.

For RULER samples, the context is prefilled and clustered as `SqueezedCache.from_context` does,
and the queries of the question followed by its gold answer are recorded in every layer (teacher
forcing: the queries a generated answer makes). The question's tokens play the input's prefill:
their exact attention pins keys (`selection.pin_keys`, the library's function); the answer's tokens
are decode steps, each read as one selection per KV head at the same budget (keys-only accounting,
as `estimator_recall.py`, whose measures are used: attention mass kept, top-8 keys kept, output
error):
- oracle: the keys of highest exact score;
- centroid (the paper): the lookup alone at the whole budget;
- default: the pinned keys (half of the keys kept) and the lookup for the other half.

    PYTHONPATH=. python3 benchmarks/pinned_recall.py --model smollm2 --tokens 4096 --out $OUT
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from estimator_recall import TASKS, estimate, keys_of, measure, oracle_keys, select_clusters, storage
from hf_squeeze import ruler
from hf_squeeze.config import SqueezeConfig
from hf_squeeze.eval.contexts import ContextCaches
from hf_squeeze.eval.models import load_model
from hf_squeeze.index import build_indices
from hf_squeeze.selection import pin_keys
from needle_lookup import record_queries


def question_weights(q, scale, index):
    """Exact attention of the question's tokens q [H, G, T, D] over the clustered keys, summed over
    the tokens (softmax over the clustered keys and the sinks + window): [1, H, G, Nc]."""
    s = torch.einsum("hgtd,hnd->hgtn", q, index.keys.float()) * scale
    sd = torch.einsum("hgtd,hnd->hgtn", q, index.dense_keys.float()) * scale
    p = torch.softmax(torch.cat([s, sd], -1), -1)[..., : s.shape[-1]]
    return p.sum(2)[None]


PEAKED = 0.5


def peakedness(q, scale, index) -> torch.Tensor:
    """Per KV head, the share of the exact attention over the clustered keys that each query's top-8
    keys hold, averaged over the group's heads and the tokens: [H]. Heads that copy a fact from the
    context (retrieval heads) are peaked; their selections decide an answer."""
    s = torch.einsum("hgtd,hnd->hgtn", q, index.keys.float()) * scale
    p = torch.softmax(s, -1)
    return p.topk(min(8, p.shape[-1]), dim=-1).values.sum(-1).mean((1, 2))


def focus(weights, top: int) -> torch.Tensor:
    """Per KV head, how concentrated the question's attention is: the share of its mass over the
    clustered keys (a key's weight: the largest over the group's query heads) that its `top` keys
    hold. [H] in [0, 1]."""
    per_key = weights[0].amax(1)  # [H, Nc]
    share = per_key / per_key.sum(-1, keepdim=True).clamp_min(1e-30)
    return share.topk(min(max(1, top), share.shape[-1]), dim=-1).values.sum(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--contexts", type=int, default=1, help="contexts per task")
    parser.add_argument("--budgets", default="0.125,0.325")
    parser.add_argument("--pin", type=float, default=0.5, help="share of the kept keys that are pinned")
    parser.add_argument("--adaptive", type=lambda v: [float(x) for x in v.split(",") if x], default=[],
                        help="caps of the adaptive share: each head pins cap x focus of its keys (focus: the share "
                             "of the question's attention its top pin-budget keys hold), the lookup takes the rest")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    config = SqueezeConfig()
    samples = ruler.make_samples(tokenizer, ruler.task_names(args.tasks), args.tokens, args.contexts, 1)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = {}
    for sample in tqdm(samples, desc="samples"):
        context, questions = ruler.prompt_ids(tokenizer, sample)
        answer = tokenizer(" " + sample.questions[0].answers[0], add_special_tokens=False)["input_ids"]
        caches = ContextCaches(model, context, config)
        indices = build_indices(caches.keys, caches.values, config)
        recorded = record_queries(model, tokenizer, caches, context, questions[0] + answer)
        asked = len(questions[0])
        for index, (q, scale, _) in zip(indices, recorded):
            q = q[0].float()
            q_question, q_answer = q[:, :, :asked], q[:, :, asked:]
            weights = question_weights(q_question, scale, index)
            peaked = peakedness(q_answer, scale, index) >= PEAKED
            n, dim = index.keys.shape[1:]
            for budget in budgets:
                keep = budget - storage("centroid", config.centroid_ratio, dim)
                rows.setdefault(("oracle", budget), []).append(
                    (*measure(q_answer, scale, index, oracle_keys(q_answer, scale, index, max(1, round(budget * n)))), peaked))
                score = estimate("centroid", q_answer, index, (None, None, None), scale)
                paper = keys_of(select_clusters(score, index.counts, max(1, round(keep * n))), index)
                rows.setdefault(("centroid (the paper)", budget), []).append((*measure(q_answer, scale, index, paper), peaked))
                total = max(1, round(keep * n))
                pinned = pin_keys(weights, index, max(1, round(args.pin * keep * n))).mask[0].bool()
                looked = keys_of(select_clusters(score, index.counts, max(1, round((1 - args.pin) * keep * n))), index)
                rows.setdefault((f"default (pin {args.pin:g})", budget), []).append(
                    (*measure(q_answer, scale, index, looked | pinned[:, None, :]), peaked))
                concentration = focus(weights, round(args.pin * total))
                for cap in args.adaptive:
                    pins = (cap * total * concentration).round().long().clamp(0, total)  # [H]
                    pinned = pin_keys(weights, index, pins[None]).mask[0].bool()
                    looked = keys_of(select_clusters(score, index.counts, (total - pins).clamp_min(1)[:, None, None]), index)
                    rows.setdefault((f"adaptive (pin <= {cap:g} x focus)", budget), []).append(
                        (*measure(q_answer, scale, index, looked | pinned[:, None, :]), peaked))
    table = []
    for (name, budget), values in rows.items():
        mass, err, top8, peak = (torch.cat([v[i] for v in values]) for i in range(4))
        table.append(dict(estimator=name, budget=budget, mass=float(mass.mean()), top8=float(top8.mean()),
                          error=float(err.mean()), heads=mass.numel(), peaked_heads=int(peak.sum()),
                          peaked_mass=float(mass[peak].mean()), peaked_top8=float(top8[peak].mean()),
                          peaked_error=float(err[peak].mean())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pinned_recall_{args.model}_{args.tokens}.json").write_text(json.dumps(table, indent=1))
    print(f"\n{args.model}, {args.tokens} tokens, {len(samples)} samples; the answer's tokens as decode steps, "
          "per (layer, KV head)")
    print(f"(peaked heads: those whose exact attention over the answer puts >= {PEAKED:g} of its clustered mass on "
          f"its top-8 keys; {table[0]['peaked_heads']} of {table[0]['heads']})")
    print("| selection | budget | mass kept | top-8 keys kept | output error | peaked heads: mass | top-8 | error |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in sorted(table, key=lambda r: (r["budget"], r["estimator"] != "oracle", -r["mass"])):
        print(f"| {r['estimator']} | {r['budget']} | {r['mass']:.3f} | {r['top8']:.3f} | {r['error']:.3f} "
              f"| {r['peaked_mass']:.3f} | {r['peaked_top8']:.3f} | {r['peaked_error']:.3f} |")


if __name__ == "__main__":
    main()
