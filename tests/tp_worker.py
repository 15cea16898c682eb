"""One rank of tests/test_tensor_parallel.py: `torchrun --nproc_per_node N tests/tp_worker.py MODEL_DIR OUT`.

Loads the model with transformers' tensor parallelism (tp_plan="auto"; gloo on the CPU), builds a
squeezed cache over a fixed context, generates (eagerly and through transformers' compile path), saves the cache (gathered: one file for any split),
loads it back and the file one process saved (OUT/one.squeeze), generates with each, and writes what
the test compares to OUT/rank-R.json. Without torchrun, `run` does the same in one process.
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


def answer(model, cache, **generate) -> list[int]:
    ids = torch.cat([CONTEXT, QUESTION])[None]
    out = model.generate(ids, **cache_kwargs(model, cache.fork()), max_new_tokens=8, do_sample=False, **generate)
    return out[0, ids.shape[1]:].tolist()


def compiled_answer(model, cache) -> list[int]:
    """The answer through transformers' compile path (what `generate` takes on a GPU), forced on the
    CPU with a backend that runs the traced graph as is."""
    from transformers import CompileConfig

    config = CompileConfig(backend="aot_eager", fullgraph=True)
    config._compile_all_devices = True
    return answer(model, cache, compile_config=config)


def run(model_dir: str, out: str, name: str, **load) -> dict:
    """Build, answer, save as OUT/NAME.squeeze; answer from the other saved files found in OUT."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="squeezed", **load).eval()
    cache = SqueezedCache.from_context(model, CONTEXT, SqueezeConfig(keep=0.3), progress=False)
    result = dict(tokens=answer(model, cache), compiled=compiled_answer(model, cache),
                  kv_heads=cache.layers[0].index.keys.shape[0],
                  fingerprint=model_fingerprint(model)["weights_sha256"])
    saved = cache.save(Path(out) / f"{name}.squeeze", progress=False)
    for path in sorted(Path(out).glob("*.squeeze")):
        loaded = SqueezedCache.load(path, model, progress=False)
        result[f"from {path.stem}"] = answer(model, loaded)
        result[f"heads from {path.stem}"] = loaded.layers[0].index.keys.shape[0]
    result["saved"] = str(saved)
    return result


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2], "tp", tp_plan="auto")
    Path(sys.argv[2], f"rank-{os.environ['RANK']}.json").write_text(json.dumps(result))
