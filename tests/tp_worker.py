"""One rank of tests/test_tensor_parallel.py: `torchrun --nproc_per_node N tests/tp_worker.py MODEL_DIR OUT`.

Loads the model with transformers' tensor parallelism (tp_plan="auto"; gloo on the CPU), builds a
squeezed cache over a fixed context, generates, and writes what the test compares to OUT/rank-R.json.
"""

import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import hf_squeeze  # noqa: F401
from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.integrations.fingerprint import model_fingerprint

CONTEXT = torch.randint(3, 256, (600,), generator=torch.Generator().manual_seed(1))
QUESTION = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2))


def run(model_dir: str, **load) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="squeezed", **load).eval()
    cache = SqueezedCache.from_context(model, CONTEXT, SqueezeConfig(keep=0.3), progress=False)
    ids = torch.cat([CONTEXT, QUESTION])[None]
    out = model.generate(ids, **cache_kwargs(model, cache.fork()), max_new_tokens=8, do_sample=False)
    return dict(tokens=out[0, ids.shape[1]:].tolist(), kv_heads=cache.layers[0].index.keys.shape[0],
                fingerprint=model_fingerprint(model)["weights_sha256"])


if __name__ == "__main__":
    result = run(sys.argv[1], tp_plan="auto")
    Path(sys.argv[2], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(result))
