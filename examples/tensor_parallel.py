"""Tensor parallel: every process holds a slice of the model's KV heads (transformers' tp_plan),
builds its slice of the squeezed index from its own prefill, answers with no communication inside
attention, and the ranks save one file that any split (or one process) loads.

    torchrun --nproc_per_node N examples/tensor_parallel.py MODEL_DIR OUT_DIR [--tokens T]

N must divide the model's KV heads. On GPUs each process takes one (NCCL); on the CPU, gloo. Every
rank prints the same answer; rank 0 prints the file it wrote.
"""

import argparse
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_squeeze  # noqa: F401  (registers attn_implementation="squeezed")
from hf_squeeze import SqueezedCache, SqueezeConfig

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", help="a Hugging Face model folder")
parser.add_argument("out", help="where the cache file goes")
parser.add_argument("--tokens", type=int, default=2000, help="context length in tokens (random ids)")
args = parser.parse_args()

model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="squeezed", tp_plan="auto").eval()
rank = int(os.environ.get("RANK", 0))
heads = model.config.num_key_value_heads
print(f"rank {rank}: {heads // (model.tp_size or 1)} of {heads} KV heads")

g = torch.Generator().manual_seed(0)
context = torch.randint(3, model.config.vocab_size, (args.tokens,), generator=g)
question = torch.randint(3, model.config.vocab_size, (16,), generator=g)
ids = torch.cat([context, question])[None].to(model.device)

cache = SqueezedCache.from_context(model, context.to(model.device), SqueezeConfig(keep=0.1))
path = cache.save(Path(args.out) / "context.squeeze")  # gathered: rank 0 writes every head
loaded = SqueezedCache.load(path, model)  # each rank reads its own heads
for name, request in (("built", cache.fork()), ("loaded", loaded.fork())):
    out = model.generate(ids, cache=request, max_new_tokens=8, do_sample=False)
    print(f"rank {rank} {name}: {out[0, ids.shape[1]:].tolist()}")
if rank == 0:
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
