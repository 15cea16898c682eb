import os
import sys
from pathlib import Path

import pytest
import torch

# The de-quantised copy of the embedded GGUF model (hf_squeeze/assets.py) is kept with the test
# environment, not in the user's cache; the examples and commands run by the tests inherit it.
os.environ.setdefault("HF_SQUEEZE_CACHE", str(Path(sys.prefix) / "hf_squeeze-cache"))

if not torch.cuda.is_available():  # Triton kernels run in the interpreter; set before they are defined
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_bf16_dot():
    """Triton's CPU interpreter stores bfloat16 as uint16 and its `tl.dot` multiplies those raw
    bits; widen bfloat16 operands to float32 first so bf16 kernels can be tested on the CPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype.scalar != tl.bfloat16:
            return x
        data = interpreter._convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32)
        return interpreter.TensorHandle(data, tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpreter_bf16_dot()
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_squeeze  # noqa: F401  (registers attn_implementation="squeezed")
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs

TINY = dict(
    vocab_size=256,
    hidden_size=96,
    intermediate_size=128,
    head_dim=16,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,  # GQA: 3 query heads per KV head
    max_position_embeddings=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)


def tiny_model(kind: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**TINY))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**TINY))
    model.set_attn_implementation("squeezed")
    return model.eval()


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture
def context():
    return torch.randint(3, 256, (600,), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def smollm2():
    from hf_squeeze import load_default_model

    return load_default_model()


@pytest.fixture
def saved(llama, context, tmp_path):
    """A keep=0.2 cache of `context` for the tiny Llama, and the file it was saved to."""
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.2), progress=False)
    return cache, cache.save(tmp_path / "ctx.squeeze")


# The paper's online step (a lookup for the input's prefill too, nothing pinned): for tests of the
# lookup's own machinery, whose reads must track `keep` at every step.
PAPER = dict(prefill="lookup", pin=0.0)

QUESTION = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2))


def full_prompt(context, question=QUESTION):
    return torch.cat([context, question])[None]


def generate(model, ids, cache, **kwargs):
    """Greedy `model.generate` with `cache`, under the installed transformers' name of the argument."""
    kwargs.setdefault("max_new_tokens", 10)
    kwargs.setdefault("do_sample", False)
    return model.generate(ids, **cache_kwargs(model, cache), **kwargs)
