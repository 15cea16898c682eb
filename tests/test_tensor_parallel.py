"""Tensor parallelism through transformers' tp_plan, on the CPU: two processes (gloo), each holding
half of the KV heads. Each rank builds the index of its own heads from its own prefill (K-means
draws each head's random numbers by its place in the whole model), with no communication inside
attention, and generates the tokens of one process; the model's fingerprint does not depend on the
split (sharded weights are hashed whole)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .conftest import TINY
from .tp_worker import run

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_generate_the_tokens_of_one_process(tmp_path):
    config = dict(TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "model")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    alone = run(str(tmp_path / "model"))
    assert alone["kv_heads"] == 4 and [r["kv_heads"] for r in ranks] == [2, 2]
    assert [r["tokens"] for r in ranks] == [alone["tokens"]] * 2
    assert [r["fingerprint"] for r in ranks] == [alone["fingerprint"]] * 2
