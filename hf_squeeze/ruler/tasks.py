"""The RULER sample generators (niah, variable tracking, common and frequent words, QA), rebuilt
from their specification in `nvidia-long-context-eval` (see `__init__.py` for what differs)."""


from __future__ import annotations

import importlib.util
import json
import random
import re
import string
import uuid
from functools import lru_cache
from pathlib import Path

import torch

from ..assets import essays_text
from .samples import Question, Sample, prompt_length, ruler_dir


def _split(template: str, **fields) -> tuple[str, str]:
    """Format a RULER template and cut it after {context}: (text up to the context, the rest)."""
    marker = "\x00CONTEXT_END\x00"
    filled = template.replace("{context}", "{context}" + marker).format(**fields)
    head, tail = filled.split(marker)
    return head, tail


def _fit(build, step: int, budget: int, tokenizer, start: int | None = None, limit: int | None = None):
    """The largest multiple of `step` (at most `limit`) whose sample fits `budget` tokens, and that sample.

    `build(n)` returns a Sample with haystack size n. Lengths grow with n, so a doubling search then
    a bisection finds what RULER's incremental search finds, in far fewer tokenisations.
    """
    def fits(n):
        sample = build(n)
        return prompt_length(tokenizer, sample) + sample.tokens_to_generate <= budget, sample

    lo, hi = 0, start or step
    best = None
    while True:
        if limit is not None and hi >= limit:
            hi = limit
        ok, sample = fits(hi)
        if not ok:
            break
        lo, best = hi, sample
        if limit is not None and hi >= limit:
            return best
        hi *= 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        if mid <= lo:
            break
        ok, sample = fits(mid)
        if ok:
            lo, best = mid, sample
        else:
            hi = mid
    if best is None:
        raise ValueError(f"max_seq_length={budget} is too short for this task even with the smallest haystack")
    return best


# ---- data ------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _essay_words() -> tuple[str, ...]:
    return tuple(re.sub(r"\s+", " ", essays_text()).split(" "))


@lru_cache(maxsize=None)
def _wonderwords(name: str) -> tuple[str, ...]:
    spec = importlib.util.find_spec("wonderwords")
    if spec is None:
        raise ModuleNotFoundError("the RULER word lists come from `wonderwords`: pip install wonderwords")
    folder = Path(spec.origin).parent / "assets"
    return tuple(w.strip() for w in (folder / name).read_text().splitlines() if w.strip())


@lru_cache(maxsize=None)
def _niah_words() -> tuple[str, ...]:
    return tuple(sorted({f"{a}-{n}" for a in _wonderwords("adjectivelist.txt") for n in _wonderwords("nounlist.txt")}))


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences(text: str) -> list[str]:
    """Split text into sentences (stands in for nltk's sent_tokenize, which needs a download)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


# ---- NIAH ------------------------------------------------------------------------------------------


NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."


REPEAT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


DEPTHS = [int(round(x)) for x in torch.linspace(0, 100, 40).tolist()]


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10**6, 10**7 - 1))
    if kind == "words":
        return rng.choice(_niah_words())
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def _niah(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context):
    a = cfg["args"]
    kind_k, kind_v, haystack_kind = a["type_needle_k"], a["type_needle_v"], a["type_haystack"]
    num_q = a["num_needle_q"]
    num_k = max(a["num_needle_k"], num_q)
    multi_ask = num_q == 1 and (num_k > 1 or haystack_kind == "needle")
    template, prefix, type_v = cfg["template"], cfg["answer_prefix"], kind_v
    if num_q * a["num_needle_v"] == 1:  # RULER's singular wording
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = kind_v[:-1]
    if haystack_kind == "essay":
        step = 500
    else:
        step = 25 if max_len >= 4096 else 5

    def build(num_haystack):
        rng = random.Random(rng_seed)
        keys, values, needles = [], [], []
        while len(keys) < num_k:
            key = _random_value(kind_k, rng)
            if key in keys:
                continue
            keys.append(key)
            values.append([_random_value(kind_v, rng) for _ in range(a["num_needle_v"])])
            needles += [NEEDLE.format(type_needle_v=kind_v, key=key, value=v) for v in values[-1]]
        rng.shuffle(needles)
        if haystack_kind == "essay":
            sents = sentences(" ".join(_essay_words()[:num_haystack]))
            cuts = sorted(int(len(sents) * d / 100) for d in rng.sample(DEPTHS, len(needles)))
            parts, last = [], 0
            for cut, needle in zip(cuts, needles):
                parts += [" ".join(sents[last:cut]), needle]
                last = cut
            parts.append(" ".join(sents[last:]))
            haystack = " ".join(p for p in parts if p)
            extra = []
        else:
            if haystack_kind == "repeat":
                lines = [REPEAT] * num_haystack
                extra = []
            else:  # a haystack of needles with other keys: any of them is a fair question too
                lines, extra = [], []
                while len(lines) < num_haystack:
                    key = _random_value(kind_k, rng)
                    if key in keys:
                        continue
                    value = _random_value(kind_v, rng)
                    lines.append(NEEDLE.format(type_needle_v=kind_v, key=key, value=value))
                    extra.append((key, [value]))
            for position, needle in zip(sorted(rng.sample(range(num_haystack), len(needles)), reverse=True), needles):
                lines.insert(position, needle)
            haystack = "\n".join(lines)
        if multi_ask:  # fixed-context mode: ask each key in turn (the real needles first)
            pairs = list(zip(keys, values))
            seen = {k for k in keys}
            picks = rng.sample(extra, len(extra))
            for key, value in picks:
                if len(pairs) >= questions_per_context:
                    break
                if key not in seen and sum(1 for k2, _ in extra if k2 == key) == 1:
                    pairs.append((key, value))
                    seen.add(key)
            asked = [([k], v) for k, v in pairs[:questions_per_context]]
        else:
            chosen = rng.sample(range(num_k), num_q)
            asked = [([keys[i] for i in chosen], [v for i in chosen for v in values[i]])]
        questions = []
        head = None
        for query_keys, answers in asked:
            query = ", ".join(query_keys[:-1]) + ", and " + query_keys[-1] if len(query_keys) > 1 else query_keys[0]
            head, tail = _split(template, type_needle_v=type_v, context=haystack, query=query)
            questions.append(Question(tail, prefix.format(type_needle_v=type_v, query=query), answers))
        return Sample(f"{name}/{index}", name, "niah", [], head, questions, cfg["tokens_to_generate"],
                      {"haystack": num_haystack})

    limit = len(_essay_words()) if haystack_kind == "essay" else None
    return _fit(build, step, max_len, tokenizer, limit=limit)


# ---- variable tracking -----------------------------------------------------------------------------


def _vt_chain(rng, num_hops, letters):
    names = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=letters))
        if name not in names:
            names.append(name)
    chain = [f"VAR {names[0]} = {rng.randint(10000, 99998)}"]
    chain += [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(num_hops)]
    return names, chain


def _vt_text(rng, num_noises, num_hops, letters):
    names, chain = _vt_chain(rng, num_hops, letters)
    lines = [REPEAT + "\n"] * num_noises
    for offset, position in enumerate(sorted(rng.sample(range(len(lines)), len(chain)))):
        lines.insert(position + offset, chain[offset])
    context = " ".join(lines).replace(". \n", ".\n")
    return context, chain[0].split("=")[-1].strip(), names


def _vt(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context):
    hops = cfg["args"]["num_hops"]
    template, prefix = cfg["template"], cfg["answer_prefix"]

    def worked_example(rng):
        # RULER prepends one solved example: a short chain (3-letter names), its answer, names re-drawn.
        context, value, names = _vt_text(rng, 5 * 4, min(10, hops), 3)
        head, tail = _split(template, context=context, query=value)
        text = head + tail + prefix.format(num_v=min(10, hops) + 1, query=value) + " " + " ".join(names)
        for old in names:
            text = text.replace(old, "".join(rng.choices(string.ascii_uppercase, k=len(old))))
        return text + "\n\n"

    def build(num_noises):
        rng = random.Random(rng_seed)
        example = worked_example(rng)
        context, value, names = _vt_text(rng, num_noises, hops, 5)
        head, tail = _split(template, context=context, query=value)
        question = Question(tail, prefix.format(num_v=hops + 1, query=value), names)
        return Sample(f"{name}/{index}", name, "variable_tracking", [], example + head, [question],
                      cfg["tokens_to_generate"], {"noises": num_noises})

    return _fit(build, 10, max_len, tokenizer)


# ---- common / frequent words -----------------------------------------------------------------------


def _cwe(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context):
    a = cfg["args"]
    template, prefix = cfg["template"], cfg["answer_prefix"]
    words = sorted(set(_wonderwords("nounlist.txt") + _wonderwords("adjectivelist.txt") + _wonderwords("verblist.txt")))
    random.Random(rng_seed).shuffle(words)

    def listing(rng, num_words, common_repeats, uncommon_repeats):
        chosen = rng.sample(words, num_words)
        common, uncommon = chosen[: a["num_cw"]], chosen[a["num_cw"] :]
        items = common * common_repeats + uncommon * uncommon_repeats
        random.Random(rng_seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items)), common

    short = max_len < 4096  # RULER's smaller repeat counts below 4K tokens

    def build(num_words):
        rng = random.Random(rng_seed + index)
        ex_context, ex_answer = listing(rng, 20, 3, 1) if short else listing(rng, 40, 10, 3)
        context, answer = listing(rng, num_words, 6, 1) if short else listing(rng, num_words, a["freq_cw"], a["freq_ucw"])
        ex_head, ex_tail = _split(template, context=ex_context, query="")
        before = [
            {"role": "user", "content": ex_head + ex_tail},
            {"role": "assistant", "content": prefix.strip() + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_answer))},
        ]
        head, tail = _split(template, context=context, query="")
        return Sample(f"{name}/{index}", name, "common_words_extraction", before, head, [Question(tail, prefix, answer)],
                      cfg["tokens_to_generate"], {"words": num_words})

    return _fit(build, 10, max_len, tokenizer, limit=len(words))


def _fwe(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context):
    alpha = float(cfg["args"]["alpha"])
    template, prefix = cfg["template"], cfg["answer_prefix"]
    vocab_size = max_len // 50
    zeta = float(torch.special.zeta(torch.tensor(alpha, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)))

    def build(num_words):
        rng = random.Random(rng_seed + index)
        vocab = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab = sorted(vocab)
        random.Random(rng_seed).shuffle(vocab)
        vocab[0] = "..."  # the most frequent "word" is noise
        counts = [int(num_words * (k ** -alpha) / zeta) for k in range(1, len(vocab) + 1)]
        text = [w for w, c in zip(vocab, counts) for _ in range(c)]
        random.Random(rng_seed).shuffle(text)
        head, tail = _split(template, context=" ".join(text), query="")
        return Sample(f"{name}/{index}", name, "freq_words_extraction", [], head, [Question(tail, prefix, vocab[1:4])],
                      cfg["tokens_to_generate"], {"words": num_words})

    return _fit(build, max(10, max_len // 32), max_len, tokenizer, start=max_len // 6)


# ---- QA --------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _qa_data(dataset: str):
    folder = ruler_dir() / "data/synthetic/json"
    if dataset == "squad":
        data = json.loads((folder / "squad.json").read_text())
        docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
        ids = {c: i for i, c in enumerate(docs)}
        qas = []
        for d in data["data"]:
            article = [ids[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                for qa in p["qas"]:
                    if not qa["is_impossible"]:
                        gold = ids[p["context"]]
                        qas.append(dict(query=qa["question"], outputs=[a["text"] for a in qa["answers"]],
                                        context=[gold], more=[i for i in article if i != gold]))
        return qas, docs
    if dataset == "hotpotqa":
        data = json.loads((folder / "hotpotqa.json").read_text())
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        ids = {c: i for i, c in enumerate(docs)}
        qas = [dict(query=d["question"], outputs=[d["answer"]], context=[ids[f"{t}\n{''.join(p)}"] for t, p in d["context"]],
                    more=[]) for d in data]
        return qas, docs
    raise ValueError(f"unknown QA dataset {dataset!r}")


def _qa(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context):
    # The documents of every question asked must fit: at short lengths fewer questions share a context.
    for asked_count in range(questions_per_context, 0, -1):
        try:
            return _qa_sample(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context, asked_count)
        except ValueError:
            if asked_count == 1:
                raise


def _qa_sample(name, cfg, index, rng_seed, max_len, tokenizer, questions_per_context, asked_count):
    qas, docs = _qa_data(cfg["args"]["dataset"])
    template, prefix = cfg["template"], cfg["answer_prefix"]
    # Questions drawn at random (seeded per context), so that one context is not one paragraph asked four times.
    asked = [qas[i] for i in random.Random(rng_seed).sample(range(len(qas)), asked_count)]
    gold = list(dict.fromkeys(i for qa in asked for i in qa["context"]))
    more = [i for i in dict.fromkeys(i for qa in asked for i in qa["more"]) if i not in gold]

    def build(num_docs):
        rng = random.Random(rng_seed + index)
        num_docs = max(num_docs, len(gold))
        if num_docs - len(gold) > len(more):
            chosen = set(gold) | set(more)
            others = [i for i in range(len(docs)) if i not in chosen]
            picked = gold + more + rng.sample(others, num_docs - len(gold) - len(more))
        else:
            picked = gold + rng.sample(more, num_docs - len(gold))
        texts = [docs[i] for i in picked]
        random.Random(rng_seed).shuffle(texts)
        context = "\n\n".join(f"Document {i + 1}:\n{d}" for i, d in enumerate(texts))
        questions = []
        head = None
        for qa in asked:
            head, tail = _split(template, context=context, query=qa["query"])
            questions.append(Question(tail, prefix, qa["outputs"]))
        return Sample(f"{name}/{index}", name, "qa", [], head, questions, cfg["tokens_to_generate"], {"documents": num_docs})

    # RULER adds documents 10 at a time; below 4K tokens (tests) one at a time, or nothing would fit.
    return _fit(build, 10 if max_len >= 4096 else 1, max_len, tokenizer, limit=len(docs))


BUILDERS = {
    "niah": _niah,
    "variable_tracking": _vt,
    "common_words_extraction": _cwe,
    "freq_words_extraction": _fwe,
    "qa": _qa,
}
