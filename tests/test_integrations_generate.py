"""Every `generate` request that would answer wrong with a SqueezedCache is refused, with both names
of the cache argument; the requests that are right give exactly the tokens they should."""

import copy
import threading

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.integrations.generate import cache_argument

from .conftest import tiny_model

QUESTION = torch.randint(3, 256, (9,), generator=torch.Generator().manual_seed(3))
# Both names on every supported transformers: `cache=` (5.24+) and `past_key_values=` (earlier).
NAMES = ["cache", "past_key_values"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=4)  # a model of its own: these tests change its attention and weights


@pytest.fixture(scope="module")
def built(model):
    context = torch.randint(3, 256, (500,), generator=torch.Generator().manual_seed(7))
    return context, SqueezedCache.from_context(model, context, SqueezeConfig(keep=0.3), progress=False)


def prompt(context, question=QUESTION):
    return torch.cat([context, question])[None]


def greedy(model, ids, name, cache, **kwargs):
    kwargs.setdefault("max_new_tokens", 6)
    return model.generate(ids, do_sample=False, **{name: cache}, **kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_both_names_give_the_same_tokens(model, built, name):
    context, cache = built
    ids = prompt(context)
    want = greedy(model, ids, cache_argument(model), cache.fork())
    assert torch.equal(greedy(model, ids, name, cache.fork()), want)
    with pytest.raises(ValueError, match="two caches"):
        model.generate(ids, cache=cache.fork(), past_key_values=cache.fork(), max_new_tokens=2)


@pytest.mark.parametrize("name", NAMES)
def test_prompt_not_starting_with_the_context(model, built, name):
    context, cache = built
    wrong = prompt(context).clone()
    wrong[0, 321] = (wrong[0, 321] + 1) % 256
    with pytest.raises(ValueError, match="differs at token 321"):
        greedy(model, wrong, name, cache.fork())
    batch = torch.cat([prompt(context), wrong])  # one bad row in a batch is enough
    with pytest.raises(ValueError, match="row 1 differs at token 321"):
        greedy(model, batch, name, cache.fork())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("length", ["equal", "shorter", "none"])
def test_prompt_not_longer_than_the_context(model, built, name, length):
    context, cache = built
    ids = {"equal": context[None], "shorter": context[None, :50], "none": None}[length]
    match = "no input_ids" if ids is None else "at least one new token"
    with pytest.raises(ValueError, match=match):
        greedy(model, ids, name, cache.fork())


@pytest.mark.parametrize("name", NAMES)
def test_padding_inside_the_context(model, built, name):
    context, cache = built
    ids = prompt(context)
    mask = torch.ones_like(ids)
    mask[0, 10] = 0
    with pytest.raises(ValueError, match="cannot be padded"):
        greedy(model, ids, name, cache.fork(), attention_mask=mask)


@pytest.mark.parametrize("name", NAMES)
def test_only_new_tokens_with_a_full_mask(model, built, name):
    """transformers' other form of a cached prompt: the new tokens alone and a mask over everything."""
    context, cache = built
    full = greedy(model, prompt(context), name, cache.fork())
    mask = torch.ones(1, context.numel() + QUESTION.numel(), dtype=torch.long)
    only_new = greedy(model, QUESTION[None], name, cache.fork(), attention_mask=mask)
    assert torch.equal(only_new, full[:, context.numel():])
    with pytest.raises(ValueError, match="covers 508 tokens and input_ids 9"):
        greedy(model, QUESTION[None], name, cache.fork(), attention_mask=mask[:, 1:])


@pytest.mark.parametrize("name", NAMES)
def test_a_used_fork_serves_a_new_request_as_a_fresh_fork(model, built, name):
    context, cache = built
    other = torch.randint(3, 256, (14,), generator=torch.Generator().manual_seed(11))
    fork = cache.fork()
    greedy(model, prompt(context), name, fork)
    assert fork.get_seq_length() > context.numel()
    second = greedy(model, prompt(context, other), name, fork)
    fresh = cache.fork()
    assert torch.equal(second, greedy(model, prompt(context, other), name, fresh))
    assert fork.stats() == fresh.stats()  # the statistics are the new request's alone
    assert fork.stats()["dynamic_tokens"] == other.numel() + 5
    # A continuation given as new tokens only cannot be checked against what the fork holds: refused.
    mask = torch.ones(1, second.shape[1] + 2, dtype=torch.long)
    with pytest.raises(ValueError, match="already holds .* tokens of an earlier request"):
        greedy(model, torch.tensor([[5, 6]]), name, fork, attention_mask=mask)


@pytest.mark.parametrize("name", NAMES)
def test_embeddings_and_positions_are_refused(model, built, name):
    context, cache = built
    ids = prompt(context)
    embeds = model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="does not take inputs_embeds"):
        model.generate(inputs_embeds=embeds, **{name: cache.fork()}, max_new_tokens=2)
    with pytest.raises(ValueError, match="does not take position_ids"):
        greedy(model, ids, name, cache.fork(), position_ids=torch.arange(ids.shape[1])[None])


@pytest.mark.parametrize("name", NAMES)
def test_model_whose_attention_is_not_squeezed(model, built, name):
    context, cache = built
    ids = prompt(context)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(ValueError, match="attention is 'sdpa'.*set_attn_implementation"):
            greedy(model, ids, name, cache.fork())
        # A plain forward pass has no guard of its own: the cache sees its keys bypass the squeezed
        # attention at the next layer, before any output.
        with torch.no_grad(), pytest.raises(RuntimeError, match="layer 0 stored its keys.*never read them"):
            model(QUESTION[None], **cache_kwargs(model, cache.fork()))
    finally:
        model.set_attn_implementation("squeezed")
    # Another instance loaded with sdpa, which never saw the cache: refused the same way.
    other = tiny_model("llama", seed=4)
    other.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="never read them"):
        greedy(other, ids, cache_argument(other), cache.fork())  # unguarded: transformers' own name


def test_a_single_layer_model_is_checked_at_its_next_step(built):
    """With one layer there is no next layer in the same pass: the next pass's first update sees it."""
    one = tiny_model("llama", seed=4)
    one.model.layers = one.model.layers[:1]
    one.config.num_hidden_layers = 1
    context, _ = built
    cache = SqueezedCache.from_context(one, context, SqueezeConfig(keep=0.3), progress=False)
    one.set_attn_implementation("sdpa")
    fork = cache.fork()
    with torch.no_grad():
        one(QUESTION[None], **cache_kwargs(one, fork))
        with pytest.raises(RuntimeError, match="layer 0 stored its keys"):
            one(QUESTION[None, :1], **cache_kwargs(one, fork))


@pytest.mark.parametrize("name", NAMES)
def test_another_model_object_needs_bind(model, built, name):
    context, cache = built
    ids = prompt(context)
    twin = tiny_model("llama", seed=4)  # the same weights, another object: no guard of its own
    with pytest.raises(RuntimeError, match="not built or loaded for.*cache.bind"):
        greedy(twin, ids, cache_argument(twin), cache.fork())  # unguarded: transformers' own name
    bound = cache.bind(twin)
    assert torch.equal(greedy(twin, ids, name, bound.fork()), greedy(model, ids, name, cache.fork()))
    with pytest.raises(ValueError, match="different weights"):
        cache.bind(tiny_model("llama", seed=5))


@pytest.mark.parametrize("name", NAMES)
def test_weights_changed_after_the_build(built, name):
    """A model fine-tuned in place after the cache was built is another model: refused."""
    context, _ = built
    tuned = tiny_model("llama", seed=4)
    cache = SqueezedCache.from_context(tuned, context, SqueezeConfig(keep=0.3), progress=False)
    greedy(tuned, prompt(context), name, cache.fork())
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(1.001)  # changes every key of layer 1
    with pytest.raises(ValueError, match="different weights"):
        greedy(tuned, prompt(context), name, cache.fork())


class _Pause(LogitsProcessor):
    """Holds a generate() call at its second step until released."""

    def __init__(self):
        self.reached, self.release, self.calls = threading.Event(), threading.Event(), 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == 2:
            self.reached.set()
            self.release.wait(timeout=60)
        return scores


@pytest.mark.parametrize("name", NAMES)
def test_one_fork_from_two_threads(model, built, name):
    context, cache = built
    ids = prompt(context)
    fork = cache.fork()
    pause = _Pause()
    results = {}

    def first():
        results["out"] = greedy(model, ids, name, fork, logits_processor=LogitsProcessorList([pause]))

    worker = threading.Thread(target=first)
    worker.start()
    try:
        assert pause.reached.wait(timeout=60)
        with pytest.raises(RuntimeError, match="serving another generate"):
            greedy(model, ids, name, fork)
        with torch.no_grad(), pytest.raises(RuntimeError, match="another thread"):
            model(torch.tensor([[5]]), **cache_kwargs(model, fork))
    finally:
        pause.release.set()
        worker.join()
    # The first request was not disturbed, and each thread with its own fork is fine.
    assert torch.equal(results["out"], greedy(model, ids, name, cache.fork()))


def test_deepcopy_of_a_guarded_model_guards_the_copy(model, built):
    context, cache = built
    twin = copy.deepcopy(model)
    assert twin.generate.__self__ is twin
    wrong = prompt(context).clone()
    wrong[0, 0] = (wrong[0, 0] + 1) % 256
    with pytest.raises(ValueError, match="differs at token 0"):
        greedy(twin, wrong, cache_argument(twin), cache.bind(twin).fork())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("assist", ["prompt_lookup", "assistant_model"])
def test_assisted_generation_at_keep_1_gives_the_greedy_tokens(name, assist):
    model = tiny_model("llama", seed=4)
    # A context that repeats itself, so prompt lookup finds candidates and some get accepted.
    pattern = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(8))
    context = pattern.repeat(12)
    cache = SqueezedCache.from_context(model, context, SqueezeConfig(keep=1.0), progress=False)
    ids = prompt(context, pattern[:7])
    plain = greedy(model, ids, name, cache.fork(), max_new_tokens=20)
    assert torch.equal(plain, greedy(model, ids, name, DynamicCache(), max_new_tokens=20))
    if assist == "prompt_lookup":
        extra = {"prompt_lookup_num_tokens": 4}
    else:
        extra = {"assistant_model": tiny_model("llama", seed=9)}
    fork = cache.fork()
    assisted = greedy(model, ids, name, fork, max_new_tokens=20, **extra)
    assert torch.equal(assisted, plain)
    # Rejected candidates were cropped: the fork holds every token but the last.
    assert fork.get_seq_length() == assisted.shape[1] - 1


@pytest.mark.parametrize("assist", [{"prompt_lookup_num_tokens": 4}, {"assistant_model": "tiny"}])
def test_assisted_generation_below_keep_1_runs(built, model, assist):
    context, cache = built
    if "assistant_model" in assist:
        assist = {"assistant_model": tiny_model("llama", seed=9)}
    fork = cache.fork()
    out = greedy(model, prompt(context), cache_argument(model), fork, max_new_tokens=12, **assist)
    assert out.shape[1] == context.numel() + QUESTION.numel() + 12
    assert fork.get_seq_length() == out.shape[1] - 1


@pytest.mark.parametrize("extra", [{"use_cache": False}, {"prefill_chunk_size": 4}], ids=["no-use-cache", "chunked"])
def test_other_generate_paths_give_the_same_tokens(model, built, extra):
    """`use_cache=False` hands generate's whole sequence over at every step; chunked prefill feeds
    the prompt in pieces (each piece makes its own selection, so only keep=1 is token-exact)."""
    context, cache = built
    if "prefill_chunk_size" in extra:
        cache = SqueezedCache.from_context(model, context, SqueezeConfig(keep=1.0), progress=False)
    name = cache_argument(model)
    ids = prompt(context)
    assert torch.equal(greedy(model, ids, name, cache.fork(), **extra), greedy(model, ids, name, cache.fork()))
