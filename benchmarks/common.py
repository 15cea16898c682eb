"""What the benchmarks share: model shapes with random weights, timing on the GPU, the two ways a
request is generated (model.generate, generate_greedy), and the dense caches of the baselines."""

from __future__ import annotations

import gc
import os
import statistics
import time
from typing import NamedTuple

import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig, LogitsProcessor, LogitsProcessorList, StaticCache

from hf_squeeze import SqueezedCache, cache_kwargs, generate_greedy
from hf_squeeze.generation import GenerationTimes


SHAPES = {
    # Llama-3.1-8B: 32 layers, hidden 4096, 32 query / 8 KV heads of 128, MLP 14336, vocab 128256.
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # Qwen2.5-0.5B's dimensions (the RULER runs' model, without its q/k/v biases): 24 layers, hidden
    # 896, 14 query / 2 KV heads of 64, MLP 4864, vocab 151936.
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0),
    # A small model of the same family, for trying the script on a CPU.
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, rope_theta=500000.0),
}


def random_model(shape: str, max_tokens: int, dtype: torch.dtype, device: str, seed: int = 0):
    """A Llama-architecture model with random weights (the init of transformers) on `device`."""
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_tokens, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="squeezed")
    return model.eval()


class StepClock(LogitsProcessor):
    """Marks the wall-clock time (device synchronised) and allocated memory at each generated token."""

    def __init__(self, device):
        self.device, self.marks, self.memory = device, [], []

    def __call__(self, input_ids, scores):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.memory.append(torch.cuda.memory_allocated(self.device))
        self.marks.append(time.perf_counter())
        return scores


def memory_start(device) -> int:
    gc.collect()
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device, before: int) -> tuple[float, float]:
    if device.type != "cuda":
        return float("nan"), float("nan")
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**30, (peak - before) / 2**30


class Timing(NamedTuple):
    """One timed request: seconds to the first token, per later token (the mean: what a request's
    answer takes per token, its one-off steps included) and per later token in steady state (the
    median step; nan where not timed step by step), memory growth per step after the second
    (bytes), the tokens."""
    ttft: float
    tpot: float
    tpot_median: float
    growth: float
    out: torch.Tensor


def run_eager(model, ids, cache, new_tokens: int) -> Timing:
    """model.generate with transformers' compile path off (a squeezed fork is compileable by default)."""
    return timed_generate(model, ids, cache, new_tokens, disable_compile=True)


def run_eager_ungraphed(model, ids, cache, new_tokens: int) -> Timing:
    """`run_eager` with each squeezed layer's decode step launched kernel by kernel, not replayed as a
    CUDA graph (HF_SQUEEZE_STEP_GRAPHS=0, kernels/graphs.py): what the step graphs save."""
    before = os.environ.get("HF_SQUEEZE_STEP_GRAPHS")
    os.environ["HF_SQUEEZE_STEP_GRAPHS"] = "0"
    try:
        return run_eager(model, ids, cache, new_tokens)
    finally:
        if before is None:
            del os.environ["HF_SQUEEZE_STEP_GRAPHS"]
        else:
            os.environ["HF_SQUEEZE_STEP_GRAPHS"] = before


def timed_generate(model, ids, cache, new_tokens: int, **generate) -> Timing:
    """model.generate (with `generate`'s extra arguments), timed token by token."""
    clock = StepClock(ids.device)
    start = time.perf_counter()
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, logits_processor=LogitsProcessorList([clock]), **generate)
    marks = clock.marks
    steps = [b - a for a, b in zip(marks, marks[1:])] or [float("nan")]
    growth = (clock.memory[-1] - clock.memory[1]) / max(1, len(clock.memory) - 2) if len(clock.memory) > 2 else 0.0
    return Timing(marks[0] - start, statistics.fmean(steps), statistics.median(steps), growth, out)


def run_graph(model, ids, cache, new_tokens: int, compile: bool = False) -> Timing:
    times = GenerationTimes()
    out = generate_greedy(model, ids, cache, new_tokens, times=times, compile=compile)
    return Timing(times.prefill, times.per_token, float("nan"), 0.0, out)  # replays allocate nothing (one graph pool)


def run_compiled(model, ids, cache, new_tokens: int) -> Timing:
    """model.generate through transformers' compile path with its default CompileConfig (a squeezed
    fork is compileable by default; dense: give it a StaticCache). On a CPU transformers runs it eagerly."""
    return timed_generate(model, ids, cache, new_tokens)


def run_graph_compiled(model, ids, cache, new_tokens: int) -> Timing:
    """generate_greedy with its decode step compiled before the capture."""
    return run_graph(model, ids, cache, new_tokens, compile=True)


def dense_caches(squeezed: SqueezedCache, model, room: int):
    """The context's K/V (the same as the squeezed index holds) as a DynamicCache and a StaticCache.
    `static(reuse=True)` writes the context again into one StaticCache kept for those calls, as
    transformers reuses its own: the same addresses, so a compiled step is not recorded again."""
    def layer_kv(index):
        keys = torch.cat([index.dense_keys, index.keys], dim=1)[None]
        values = torch.cat([index.dense_values, index.values], dim=1)[None]
        return keys, values  # attention does not depend on the order of the keys

    def dynamic():
        cache = DynamicCache()
        for i, index in enumerate(squeezed.fixed.layers):
            cache.update(*layer_kv(index), i)
        return cache

    kept = []  # the StaticCache of `static(reuse=True)`

    def static(reuse: bool = False):
        if reuse and kept:
            cache = kept[0]
            cache.reset()
        else:
            cache = StaticCache(config=model.config, max_cache_len=room)
            if reuse:
                kept.append(cache)
        for i, index in enumerate(squeezed.fixed.layers):
            cache.update(*layer_kv(index), i)
        return cache

    return dynamic, static


def gpu_time(fn, graph: bool = True) -> float:
    """Median microseconds of `fn` on the GPU, replayed from a CUDA graph when `graph`."""
    import triton

    if graph:
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e3


def dense_attention_time(q, k, v) -> float:
    """The faster of SDPA's cuDNN and flash backends over all keys (GQA, no mask: the queries are
    the last tokens; for a prefill this counts the few masked-out pairs too), microseconds."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
        def run(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            times.append(gpu_time(run))
        except RuntimeError:  # a backend may refuse a shape
            pass
    return min(times)


def common_prefix(a: list, b: list) -> int:
    same = 0
    while same < min(len(a), len(b)) and a[same] == b[same]:
        same += 1
    return same
