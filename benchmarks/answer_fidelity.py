"""Does a method give full attention's answer? Teacher-forced on full attention's own answer.

For RULER samples, full attention answers each question greedily (up to `--new-tokens` or the end
of sequence). Every other method then reads the same question and is fed full attention's answer
token by token, as its decode steps: at each step its next-token distribution is compared with full
attention's. Per method, averaged over the questions:
- agree: the share of answer tokens whose argmax is full attention's token;
- kept: the share of answers whose every token agrees (greedy decoding would give full attention's
  answer, the thing RULER's gap counts);
- KL: the mean KL divergence (nats per token) of the method's distribution from full attention's.

Unlike the attention mass of `estimator_recall.py` and `pinned_recall.py` (a per-head average, which
did not predict RULER), this runs the whole model: a step counts only where the selections of every
layer and head together change the next token. It costs one answer per method and question, and
runs on the CPU (the torch path, float32), or on a GPU as users run it (`--device cuda --dtype
bfloat16 --attention kernels`).

    PYTHONPATH=.:benchmarks python3 benchmarks/answer_fidelity.py --model smollm2 --tokens 4096 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hf_squeeze import cache_kwargs, ruler
from hf_squeeze.eval.contexts import ContextCaches
from hf_squeeze.eval.methods import parse_methods
from hf_squeeze.eval.models import load_model
from hf_squeeze.eval.runner import read_samples

METHODS = ("full,flat-topk-0.1,flat-topk+exact-0.1,flat-topk+exact+pin0.25-0.1,flat-topk+exact+pin0.5-0.1,"
           "flat-topk+exact+pin0.75-0.1,quest@0.125,oracle@0.125")


@torch.no_grad()
def step_logits(model, cache, question: list[int], answer: list[int]) -> torch.Tensor:
    """Next-token log-probabilities [len(answer), V] after the question and each answer token before."""
    fork = cache.fork()
    device = model.device
    out = [model(torch.tensor([question], device=device), **cache_kwargs(model, fork)).logits[0, -1]]
    for token in answer[:-1]:
        out.append(model(torch.tensor([[token]], device=device), **cache_kwargs(model, fork)).logits[0, -1])
    return torch.stack(out).float().log_softmax(-1)


@torch.no_grad()
def greedy(model, cache, question: list[int], new_tokens: int, stop: set[int]) -> tuple[list[int], torch.Tensor]:
    """Full attention's greedy answer, and its next-token log-probabilities along it (`step_logits`'s)."""
    fork = cache.fork()
    device = model.device
    logits = [model(torch.tensor([question], device=device), **cache_kwargs(model, fork)).logits[0, -1]]
    tokens = []
    for _ in range(new_tokens):
        token = int(logits[-1].argmax())
        tokens.append(token)
        if token in stop or len(tokens) == new_tokens:
            break
        logits.append(model(torch.tensor([[token]], device=device), **cache_kwargs(model, fork)).logits[0, -1])
    return tokens, torch.stack(logits).float().log_softmax(-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--model-file", help="an assembled GGUF (qwen2.5-coder-0.5b)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--tasks", default="all")
    parser.add_argument("--run", help="take the samples of a prepared run folder (a machine without RULER's haystacks)")
    parser.add_argument("--contexts", type=int, default=1, help="contexts per task")
    parser.add_argument("--questions", type=int, default=1, help="questions per context")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", choices=["reference", "kernels"], default="reference",
                        help="kernels: full attention and the squeezed methods through the Triton kernels (a GPU)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, model_file=args.model_file, dtype=getattr(torch, args.dtype),
                                  device=args.device)
    methods = parse_methods(args.methods)
    if methods[0].family != "full":
        raise SystemExit("list full attention first: the others are compared with it")
    eos = model.generation_config.eos_token_id
    stop = {t for t in [*(eos if isinstance(eos, list) else [eos]), tokenizer.eos_token_id] if t is not None}
    if args.run:  # a prepared run folder (`hf-squeeze eval --prepare-only`): its samples, first contexts per task
        per_task, tasks = {}, set(ruler.task_names(args.tasks))
        for sample in read_samples(Path(args.run))[1]:
            if sample.task in tasks and len(per_task.setdefault(sample.task, [])) < args.contexts:
                per_task[sample.task].append(dataclasses.replace(sample, questions=sample.questions[: args.questions]))
        samples = [s for task in sorted(per_task) for s in per_task[task]]
    else:
        samples = ruler.make_samples(tokenizer, ruler.task_names(args.tasks), args.tokens, args.contexts, args.questions)
    rows = []  # one per (question, method)
    for sample in tqdm(samples, desc="contexts"):
        context, questions = ruler.prompt_ids(tokenizer, sample)
        caches = ContextCaches(model, context)
        built = {m.name: caches.cache([m], kernels=args.attention == "kernels") for m in methods}
        for q_index, question in enumerate(questions):
            answer, want = greedy(model, built["full"], question, args.new_tokens, stop)
            for method in methods[1:]:
                got = step_logits(model, built[method.name], question, answer)
                agree = (got.argmax(-1) == torch.tensor(answer)).float()
                kl = (want.exp() * (want - got)).sum(-1)
                rows.append(dict(task=sample.task, sample=sample.id, question=q_index, method=method.name,
                                 budget=method.budget, tokens=len(answer), agree=float(agree.mean()),
                                 kept=bool(agree.all()), kl=float(kl.mean())))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"answer_fidelity_{Path(args.model).name}_{args.tokens}.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{args.model}, {args.tokens} tokens, {len(samples)} contexts, {len(rows) // (len(methods) - 1)} answers "
          "(teacher-forced on full attention's greedy answer)")
    print("| method | budget | agree | kept | KL nats/token |\n|---|---|---|---|---|")
    for method in methods[1:]:
        mine = [r for r in rows if r["method"] == method.name]
        mean = lambda key: sum(float(r[key]) for r in mine) / len(mine)  # noqa: E731
        print(f"| {method.name} | {method.budget:g} | {mean('agree'):.3f} | {mean('kept'):.3f} | {mean('kl'):.4f} |")
    tasks = sorted({r["task"] for r in rows})
    print("\nkept per task:\n| method | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for method in methods[1:]:
        cells = []
        for task in tasks:
            mine = [r["kept"] for r in rows if r["method"] == method.name and r["task"] == task]
            cells.append(f"{sum(mine)}/{len(mine)}")
        print(f"| {method.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
