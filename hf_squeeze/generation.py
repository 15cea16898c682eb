"""Greedy generation whose decode step is one CUDA graph replay.

`model.generate(full_ids, cache=cache.fork())` works with every transformers feature, but
each decode step runs the model eagerly: per layer, Python and a few dozen kernel launches. On a
GPU that host work can take longer than the step's GPU work, and then a faster attention kernel
changes nothing the user feels. `generate_greedy` runs the prompt eagerly, fixes the cache's
capacity (`cache.reserve`), captures one decode step (forward, argmax, write the token, advance the
position) in a CUDA graph, and replays it: the host does nothing per token but one launch.

It serves a `SqueezedCache` and, for dense baselines, a transformers `StaticCache` (whose layers
already write in place at a position counted on the device).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from transformers.cache_utils import StaticCache

from .devices import synchronized_clock
from .integrations.generate import cache_kwargs, check_request
from .integrations.transformers import layer_devices
from .kernels import graphs


@dataclass
class GenerationTimes:
    """Wall-clock seconds of one `generate_greedy` call (the device synchronised at each mark)."""

    prefill: float = 0.0  # the prompt's forward and the first token: time to first token
    capture: float = 0.0  # the eager warm-up step and the graph capture (once per request)
    decode: float = 0.0  # every later token
    decode_tokens: int = 0  # tokens produced by `decode`

    @property
    def per_token(self) -> float:
        """Time per output token after the first (TPOT), counting the warm-up step as a token."""
        tokens = self.decode_tokens + (1 if self.capture else 0)
        return (self.decode + self.capture) / tokens if tokens else float("nan")


def _gpus(model, device) -> list[torch.device]:
    """The CUDA devices a forward pass of `model` runs on (several for a `device_map` over GPUs)."""
    devices = {device, *layer_devices(model)}
    return sorted((d for d in devices if d.type == "cuda"), key=str)


@torch.no_grad()
def generate_greedy(
    model,
    input_ids: torch.Tensor,
    cache=None,
    max_new_tokens: int | None = None,
    *,
    past_key_values=None,
    cuda_graph: bool | None = None,
    times: GenerationTimes | None = None,
    stop_tokens=None,
    check_every: int = 16,
    compile: bool | dict = False,
) -> torch.Tensor:
    """Greedy decoding of `max_new_tokens` tokens after `input_ids` [1, L] (the full prompt).

    `cache` (or `past_key_values`, its name before transformers 5.24): a `SqueezedCache.fork()` (the
    prompt must start with its context; a fork that served a request starts over), or a
    `StaticCache` holding a prefix of the prompt (or nothing) with room for the whole output.
    `cuda_graph` (default: on one CUDA device) captures the decode step; False runs the same step
    eagerly (same results; for CPUs, checks, and models spread over several GPUs, whose steps one
    graph cannot capture). `stop_tokens` (token ids, e.g. the end-of-sequence ones): the host looks
    at the output every `check_every` tokens (one synchronisation each) and stops once one of them
    was produced; tokens after it are whatever greedy decoding produced: cut the output after it.
    `compile`: run the decode step through `torch.compile` (True, or a dict of its options; by
    default one graph, no CUDA graphs of its own) before it is captured: the compiler
    fuses the model's small kernels (norms, rotary embedding, activations), the squeezed attention
    enters its graph as one operator (`kernels.ops`). The compiled forward is kept for the model's
    later calls. Returns [1, L + n], n = max_new_tokens unless a stop token ended it earlier;
    `times`, if given, receives the timings.
    """
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("generate_greedy got two caches, `cache` and `past_key_values`: pass one of them")
    cache = cache if cache is not None else past_key_values
    if max_new_tokens is None:
        raise TypeError("generate_greedy needs max_new_tokens")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"generate_greedy takes one prompt of shape [1, L], got {tuple(input_ids.shape)}; for batches of "
            "questions use model.generate (eager)"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    stops = None
    if stop_tokens is not None:
        stops = torch.as_tensor([stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens), device=input_ids.device)
    device = input_ids.device
    gpus = _gpus(model, device)
    if cuda_graph is None:
        cuda_graph = device.type == "cuda" and len(gpus) == 1
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device; the prompt is on {device}: pass cuda_graph=False")
    if cuda_graph and len(gpus) > 1:
        raise ValueError(
            f"the model runs on {len(gpus)} GPUs ({', '.join(map(str, gpus))}); a CUDA graph captures one device's "
            "work: pass cuda_graph=False (or leave it unset) for models spread with device_map"
        )
    reserve = getattr(cache, "reserve", None)
    if reserve is None and not isinstance(cache, StaticCache):
        raise TypeError(
            f"generate_greedy needs a SqueezedCache or a transformers StaticCache, got {type(cache).__name__}"
        )
    squeezed = hasattr(cache, "serving")
    if squeezed:
        check_request(model, cache, input_ids, {})
    with cache.serving() if squeezed else contextlib.nullcontext():
        forward = compiled_forward(model, compile) if compile else model
        return _generate(model, input_ids, cache, max_new_tokens, cuda_graph, times, gpus, _Stop(stops, check_every),
                         forward)


_compiled: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def compiled_forward(model, options: bool | dict = True):
    """`torch.compile(model)` with `options` (True: one graph, shapes made dynamic where they change
    between calls: another context's length, another request's input), made once per model and
    options (held beside the model, so that copies of the model do not share it)."""
    options = dict(fullgraph=True) if options is True else dict(options)
    key = tuple(sorted((k, repr(v)) for k, v in options.items()))
    held = _compiled.get(model)
    if held is None or held[0] != key:
        held = _compiled[model] = (key, torch.compile(model, **options))
    return held[1]


@dataclass
class _Stop:
    """When decoding may end early: once one of `tokens` was produced, looked at every `every` tokens."""

    tokens: torch.Tensor | None
    every: int

    def reached(self, out: torch.Tensor, produced: int) -> bool:
        return self.tokens is not None and bool(torch.isin(out[:, :produced], self.tokens).any())


def _generate(model, input_ids, cache, max_new_tokens, cuda_graph, times, gpus, stop: _Stop, forward) -> torch.Tensor:
    device = input_ids.device
    reserve = getattr(cache, "reserve", None)
    past = int(cache.get_seq_length())
    prompt = input_ids.shape[1]
    if prompt <= past:
        raise ValueError(f"the prompt has {prompt} tokens and the cache already holds {past}: nothing to prefill")
    room = cache.layers[0].max_cache_len if isinstance(cache, StaticCache) else None
    if room is not None and room < prompt + max_new_tokens - 1:
        raise ValueError(
            f"the StaticCache holds {room} tokens, fewer than the {prompt + max_new_tokens - 1} this generation "
            "writes: build it with a larger max_cache_len"
        )
    times = times if times is not None else GenerationTimes()

    start = synchronized_clock(gpus)
    logits = model(input_ids=input_ids[:, past:], use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)).logits
    out = torch.empty(1, max_new_tokens, dtype=torch.long, device=device)
    out[:, :1] = logits[:, -1].argmax(-1, keepdim=True)
    times.prefill = synchronized_clock(gpus) - start
    produced = 1
    if max_new_tokens > 1 and not stop.reached(out, 1):
        if reserve is not None:
            reserve(int(cache.get_seq_length()) - past + max_new_tokens - 1)
        try:
            produced = _decode(forward, model, cache, out, prompt, cuda_graph, times, gpus, stop)
        finally:
            if reserve is not None:
                cache.release()
    return torch.cat([input_ids, out[:, :produced]], dim=1)


def _decode(forward, model, cache, out: torch.Tensor, prompt: int, cuda_graph: bool, times: GenerationTimes, gpus,
            stop: _Stop) -> int:
    """Fill out[:, 1:] one token at a time; returns how many tokens of `out` were produced. Every
    tensor the step reads or writes is allocated here, before the capture, so that replays see
    fresh values at the same addresses."""
    device = out.device
    token = out[:, :1].clone()
    position = torch.full((1, 1), prompt, dtype=torch.long, device=device)
    slot = torch.ones(1, dtype=torch.long, device=device)

    def step():
        logits = forward(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(model, cache)).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        out.index_copy_(1, slot, nxt)
        token.copy_(nxt)
        position.add_(1)
        slot.add_(1)

    steps = out.shape[1] - 1
    if not cuda_graph:
        start = synchronized_clock(gpus)
        done = 0
        while done < steps:
            for _ in range(min(stop.every, steps - done)):
                step()
            done = min(done + stop.every, steps)
            if stop.reached(out, 1 + done):
                break
        times.decode, times.decode_tokens = synchronized_clock(gpus) - start, done
        return 1 + done

    # The warm-up step is a real step (token 1): it compiles the kernels and builds the device
    # views of the index outside the capture. Capturing runs the Python of a step without running
    # its kernels, so it produces no token; the replays produce tokens 2 ... steps.
    start = synchronized_clock(gpus)
    # Warm-up and capture on the caller's own stream, or a side one (`graphs.capture_stream`).
    current = torch.cuda.current_stream(device)
    side = graphs.capture_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream(device).wait_stream(side)
    if steps == 1 or stop.reached(out, 2):
        times.capture = synchronized_clock(gpus) - start
        return 2
    # threads of one process may be answering beside this one (`hf-squeeze eval --threads`)
    graph, _ = graphs.capture(step, side)
    times.capture = synchronized_clock(gpus) - start
    start = synchronized_clock(gpus)
    replays = 0  # tokens 2 ... 1 + replays are written
    while replays < steps - 1:
        for _ in range(min(stop.every, steps - 1 - replays)):
            graph.replay()
        replays = min(replays + stop.every, steps - 1)
        if stop.reached(out, 2 + replays):
            break
    times.decode, times.decode_tokens = synchronized_clock(gpus) - start, replays
    if forward is model:  # the Python of a step ran twice (warm-up, capture) for 1 + replays steps run
        _count_replays(cache, replays - 1)
    # (a compiled step counts itself on the device, in the graph too: SparseAttention.compiled_steps)
    return 2 + replays


def _count_replays(cache, replays: int) -> None:
    """Host-side statistics of the squeezed layers see only the eager and captured steps."""
    if replays <= 0:
        return
    for layer in getattr(cache, "layers", []):
        attention = getattr(layer, "attention", None)
        if attention is not None:
            attention.count_replays(replays)
