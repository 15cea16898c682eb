"""The examples run as users run them (a fresh interpreter, the embedded model, on the CPU), and the
README shows them as they are."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart(tmp_path):
    out = run_example("quickstart.py", str(tmp_path))
    assert (tmp_path / "essay.squeeze").is_file()
    answer = next(line for line in out.splitlines() if line.startswith("A: "))
    assert "7351" in answer, out
    stats = ast.literal_eval(out.strip().splitlines()[-1])  # the request's statistics, not the parent's
    assert stats["selections"] > 0 and stats["dynamic_tokens"] > 0
    assert abs(stats["attended_fraction"] - 0.3) < 0.05


def test_prepare_save_load_ask(tmp_path):
    out = run_example("prepare_save_load_ask.py", str(tmp_path))
    assert (tmp_path / "doc.squeeze").is_file() and (tmp_path / "api.squeeze").is_file()
    answers = [line for line in out.splitlines() if line.startswith("A: ")]
    assert len(answers) == 2 and "7351" in answers[0], out


def test_batch_of_questions():
    out = run_example("batch_of_questions.py")
    rows = [line for line in out.splitlines() if " -> " in line]
    assert len(rows) == 6  # three questions, two samples each
    assert any("7351" in line for line in rows[:2]), out


def test_several_gpus_smoke_path():
    """GPU-only example; its CPU smoke path runs the same steps on one device."""
    out = run_example("several_gpus.py", "--cpu-smoke")
    assert "layers per device: {'cpu': 30}" in out and "A: " in out


def test_readme_shows_the_quickstart_as_it_is():
    code = (ROOT / "examples" / "quickstart.py").read_text()
    body = code.split('"""', 2)[2].strip()  # without the module docstring
    assert body in (ROOT / "README.md").read_text()


def test_tensor_parallel(tmp_path):
    """Two gloo ranks on the CPU (a tiny model with 4 KV heads): every rank answers alike, built and loaded."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import TINY

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**dict(TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=16))).save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-W", "error::FutureWarning", "-m", "torch.distributed.run", "--standalone",
         "--nproc_per_node", "2", str(ROOT / "examples" / "tensor_parallel.py"), str(tmp_path / "model"),
         str(tmp_path), "--tokens", "600"],
        capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers = re.findall(r"rank \d (?:built|loaded): (\[[0-9, ]*\])", done.stdout)  # the ranks' lines interleave
    assert len(answers) == 4 and len(set(answers)) == 1, done.stdout
    assert (tmp_path / "context.squeeze").is_file() and "rank 0: 2 of 4 KV heads" in done.stdout
