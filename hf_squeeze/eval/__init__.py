"""Accuracy of squeezed attention on RULER, against full attention and baselines at equal KV budget.

    from hf_squeeze.eval import run_eval
    run_eval("runs/smollm2-4k", model="smollm2", max_seq_length=4096, tasks="all", contexts_per_task=10)

or `hf-squeeze eval --out runs/smollm2-4k --model smollm2 --length 4096`. See EVAL.md for the
measured results and the exact commands.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import torch

from .. import ruler
from .methods import Method, default_methods, parse_methods
from .report import write_report
from .runner import MAX_THREADS, RunSpec, answer_in_threads, read_results, read_samples, shared_claim, write_samples

# Generation caps per task family. RULER's lengths except NIAH (128): every NIAH answer here, four
# 7-digit values or one UUID with the answer prefix already given, fits in 64 tokens, and a model
# that rambles would otherwise hold its whole batch for 128 steps.
MAX_NEW_TOKENS = {"niah": 64}


def _interleave(samples: list[ruler.Sample]) -> list[ruler.Sample]:
    """Round-robin over tasks, so that a run stopped early has the same number of contexts per task."""
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    out = []
    for i in range(max(len(v) for v in by_task.values())):
        out += [v[i] for v in by_task.values() if i < len(v)]
    return out


def prepare(folder, tokenizer, *, model: str, max_seq_length: int, tasks="all", contexts_per_task: int = 10,
            questions_per_context: int = 4, methods=None, max_new_tokens: dict | None = None, seed: int = 42,
            progress: bool = True, dtype=torch.float32, attention: str = "reference") -> tuple[RunSpec, list[ruler.Sample]]:
    """Create a run folder (its samples built once) or reopen one, checking it asks the same thing."""
    folder = Path(folder)
    methods = methods if isinstance(methods, list) else parse_methods(methods)
    caps = dict(MAX_NEW_TOKENS)
    caps.update(max_new_tokens or {})
    spec = RunSpec(model=model, max_seq_length=max_seq_length, tasks=ruler.task_names(tasks),
                   contexts_per_task=contexts_per_task, questions_per_context=questions_per_context,
                   methods=[m.name for m in methods], max_new_tokens=caps, seed=seed,
                   dtype=str(dtype).removeprefix("torch."), attention=attention)
    if (folder / "run.json").is_file() and (folder / "samples.jsonl").is_file():
        old, samples = read_samples(folder)
        differ = [k for k in ("model", "max_seq_length", "tasks", "contexts_per_task", "questions_per_context",
                              "max_new_tokens", "seed", "dtype", "attention") if getattr(old, k) != getattr(spec, k)]
        if differ:
            raise ValueError(
                f"{folder} holds a run with other settings ({', '.join(f'{k}: {getattr(old, k)!r}' for k in differ)}); "
                "resume it with the same settings or use another --out folder"
            )
        spec.methods = list(dict.fromkeys(old.methods + spec.methods))
        write_samples(folder, spec, samples)
        return spec, samples
    samples = ruler.make_samples(tokenizer, spec.tasks, max_seq_length, contexts_per_task, questions_per_context,
                                 seed=seed, progress=progress)
    write_samples(folder, spec, _interleave(samples))
    return spec, _interleave(samples)


def enough_questions(samples: list[ruler.Sample], questions_per_task: int | None) -> list[ruler.Sample]:
    """The run's samples in order, each task's only until they hold `questions_per_task` questions.

    A task that asks several questions per context reaches the count with fewer contexts (four
    questions per context: 13 contexts give 52), so a run aiming at N questions per task answers no
    more contexts than it needs. None: every sample. Deterministic, so a resumed run picks the same.
    """
    if questions_per_task is None:
        return samples
    if questions_per_task < 1:
        raise ValueError(f"questions_per_task={questions_per_task} must be >= 1 (or None for every sample)")
    held, picked = {}, []
    for s in samples:
        if held.get(s.task, 0) < questions_per_task:
            picked.append(s)
            held[s.task] = held.get(s.task, 0) + len(s.questions)
    return picked


def _worker(rank, workers, folder, samples, methods, spec, device, counter, time_limit, progress, model, tokenizer,
            decode, threads):
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // workers))
    model = model.to(device)

    def claim():
        with counter.get_lock():
            i = counter.value
            counter.value += 1
        return i if i < len(samples) else None

    answer_in_threads(model, tokenizer, folder, samples, methods, spec, claim=claim, worker=f"{os.getpid()}",
                      threads=threads, time_limit=time_limit, progress=progress, decode=decode)


def check_threads(threads: int, decode: str) -> None:
    """`run_eval`'s `threads` against its `decode` (the CLI checks them before loading a model)."""
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads={threads} must be 1 ... {MAX_THREADS}: torch hands out {MAX_THREADS} CUDA streams "
                         "per device, and threads sharing a stream would wait for each other's graphs")
    if threads > 1 and decode == "compiled":
        raise ValueError("threads > 1 with decode='compiled': torch.compile does not compile from several threads "
                         "at once; use decode='greedy' (CUDA graphs) with threads, or one thread")


def run_eval(folder, *, model: str = "smollm2", model_file: str | None = None, max_seq_length: int = 4096,
             tasks="all", contexts_per_task: int = 10, questions_per_context: int = 4, methods=None,
             max_new_tokens: dict | None = None, device: str = "cpu", dtype=torch.float32, workers: int = 1,
             time_limit: float | None = None, seed: int = 42, progress: bool = True, loaded=None,
             attention: str = "reference", decode: str = "generate", questions_per_task: int | None = None,
             threads: int = 1) -> dict:
    """Run (or resume) an evaluation in `folder` and write its report; returns the report's summary.

    workers > 1 forks that many processes after loading the model once on the CPU; each moves it to
    `device` and takes contexts from a shared counter (the torch path is bound by kernel launches,
    so one GPU serves several processes). `loaded`: an already loaded (model, tokenizer). `decode`:
    "generate" (model.generate, methods sharing an index batched) or "greedy" (`generate_greedy` per
    answer: CUDA graphs on a GPU; see `runner.evaluate_sample`). `questions_per_task`: answer each
    task's contexts in order only until they hold that many questions (`enough_questions`).
    `threads`: per process, threads answering side by side, each on its own CUDA stream
    (`runner.answer_in_threads`).
    """
    from .models import load_model

    folder = Path(folder)
    check_threads(threads, decode)  # before a model loads
    methods = methods if isinstance(methods, list) else parse_methods(methods)
    if loaded is None:
        model_obj, tokenizer = load_model(model, model_file=model_file, dtype=dtype)
    else:
        model_obj, tokenizer = loaded
    spec, samples = prepare(folder, tokenizer, model=model, max_seq_length=max_seq_length,
                            tasks=tasks, contexts_per_task=contexts_per_task, questions_per_context=questions_per_context,
                            methods=methods, max_new_tokens=max_new_tokens, seed=seed, progress=progress, dtype=dtype,
                            attention=attention)
    samples = enough_questions(samples, questions_per_task)
    if workers <= 1:
        answer_in_threads(model_obj.to(device), tokenizer, folder, samples, methods, spec,
                          claim=shared_claim(len(samples)), worker="0", threads=threads, time_limit=time_limit,
                          progress=progress, decode=decode)
    else:
        context = multiprocessing.get_context("fork")
        counter = context.Value("i", 0)
        procs = [
            context.Process(target=_worker, args=(rank, workers, folder, samples, methods, spec, device, counter,
                                                  time_limit, progress, model_obj, tokenizer, decode, threads))
            for rank in range(workers)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} of {workers} eval workers failed (exit codes {failed}); "
                               "finished answers are saved: run the same command again to resume")
    return write_report([folder], folder)


__all__ = [
    "Method",
    "RunSpec",
    "default_methods",
    "enough_questions",
    "parse_methods",
    "prepare",
    "read_results",
    "run_eval",
    "ruler",
    "write_report",
]
