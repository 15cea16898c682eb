"""What `model.generate` may be asked with a SqueezedCache, checked before any token is computed.

A squeezed cache already holds a fixed context, and `generate` feeds the model only the tokens after
the cache's length. A request that does not fit (a prompt that does not start with that context, a
padded context, embeddings instead of ids, a model with another attention or other weights) would
silently answer from the wrong prefix, so it is refused here with a message that says what to do.

The check runs once per `generate` call, where everything the caller passed is still in view: a
wrapper set on the model *instance* (never on a transformers class) by `install_guard`, which
`SqueezedCache.from_context`, `load` and `bind` call. It also lets callers use either name of the
cache argument on every supported transformers version: `cache=` (transformers >= 5.24) or
`past_key_values=` (earlier), handed on under the name the installed version expects.
"""

from __future__ import annotations

import inspect
import types

import torch

from ..attention import GUARD_ATTR
from .fingerprint import check_fingerprint
from .transformers import NAME, attention_modules

# Names under which a cache reaches `generate`, the installed transformers' own first.
CACHE_NAMES = ("cache", "past_key_values")

_argument_names: dict[type, str] = {}


def cache_argument(model) -> str:
    """The name `model`'s forward (and so `generate`) gives the cache: "cache" from transformers 5.24
    on, "past_key_values" before (read from the signature, so remote-code models answer too)."""
    cls = type(model)
    if cls not in _argument_names:
        params = inspect.signature(model.forward).parameters
        _argument_names[cls] = "cache" if "cache" in params else "past_key_values"
    return _argument_names[cls]


def cache_kwargs(model, cache) -> dict:
    """`{name: cache}` for a call of `model` or `model.generate` on the installed transformers."""
    return {cache_argument(model): cache}


def install_guard(model) -> None:
    """Check every `generate` call of this model instance that is given a SqueezedCache (idempotent).

    The wrapper is a method bound to the instance, so `copy.deepcopy(model)` gives a copy whose
    guard serves the copy. The model's attention modules are marked, so that a forward pass of a
    model without the guard is refused at its first attention layer (`attention.check_guarded`).
    """
    for module in attention_modules(model):
        setattr(module, GUARD_ATTR, True)
    for method in (generate, prepare_inputs_for_generation):
        if getattr(model.__dict__.get(method.__name__), "__func__", None) is not method:
            setattr(model, method.__name__, types.MethodType(method, model))


def generate(self, *args, **kwargs):
    """`GenerationMixin.generate`, after the request checks when the cache is a SqueezedCache."""
    given = [name for name in CACHE_NAMES if kwargs.get(name) is not None]
    caches = [kwargs.pop(name) for name in given]
    if len(caches) == 2 and caches[0] is not caches[1]:
        raise ValueError("generate() got two caches, `cache=` and `past_key_values=`: pass one of them")
    cache = caches[0] if caches else None
    if cache is not None:
        kwargs[cache_argument(self)] = cache
    if not hasattr(cache, "serving"):
        return type(self).generate(self, *args, **kwargs)
    input_ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
    check_request(self, cache, input_ids, kwargs)
    with cache.serving():
        plan = decode_plan(self, cache, input_ids, kwargs)
        if plan is None:
            return type(self).generate(self, *args, **kwargs)
        cache.plan(*plan)
        try:
            return type(self).generate(self, *args, **kwargs)
        finally:
            cache.release()
            cache.plan(None)


def decode_plan(model, cache, input_ids, kwargs: dict) -> tuple[int, int, bool] | None:
    """(the dynamic tokens a request writes, its input tokens after the context, whether the cache
    reports itself compileable meanwhile), when its decode can run in fixed-capacity steps: one
    token per step (greedy or sampling, any batch or number of sequences per prompt; not beam
    search, assisted decoding or use_cache=False). Such a request's cache reserves them once the
    input is read (`SqueezedCache.plan`): its steps then have fixed shapes and no host
    synchronisation. Else None.

    The cache is compileable, as transformers' own StaticCache, unless the request passes
    `disable_compile=True` or the model is spread over several devices: on a GPU `generate` then
    compiles the decode step (its `compile_config`, or transformers' default: CUDA graphs) with the
    kernels as one custom operator; on the CPU transformers runs it eagerly. The capacity of a
    request transformers will compile is rounded up (`compiled_capacity`), so that requests of
    similar lengths share one compiled step."""
    config = kwargs.get("generation_config") or model.generation_config

    def setting(name):
        return kwargs[name] if kwargs.get(name) is not None else getattr(config, name, None)
    if (setting("num_beams") or 1) > 1 or setting("use_cache") is False or any(
            kwargs.get(name) is not None for name in ("assistant_model", "prompt_lookup_num_tokens", "assistant_early_exit")):
        return None
    length = input_ids.shape[-1]
    mask = kwargs.get("attention_mask")
    new = length - cache.fixed.num_tokens if mask is None or mask.shape[-1] == length else length
    max_new = setting("max_new_tokens")
    if max_new is None:
        max_new = (setting("max_length") or 20) - length
    # one device: a model spread over several GPUs keeps its eager steps (as generate_greedy does)
    compileable = not setting("disable_compile") and len({index.keys.device for index in cache.fixed.layers}) == 1
    capacity = max(new + max_new, new + 1)
    # transformers compiles on accelerators only, unless its compile_config says otherwise
    compile_config = kwargs.get("compile_config") or getattr(config, "compile_config", None)
    compiles = compileable and (model.device.type != "cpu" or getattr(compile_config, "_compile_all_devices", False))
    return (compiled_capacity(capacity) if compiles else capacity), new, compileable


def compiled_capacity(tokens: int) -> int:
    """The dynamic capacity a compiled request reserves for `tokens`: the next power of two, at least
    256. A compiled decode step is specialised to its cache's shapes, so requests of similar
    lengths must share one capacity or each would compile the model again (at most twice the
    dynamic tokens held, which are few beside the fixed context)."""
    return max(256, 1 << (tokens - 1).bit_length())


def prepare_inputs_for_generation(self, input_ids, *args, **kwargs):
    """`GenerationMixin.prepare_inputs_for_generation`, feeding a SqueezedCache only what it lacks.

    `generate` slices the prompt by the cache's length before its first forward pass, but two of its
    paths do not: the first step of assisted generation (`assistant_model=`,
    `prompt_lookup_num_tokens=`), and every step with `use_cache=False`, which hand over the whole
    sequence. A cache that already holds the fixed context would then store it a second time. Here
    a full-length sequence (its mask, if any, as long as it) is cut to the tokens after the cache.
    """
    cache = next((kwargs[name] for name in CACHE_NAMES if kwargs.get(name) is not None), None)
    if hasattr(cache, "serving") and kwargs.get("next_sequence_length") is None and not args:
        mask = kwargs.get("attention_mask")
        held = cache.get_seq_length()
        if input_ids.shape[-1] > held and (mask is None or mask.shape[-1] == input_ids.shape[-1]):
            kwargs["next_sequence_length"] = input_ids.shape[-1] - held
    return type(self).prepare_inputs_for_generation(self, input_ids, *args, **kwargs)


# Arguments of `generate` that would place the new tokens where the guard cannot check them.
_UNCHECKABLE = {
    "inputs_embeds": "embeddings cannot be compared with the cached context: pass input_ids (the context ids "
                     "followed by the question ids)",
    "position_ids": "the cached context holds positions 0..N-1 and the cache numbers the new tokens after it: "
                    "leave position_ids out (padding between the context and a question is handled by the "
                    "attention_mask)",
}


def check_request(model, cache, input_ids, kwargs: dict) -> None:
    """Everything a `generate` call with a SqueezedCache must satisfy; raises ValueError otherwise."""
    for name, why in _UNCHECKABLE.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"generate() with a SqueezedCache does not take {name}: {why}")
    impl = getattr(model.config, "_attn_implementation", None)
    if impl != NAME:
        raise ValueError(
            f"the model's attention is {impl!r}, so it would ignore the squeezed context in this cache: set "
            f"model.set_attn_implementation('{NAME}') (or load it with attn_implementation='{NAME}'), or use a "
            "DynamicCache with this attention"
        )
    check_fingerprint(cache.fixed.fingerprint, model)
    check_prompt(cache, input_ids, kwargs.get("attention_mask"))


def check_prompt(cache, input_ids, attention_mask) -> None:
    """The prompt must be the cached context followed by new tokens, in every row.

    Two forms are accepted, as `generate` does for any cache: the full prompt (context + new tokens,
    with an optional mask of the same length), or, on a fresh cache only, the new tokens alone with
    a mask over the full sequence. Padding may sit between the context and the new tokens, never in
    the context.
    """
    n = cache.fixed.num_tokens
    if input_ids is None:
        raise ValueError(
            "generate() got no input_ids; with a SqueezedCache pass the full prompt: "
            "torch.cat([context_ids, question_ids], -1)"
        )
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a [batch, tokens] tensor of token ids, got {_describe(input_ids)}")
    length = input_ids.shape[-1]
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError(
                f"with a SqueezedCache the attention_mask must be a [batch, tokens] tensor of 0/1 (padding), got "
                f"{_describe(attention_mask)}"
            )
        if attention_mask.shape[0] != input_ids.shape[0]:
            raise ValueError(f"attention_mask has {attention_mask.shape[0]} rows for {input_ids.shape[0]} prompts")
        if attention_mask.shape[-1] >= n and not bool(attention_mask[:, :n].all()):
            raise ValueError(
                "attention_mask masks tokens of the fixed context; the context cannot be padded. Put padding between "
                "the context and the question (left-pad the questions) instead."
            )
    if attention_mask is not None and attention_mask.shape[-1] != length:
        held = cache.get_seq_length()
        if held != n:
            raise ValueError(
                f"this SqueezedCache already holds {held - n} tokens of an earlier request after its {n}-token context, "
                "and only new tokens were given: pass the full prompt (context + question; the cache then serves it "
                "as a fresh fork would) or use cache.fork() for each request"
            )
        if attention_mask.shape[-1] != n + length:
            raise ValueError(
                f"the attention_mask covers {attention_mask.shape[-1]} tokens and input_ids {length}: pass the full "
                f"prompt with a mask of the same length, or only the new tokens with a mask over the {n}-token "
                "context plus them"
            )
        return  # only the new tokens: the context is the cache's by construction
    if length <= n:
        raise ValueError(
            f"the prompt has {length} tokens but the cache already holds a {n}-token fixed context: pass the full "
            "prompt, the context ids followed by at least one new token"
        )
    expected = cache.fixed.context_ids.to(input_ids.device)
    differs = input_ids[:, :n] != expected
    if bool(differs.any()):
        row, pos = (int(i) for i in differs.nonzero()[0])
        raise ValueError(
            f"the prompt does not start with the context this SqueezedCache was built for: row {row} differs at token "
            f"{pos} (cached id {int(expected[pos])}, got {int(input_ids[row, pos])}). Build or load the cache for "
            "this context, or pass torch.cat([context_ids, question_ids], -1) as the prompt."
        )


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor of shape {tuple(x.shape)}"
    return type(x).__name__
