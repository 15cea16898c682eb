"""What a compiled decode step checks before it runs: dynamo's guards, squeezed vs StaticCache.

Every call of a compiled step first evaluates its guards (one per tensor, attribute and type the
trace read, in C++) on the host; through `model.generate` that happens once per token, before the
CUDA graph is replayed. Each tensor a step reads from the cache costs six guards. This traces one
decode step of a random Llama with `--layers` layers (tiny dimensions: the guards do not depend
on them) with a dense StaticCache and with a squeezed fork (the kernels path: on the CPU set
TRITON_INTERPRET=1 HF_SQUEEZE_KERNELS=1), and times the guard check alone (the best of 7 x 1000).

    TRITON_INTERPRET=1 HF_SQUEEZE_KERNELS=1 PYTHONPATH=. python3 benchmarks/compile_guards.py

(It reads the guards through dynamo's debugging hook `_debug_get_cache_entry_list`.)
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time

import torch
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs

TINY = dict(vocab_size=256, hidden_size=96, intermediate_size=128, head_dim=16, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=4096)


def guard_check(model, cache, token, position) -> dict:
    """Compile one decode step (dynamo, no backend compiler) and time its guard check."""
    torch._dynamo.reset()

    def step(cache, token, position):
        return model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(model, cache)).logits

    torch.compile(step, backend="aot_eager", fullgraph=True)(cache, token, position)
    manager = _debug_get_cache_entry_list(step.__code__)[0].guard_manager
    f_locals = {"cache": cache, "token": token, "position": position, "model": model}  # (the step reads `model` from its closure)
    if not manager.check(f_locals):
        raise RuntimeError(f"the step's guards fail on its own inputs: {manager.check_verbose(f_locals)}")
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(1000):
            manager.check(f_locals)
        times.append((time.perf_counter() - start) / 1000 * 1e6)
    kinds = collections.Counter(re.findall(r"\+- ([A-Z_]+):", str(manager)))
    return dict(guards=sum(kinds.values()), tensors=kinds["TENSOR_MATCH"], check_us=min(times))


@torch.no_grad()
def main(args) -> int:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, num_hidden_layers=args.layers)).eval().to(args.device)
    context = torch.randint(3, 256, (args.context,), generator=torch.Generator().manual_seed(1)).to(args.device)
    ids = torch.cat([context, context[:8]])[None]
    results = {}

    model.set_attn_implementation("sdpa")
    static = StaticCache(config=model.config, max_cache_len=ids.shape[1] + 16)
    token = model(ids, **cache_kwargs(model, static)).logits[:, -1:].argmax(-1)
    position = torch.tensor([[ids.shape[1]]], device=args.device)
    results["dense StaticCache"] = guard_check(model, static, token, position)

    model.set_attn_implementation("squeezed")
    fork = SqueezedCache.from_context(model, context, SqueezeConfig(keep=0.2), progress=False).fork()
    token = model(ids[:, context.numel():], **cache_kwargs(model, fork)).logits[:, -1:].argmax(-1)
    fork.reserve(fork.layers[0].length + 16)  # what generate's plan does once the input is read
    results["squeezed fork"] = guard_check(model, fork, token, position)

    print(f"| decode step, {args.layers} layers ({args.device}) | guards | tensors checked | guard check us |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['guards']} | {r['tensors']} | {r['check_us']:.1f} |")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--context", type=int, default=120)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    sys.exit(main(parser.parse_args()))
