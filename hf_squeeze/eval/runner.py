"""The evaluation loop: per fixed context, one prefill, then every method answers every question.

A run lives in one folder:
- `run.json`: what was asked (model, length, tasks, sizes, methods, generation caps);
- `samples.jsonl`: the RULER samples, built once (so a resumed run, or a run on another machine,
  answers exactly the same questions);
- `results-*.jsonl`: one line per (sample, method) with every question's prediction and score,
  flushed and fsynced as soon as it is known. A crash loses at most the (sample, method) being
  answered; restarting with the same folder skips what is done. Several worker processes (one GPU,
  many CPU cores: the torch path is launch-bound) each append to their own file.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..generation import generate_greedy
from ..integrations.generate import cache_kwargs
from .. import ruler
from .contexts import KERNEL_FAMILIES, ContextCaches, group_key
from .methods import Method

RUN_FILE = "run.json"
SAMPLES_FILE = "samples.jsonl"


@dataclass
class RunSpec:
    model: str
    max_seq_length: int
    tasks: list[str]
    contexts_per_task: int
    questions_per_context: int
    methods: list[str]
    max_new_tokens: dict[str, int]  # per task family; RULER's lengths unless capped
    seed: int = 42
    dtype: str = "float32"  # of the model's weights and activations
    # "reference": every method on the torch path, methods sharing an index batched together;
    # "kernels": each squeezed method (and full attention) in its own batch through the Triton kernels
    # (what users run).
    attention: str = "reference"


def write_samples(folder: Path, spec: RunSpec, samples: list[ruler.Sample]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (SAMPLES_FILE + ".tmp")
    tmp.write_text("".join(s.to_json() + "\n" for s in samples))
    tmp.replace(folder / SAMPLES_FILE)
    (folder / RUN_FILE).write_text(json.dumps(asdict(spec), indent=1))


def read_samples(folder: Path) -> tuple[RunSpec, list[ruler.Sample]]:
    spec = RunSpec(**json.loads((folder / RUN_FILE).read_text()))
    lines = (folder / SAMPLES_FILE).read_text().splitlines()
    return spec, [ruler.Sample.from_json(line) for line in lines if line.strip()]


def read_results(folder: Path) -> list[dict]:
    """Every complete result line of a run folder (a line cut short by a crash is ignored)."""
    rows = []
    for path in sorted(Path(folder).glob("results-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def done_keys(folder: Path) -> set[tuple[str, str]]:
    return {(r["sample"], r["method"]) for r in read_results(folder)}


class ResultWriter:
    def __init__(self, path: Path):
        self.path = path
        # A line cut short by a crash must not swallow the next one: start on a fresh line.
        if path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n"):
            with open(path, "a") as handle:
                handle.write("\n")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return value
    return 0


@torch.no_grad()
def answer_questions(model, tokenizer, context_ids: list[int], questions: list[list[int]], cache, max_new_tokens: int):
    """Greedy answers to a batch of questions over one fixed context (questions left-padded).

    Padding sits between the context and each question, so the context stays aligned for the cache.
    Returns the decoded answers and the number of new tokens of each.
    """
    width = max(len(q) for q in questions)
    pad = _pad_id(tokenizer)
    ids = torch.tensor([context_ids + [pad] * (width - len(q)) + q for q in questions], device=model.device)
    mask = torch.ones_like(ids)
    for row, q in enumerate(questions):
        mask[row, len(context_ids) : len(context_ids) + width - len(q)] = 0
    out = model.generate(
        ids,
        attention_mask=mask,
        **cache_kwargs(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        pad_token_id=pad,
    )
    new = out[:, ids.shape[1] :]
    eos = set(_eos_ids(model, tokenizer))
    lengths = []
    for row in new.tolist():
        n = 0
        for token in row:
            n += 1
            if token in eos:
                break
        lengths.append(n)
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts, lengths


@torch.no_grad()
def answer_greedy(model, tokenizer, context_ids: list[int], question: list[int], cache, max_new_tokens: int,
                  compile: bool = False):
    """One greedy answer through `generate_greedy` (its decode steps replayed as one CUDA graph on a
    GPU; `compile`: the step through torch.compile first), stopped at an end-of-sequence token.
    Returns the decoded answer and its number of tokens."""
    ids = torch.tensor([context_ids + question], device=model.device)
    eos = _eos_ids(model, tokenizer)
    new = generate_greedy(model, ids, cache, max_new_tokens, stop_tokens=eos, compile=compile)[0, ids.shape[1] :].tolist()
    for n, token in enumerate(new):
        if token in eos:
            new = new[: n + 1]
            break
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _sync(device):
    """Wait for the work this thread queued (its current stream: see `answer_in_threads`)."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


DECODES = ("generate", "greedy", "compiled")


def _group_answers(model, tokenizer, caches, group, context_ids, question_ids, max_new, kernels, decode):
    """Every method of `group` answers every question: per method, (texts, new tokens, reads, centroids
    scored), one entry per question.

    "generate": one `model.generate` call for the group, rows method-major then question (the torch
    path is bound by kernel launches: a batch costs about what a row costs). "greedy": one
    `generate_greedy` call per method and question (on a GPU each answer's decode is a replayed
    CUDA graph, which leaves the launches behind); "compiled": the same with its decode step through
    torch.compile (fewer, fused kernels per step)."""
    n_q = len(question_ids)
    if decode == "generate":
        request = caches.cache(group, rows=n_q, kernels=kernels).fork()
        texts, lengths = answer_questions(model, tokenizer, context_ids, question_ids * len(group), request, max_new)
        reads, scored = request.row_stats()
        rows = [slice(k * n_q, (k + 1) * n_q) for k in range(len(group))]
        return [(texts[r], lengths[r], reads[r], scored[r]) for r in rows]
    answers = []
    for method in group:
        cache = caches.cache([method], kernels=kernels)
        texts, lengths, reads, scored = [], [], [], []
        for question in question_ids:
            request = cache.fork()
            text, n = answer_greedy(model, tokenizer, context_ids, question, request, max_new, decode == "compiled")
            read, score = request.row_stats()
            texts.append(text), lengths.append(n), reads.append(read[0]), scored.append(score[0])
        answers.append((texts, lengths, reads, scored))
    return answers


def evaluate_sample(model, tokenizer, sample: ruler.Sample, methods: list[Method], spec: RunSpec, writer: ResultWriter,
                    done: set, deadline: float | None = None, bar=None, decode: str = "generate") -> int:
    """Answer every question of `sample` with every method not yet done; returns (sample, method)s written.

    The context is prefilled once; methods sharing an index form a group (see `_group_answers` for
    how a group answers, `decode`).
    """
    if decode not in DECODES:
        raise ValueError(f"decode={decode!r}: choose from {DECODES}")
    todo = [m for m in methods if (sample.id, m.name) not in done]
    if not todo:
        return 0
    context_ids, question_ids = ruler.prompt_ids(tokenizer, sample)
    start = time.perf_counter()
    caches = ContextCaches(model, context_ids)
    build_seconds = time.perf_counter() - start
    score = ruler.metric(sample.family)
    max_new = spec.max_new_tokens.get(sample.family, sample.tokens_to_generate)
    kernels = spec.attention == "kernels"
    groups = {}
    for m in todo:
        key = (m.name,) if kernels and m.family in KERNEL_FAMILIES else group_key(m)
        groups.setdefault(key, []).append(m)
    written = 0
    n_q = len(question_ids)
    for group in groups.values():
        if deadline is not None and time.monotonic() > deadline:
            break
        start = time.perf_counter()
        answers = _group_answers(model, tokenizer, caches, group, context_ids, question_ids, max_new, kernels, decode)
        _sync(model.device)
        seconds = time.perf_counter() - start
        for method, (texts, lengths, reads, scored) in zip(group, answers):
            preds = [ruler.postprocess(a) for a in texts]
            scores = score(preds, [q.answers for q in sample.questions])
            writer.write(dict(
                sample=sample.id,
                task=sample.task,
                family=sample.family,
                method=method.name,
                label=method.label,
                method_family=method.family,
                keep=method.keep,
                budget=method.budget,
                context_tokens=len(context_ids),
                clustered_tokens=caches.clustered_tokens,
                read_fraction=sum(reads) / n_q,
                centroids_scored=sum(scored) / n_q,
                batch_rows=len(group) * n_q if decode == "generate" else 1,
                seconds=round(seconds, 3),
                build_seconds=round(build_seconds, 3),
                questions=[
                    dict(pred=p, answers=q.answers, score=sc, question_tokens=len(ids), new_tokens=n)
                    for p, q, sc, ids, n in zip(preds, sample.questions, scores, question_ids, lengths)
                ],
            ))
            done.add((sample.id, method.name))
            written += 1
        if bar is not None:
            bar.update(len(group))
            bar.set_postfix_str(f"{sample.id} {group[0].label}", refresh=False)
    return written


def run_samples(model, tokenizer, folder: Path, samples: list[ruler.Sample], methods: list[Method], spec: RunSpec,
                *, claim=None, worker: str = "0", time_limit: float | None = None, progress: bool = True,
                decode: str = "generate") -> int:
    """Evaluate samples (all, or those `claim()` hands out) in this process; returns lines written."""
    folder = Path(folder)
    writer = ResultWriter(folder / f"results-{worker}.jsonl")
    done = done_keys(folder)
    deadline = None if time_limit is None else time.monotonic() + time_limit
    remaining = sum(1 for s in samples for m in methods if (s.id, m.name) not in done)
    bar = tqdm(total=remaining, desc=f"eval[{worker}]", unit="answer", disable=not progress,
               mininterval=1 if os.isatty(2) else 20)
    written = 0
    order = iter(range(len(samples))) if claim is None else iter(claim, None)
    for i in order:
        if deadline is not None and time.monotonic() > deadline:
            break
        written += evaluate_sample(model, tokenizer, samples[i], methods, spec, writer, done, deadline, bar, decode)
    bar.close()
    return written


def shared_claim(count: int):
    """A thread-safe `claim` for `run_samples`: hands out 0 ... count - 1 once each, then None."""
    lock, state = threading.Lock(), {"next": 0}

    def claim():
        with lock:
            i = state["next"]
            state["next"] += 1
        return i if i < count else None

    return claim


MAX_THREADS = 32  # torch's pool of CUDA streams per device (see answer_in_threads)


def answer_in_threads(model, tokenizer, folder: Path, samples: list[ruler.Sample], methods: list[Method], spec: RunSpec,
                      *, claim, worker: str, threads: int = 1, **kwargs) -> int:
    """`run_samples` in `threads` threads of this process, sharing the model and `claim`, each on its
    own CUDA stream and with its own result file; returns lines written.

    Processes sharing a GPU take turns on it (one CUDA context at a time), while the kernels that
    threads of one process queue on their own streams can run side by side: a decode step of a
    small model is hundreds of kernels that each fill a few of the GPU's multiprocessors. The first
    thread answers one sample alone first (compiling the kernels once); a thread's error is raised
    here once all have stopped.
    """
    if threads <= 1:
        return run_samples(model, tokenizer, folder, samples, methods, spec, claim=claim, worker=worker, **kwargs)
    device = model.device
    warm = threading.Event()
    calls = {"first": 0}
    written, errors = [0] * threads, []

    def first_claim():  # the first thread's second claim: its first sample is answered
        calls["first"] += 1
        if calls["first"] == 2:
            warm.set()
        return claim()

    # Made here, one after another: torch hands out a pool of 32 streams per device in turn.
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(threads)]

    def answer(t: int):
        try:
            if t:
                warm.wait()
            with torch.cuda.stream(streams[t]) if streams[t] is not None else contextlib.nullcontext():
                written[t] = run_samples(model, copy.deepcopy(tokenizer), folder, samples, methods, spec,
                                         claim=first_claim if t == 0 else claim, worker=f"{worker}-{t}", **kwargs)
        except BaseException as error:  # noqa: BLE001 - raised below, after every thread stopped
            errors.append(error)
        finally:
            if t == 0:
                warm.set()

    pool = [threading.Thread(target=answer, args=(t,), name=f"eval-{worker}-{t}") for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {threads} eval threads failed; finished answers are saved: run the "
                           "same command again to resume") from errors[0]
    return sum(written)
