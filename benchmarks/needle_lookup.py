"""Where the centroid lookup loses a needle: squeezed selection against exact scores, per layer and head.

    PYTHONPATH=. python3 benchmarks/needle_lookup.py --samples RUN_FOLDER --ids niah_single_2/0 [--keep 0.5]
    PYTHONPATH=. python3 benchmarks/needle_lookup.py --task niah_single_2 --length 4096 --index 0

A sample comes from a run folder of `hf-squeeze eval` (its `samples.jsonl`) or is built like the
evaluation builds it; the model is SmolLM2-135M-Instruct on the CPU. For the first question of each
sample the script prints:

1. Answers (greedy) when the clustered context is read by: every key ("full"); flat top-k squeezed
   attention at `--keep` in every step; the same only for the question's prefill (decode reads every
   key), or only for decode; the oracle's exact top-k at `--oracle-keep`; and, for the question's
   prefill, the keys that both select, or either. Which of these answer tells in which step, and
   whether for want of the oracle's keys, the needle is lost.
2. Per layer, over its KV heads, the share of the oracle's keys that squeezed attention also reads
   (recall) and the share of the exact attention probability of the clustered keys that each reads,
   for the selection made for the question's prefill (probabilities averaged over the question's
   tokens, max over the query heads of a KV head, as both methods select).
3. The oracle's keys that squeezed attention misses, heaviest first: the context token, the question
   token and query head that score it highest, that score s(key) and the score of its cluster's
   centroid s(C) for the same query, and how well the key fits its cluster (cosine to the centroid).

Writes `needle_lookup.json` and `needle_lookup.png` (recall per layer) under `--out`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hf_squeeze import load_default_model
from hf_squeeze.context import FixedContext
from hf_squeeze import ruler
from hf_squeeze.eval import runner
from hf_squeeze.eval.baselines import EvalAttention, EvalCache
from hf_squeeze.eval.contexts import ContextCaches
from hf_squeeze.eval.methods import Method
from hf_squeeze.selection import Selection, SelectionRule, score_flat, select


def key_view(index):
    """The index with every clustered key its own cluster (same key order): exact scores, as the oracle."""
    heads, count, _ = index.keys.shape
    return type(index)(
        keys=index.keys, values=index.values, centroids=index.keys.float(),
        counts=torch.ones(heads, count, dtype=torch.long), offsets=torch.arange(count + 1).expand(heads, -1),
        dense_keys=index.dense_keys, dense_values=index.dense_values,
    )


def per_key(index, keep: torch.Tensor) -> torch.Tensor:
    """Cluster selection [B, H, C] -> key selection [B, H, Nc] in the index's (cluster-sorted) key order."""
    sizes = index.counts[None].expand_as(keep)
    cluster_of_key = torch.repeat_interleave(torch.arange(keep.shape[-1]).expand_as(sizes).flatten(), sizes.flatten())
    return keep.flatten(0, 1).gather(1, cluster_of_key.view(keep.shape[0] * keep.shape[1], -1)).view(*keep.shape[:2], -1)


class Rules:
    """Key selections by name, for one layer: squeezed top-k, the oracle's top-k, and their set algebra."""

    def __init__(self, index, keep: float, oracle_keep: float):
        self.index, self.exact = index, key_view(index)
        count = index.clustered_tokens
        self.budget, self.oracle_budget = max(1, round(keep * count)), max(1, round(oracle_keep * count))

    def masks(self, q, scaling, q_weight):
        cand, _ = score_flat(q, self.index, scaling, q_weight)
        squeezed = per_key(self.index, select(cand.logp, cand.counts, None, self.budget))
        exact, _ = score_flat(q, self.exact, scaling, q_weight)
        oracle = select(exact.logp, exact.counts, None, self.oracle_budget)
        return squeezed, oracle, exact.logp

    def selection(self, name: str, q, scaling, q_weight) -> Selection:
        prefill = q.shape[3] > 1
        squeezed, oracle, _ = self.masks(q, scaling, q_weight)
        everything = torch.ones_like(squeezed)
        chosen = {
            "squeezed": squeezed,
            "squeezed-prefill-only": squeezed if prefill else everything,
            "squeezed-decode-only": everything if prefill else squeezed,
            "oracle": oracle,
            "both (prefill)": squeezed & oracle if prefill else everything,
            "either (prefill)": squeezed | oracle if prefill else everything,
        }[name]
        starts = self.exact.offsets[:, :-1][None].expand_as(chosen)
        return Selection(starts, chosen.long(), torch.zeros(q.shape[:2]))


def answer(model, tokenizer, caches, flat, rules, name, context, question, max_new):
    fixed = FixedContext(tuple(key_view(ix) for ix in flat), (SelectionRule(exact=True),) * len(flat),
                         caches.base, caches.ids, caches.fingerprint)
    if name == "full":
        policy = lambda layer, q, scaling, q_weight: Selection(  # noqa: E731
            layer.index.offsets[:, :-1][None].expand(q.shape[0], -1, -1),
            layer.index.counts[None].expand(q.shape[0], -1, -1), torch.zeros(q.shape[:2]))
    else:
        policy = lambda layer, q, scaling, q_weight: layer.rules.selection(name, q, scaling, q_weight)  # noqa: E731
    cache = EvalCache(fixed, policy)
    for layer, layer_rules in zip(cache.layers, rules):
        layer.attention.rules = layer_rules
    texts, _ = runner.answer_questions(model, tokenizer, context, [question], cache, max_new)
    return ruler.postprocess(texts[0])


def record_queries(model, tokenizer, caches, context, question):
    """The queries [1, H, G, T, D] of the question's prefill in every layer (a full-attention pass)."""
    seen = {}
    original = EvalAttention.select_ranges

    def spy(layer, q, scaling, q_weight):
        seen.setdefault(id(layer), (q.clone(), scaling, q_weight))
        return original(layer, q, scaling, q_weight)

    cache = caches.cache([Method("full")]).fork()
    EvalAttention.select_ranges = spy
    try:
        runner.answer_questions(model, tokenizer, context, [question], cache, 1)
    finally:
        EvalAttention.select_ranges = original
    return [seen[id(layer.attention)] for layer in cache.layers]


def context_positions(keys: torch.Tensor, index_keys: torch.Tensor, start: int) -> torch.Tensor:
    """Context position of every cluster-sorted key of one head (keys are distinct: RoPE)."""
    where = {bytes(row.numpy().tobytes()): i for i, row in enumerate(keys)}
    return torch.tensor([start + where[bytes(row.numpy().tobytes())] for row in index_keys])


def analyse(sample, model, tokenizer, keep, oracle_keep, max_new, top):
    context, questions = ruler.prompt_ids(tokenizer, sample)
    question = questions[0]
    caches = ContextCaches(model, context)
    flat = caches._squeezed(False)
    config = caches.base
    rules = [Rules(ix, keep, oracle_keep) for ix in flat]
    names = ["full", "squeezed", "squeezed-prefill-only", "squeezed-decode-only", "oracle", "both (prefill)",
             "either (prefill)"]
    answers = {}
    for name in names:
        answers[name] = answer(model, tokenizer, caches, flat, rules, name, context, question, max_new)
        print(f"  {name:24s} {answers[name][:40]!r}", flush=True)

    queries = record_queries(model, tokenizer, caches, context, question)
    layers, missed = [], []
    for number, (ix, layer_rules, (q, scaling, q_weight)) in enumerate(zip(flat, rules, queries)):
        squeezed, oracle, logp = (m[0] for m in layer_rules.masks(q, scaling, q_weight))
        p = logp.exp()
        recall = (squeezed & oracle).sum(-1) / oracle.sum(-1)
        layers.append(dict(
            layer=number,
            recall=recall.tolist(),
            squeezed_mass=((p * squeezed).sum(-1) / p.sum(-1)).tolist(),
            oracle_mass=((p * oracle).sum(-1) / p.sum(-1)).tolist(),
        ))
        for head, key in (oracle & ~squeezed).nonzero().tolist():
            missed.append((float(p[head, key] / p[head].sum()), number, head, key))
    missed.sort(reverse=True)
    rows = []
    for share, number, head, key in missed[:top]:
        ix = flat[number]
        q, scaling, _ = queries[number]
        cluster = int(torch.searchsorted(ix.offsets[head], key, right=True)) - 1
        centroid = ix.centroids[head, cluster]
        k = ix.keys[head, key].float()
        s_key = torch.einsum("gtd,d->gt", q[0, head], k) * scaling
        s_centroid = torch.einsum("gtd,d->gt", q[0, head], centroid) * scaling
        g, t = divmod(int(s_key.argmax()), s_key.shape[1])
        positions = context_positions(caches.keys[number][head, config.sinks : caches.num_tokens - config.window],
                                      ix.keys[head, key : key + 1], config.sinks)
        position = int(positions[0])
        rows.append(dict(
            layer=number, head=head, share=share, position=position,
            token=tokenizer.decode([context[position]]), query_head=g, query_token=tokenizer.decode([question[t]]),
            s_key=float(s_key[g, t]), s_centroid=float(s_centroid[g, t]),
            cosine=float(F.cosine_similarity(k, centroid, dim=0)), cluster_size=int(ix.counts[head, cluster]),
        ))
    return dict(sample=sample.id, keep=keep, oracle_keep=oracle_keep, answers=answers,
                expected=sample.questions[0].answers, layers=layers, missed=rows)


def print_report(result):
    print(f"\n{result['sample']}: recall of the oracle's top {result['oracle_keep']:g} by squeezed top-k "
          f"{result['keep']:g} (question prefill), per layer over its KV heads")
    print("| layer | recall min | recall mean | exact mass read: squeezed | oracle |")
    print("| --- | --- | --- | --- | --- |")
    for row in result["layers"]:
        recall = row["recall"]
        print(f"| {row['layer']} | {min(recall):.3f} | {sum(recall) / len(recall):.3f} | "
              f"{sum(row['squeezed_mass']) / len(recall):.3f} | {sum(row['oracle_mass']) / len(recall):.3f} |")
    print("\nheaviest oracle keys that squeezed attention misses")
    print("| layer/head | exact share | context token (pos) | question token (q head) | s(key) | s(centroid) | cos(key, C) | cluster keys |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in result["missed"]:
        print(f"| {r['layer']}/{r['head']} | {r['share']:.3f} | {r['token']!r} ({r['position']}) | "
              f"{r['query_token']!r} ({r['query_head']}) | {r['s_key']:.1f} | {r['s_centroid']:.1f} | "
              f"{r['cosine']:.2f} | {r['cluster_size']} |")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for result in results:
        ax.plot([r["layer"] for r in result["layers"]], [min(r["recall"]) for r in result["layers"]],
                marker="o", label=result["sample"])
    ax.set_xlabel("layer")
    ax.set_ylabel("recall of the oracle's keys\n(worst KV head of the layer)")
    ax.set_title(f"squeezed top-k {results[0]['keep']:g} vs oracle top-k {results[0]['oracle_keep']:g}, question prefill")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=Path, help="a run folder of `hf-squeeze eval` (samples.jsonl)")
    parser.add_argument("--ids", default="niah_single_2/0", help="comma-separated sample ids of that folder")
    parser.add_argument("--task", help="build a sample of this RULER task instead")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--oracle-keep", type=float, default=0.075)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_default_model()
    if args.task:
        samples = [s for s in ruler.make_samples(tokenizer, [args.task], args.length, args.index + 1, progress=False)
                   if s.id == f"{args.task}/{args.index}"]
    else:
        if args.samples is None:
            parser.error("give --samples RUN_FOLDER (with --ids) or --task")
        _, pool = runner.read_samples(args.samples)
        wanted = args.ids.split(",")
        samples = [s for s in pool if s.id in wanted]
        if len(samples) != len(wanted):
            parser.error(f"{args.samples} has no sample {sorted(set(wanted) - {s.id for s in samples})}")
    results = []
    for sample in samples:
        start = time.perf_counter()
        print(f"{sample.id}: expected {sample.questions[0].answers}")
        with torch.no_grad():
            results.append(analyse(sample, model, tokenizer, args.keep, args.oracle_keep, args.max_new_tokens, args.top))
        print_report(results[-1])
        print(f"({time.perf_counter() - start:.0f} s)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "needle_lookup.json").write_text(json.dumps(results, indent=1))
    plot(results, args.out / "needle_lookup.png")


if __name__ == "__main__":
    main()
