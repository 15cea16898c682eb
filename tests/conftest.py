import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import hf_squeeze  # noqa: F401  (registers attn_implementation="squeezed")

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
