"""`hf-squeeze eval`: run, resume or report a RULER evaluation."""

from __future__ import annotations

import os
import sys

FAMILY_ALIASES = {"vt": "variable_tracking", "cwe": "common_words_extraction", "fwe": "freq_words_extraction"}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="RULER accuracy: squeezed attention vs full attention, Quest, StreamingLLM and oracle top-k",
        description="Run (or resume: same --out) a RULER evaluation in the fixed-context setting and write "
        "results.csv, results.md and accuracy_vs_budget.png into --out. With --report, only tabulate "
        "finished runs.",
    )
    p.add_argument("--out", required=True, help="run folder (created, or resumed if it exists)")
    p.add_argument("--model", default="smollm2",
                   help="smollm2, qwen2.5-coder-0.5b, a Hugging Face model folder or a .gguf file")
    p.add_argument("--model-file", help="for qwen2.5-coder-0.5b: an assembled GGUF (sha256-checked)")
    p.add_argument("--length", type=int, default=4096, help="RULER max_seq_length (prompt + answer tokens)")
    p.add_argument("--tasks", default="all", help="'all', families (niah,vt,cwe,fwe,qa) or RULER task names")
    p.add_argument("--contexts", type=int, default=10, help="fixed contexts per task")
    p.add_argument("--questions", type=int, default=4, help="questions per context where the task allows several")
    p.add_argument("--methods", default="default",
                   help="'default' or e.g. full,flat-topk-0.3,hier-threshold-0.1,quest@0.125,streaming@0.125,oracle@0.125")
    p.add_argument("--max-new-tokens", type=int, help="cap every task's generation length (RULER's by default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--attention", default="reference", choices=["reference", "kernels"],
                   help="reference: the torch path for every method, methods sharing an index batched; kernels: "
                        "each squeezed method and full attention in its own batch through the Triton kernels (what users run)")
    p.add_argument("--decode", default="generate", choices=["generate", "greedy", "compiled"],
                   help="generate: model.generate, methods sharing an index batched; greedy: generate_greedy per "
                        "answer, its decode a replayed CUDA graph on a GPU (same answers, far fewer launches); "
                        "compiled: the same, its decode step through torch.compile first")
    p.add_argument("--questions-per-task", type=int,
                   help="answer each task's contexts in order only until they hold this many questions (a task "
                        "with 4 questions per context needs a quarter of the contexts); default: every context")
    p.add_argument("--workers", type=int, default=1, help="processes sharing the device (each holds the model)")
    p.add_argument("--threads", type=int, default=1,
                   help="threads per process, each on its own CUDA stream (processes sharing a GPU take turns on "
                        "it; threads of one process can run their kernels side by side)")
    p.add_argument("--time-limit", type=float, help="seconds after which no new answer is started")
    p.add_argument("--prepare-only", action="store_true", help="build the samples into --out and stop")
    p.add_argument("--report", nargs="+", metavar="RUN", help="tabulate these run folders into --out; run nothing")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import torch

    from . import check_threads, prepare, run_eval, ruler
    from .methods import parse_methods
    from .models import load_tokenizer
    from .report import write_report

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.report:
        result = write_report(args.report, args.out)
        for summary in result["summaries"]:
            from .report import markdown

            print(markdown(summary))
        print(f"wrote {args.out}/results.csv, results.md, accuracy_vs_budget.png")
        return 0
    methods = parse_methods(args.methods)  # fail on bad arguments before any model loads
    ruler.task_names(args.tasks)
    check_threads(args.threads, args.decode)
    if args.workers < 1 or args.contexts < 1 or args.questions < 1 or args.length < 256:
        raise ValueError("--workers, --contexts and --questions must be >= 1 and --length >= 256")
    if args.questions_per_task is not None and args.questions_per_task < 1:
        raise ValueError("--questions-per-task must be >= 1 (leave it out to answer every context)")
    caps = None
    if args.max_new_tokens:
        caps = {family: args.max_new_tokens for family in ruler.FAMILIES}
    if args.prepare_only:
        tokenizer = load_tokenizer(args.model, model_file=args.model_file)
        spec, samples = prepare(args.out, tokenizer, model=args.model, max_seq_length=args.length, tasks=args.tasks,
                                contexts_per_task=args.contexts, questions_per_context=args.questions,
                                methods=methods, max_new_tokens=caps, dtype=getattr(torch, args.dtype),
                                attention=args.attention)
        print(f"{len(samples)} contexts, {ruler.question_count(samples)} questions written to {args.out}")
        return 0
    result = run_eval(args.out, model=args.model, model_file=args.model_file, max_seq_length=args.length,
                      tasks=args.tasks, contexts_per_task=args.contexts, questions_per_context=args.questions,
                      methods=methods, max_new_tokens=caps, device=args.device, dtype=getattr(torch, args.dtype),
                      workers=args.workers, time_limit=args.time_limit, attention=args.attention,
                      decode=args.decode, questions_per_task=args.questions_per_task,
                      threads=args.threads)
    from .report import markdown

    for summary in result["summaries"]:
        print(markdown(summary))
    sys.stdout.flush()
    return 0
