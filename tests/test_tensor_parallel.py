"""Tensor parallelism through transformers' tp_plan, on the CPU: two processes (gloo), each holding
half of the KV heads. Each rank builds the index of its own heads from its own prefill (K-means
draws each head's random numbers by its place in the whole model), with no communication inside
attention, and generates the tokens of one process (eager and compiled decode steps); the model's fingerprint does not depend on the
split (sharded weights are hashed whole); one saved file serves both (the ranks gather their heads
into it; each rank loads its slice)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hf_squeeze import SqueezeConfig, SqueezedCache

from .conftest import TINY, tiny_model
from .tp_worker import CONTEXT, answer, run

ROOT = Path(__file__).resolve().parent.parent


def test_two_ranks_generate_the_tokens_of_one_process(tmp_path):
    config = dict(TINY, hidden_size=128, num_attention_heads=8, num_key_value_heads=4, head_dim=16)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp_path / "model")
    alone = run(str(tmp_path / "model"), str(tmp_path), "one")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "tp_worker.py"), str(tmp_path / "model"), str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert alone["kv_heads"] == 4 and [r["kv_heads"] for r in ranks] == [2, 2]
    assert [r["fingerprint"] for r in ranks] == [alone["fingerprint"]] * 2
    for rank in ranks:  # built, loaded from the gathered file, loaded from one process's file
        assert rank["tokens"] == rank["from tp"] == rank["from one"] == alone["tokens"]
        assert rank["compiled"] == alone["compiled"] == alone["tokens"]  # the compiled decode steps too
        assert rank["heads from tp"] == rank["heads from one"] == 2
    # the gathered file, loaded by one process, holds every head and answers alike
    model = LlamaForCausalLM.from_pretrained(tmp_path / "model", attn_implementation="squeezed").eval()
    whole = SqueezedCache.load(tmp_path / "tp.squeeze", model, progress=False)
    assert whole.layers[0].index.keys.shape[0] == 4
    assert answer(model, whole) == alone["tokens"]


def test_a_split_that_cuts_heads_is_refused(tmp_path):
    """A file loaded by a tensor-parallel rank that would hold part of a KV head is refused."""
    model = tiny_model("llama")  # 2 KV heads
    path = SqueezedCache.from_context(model, CONTEXT[:300], SqueezeConfig(keep=0.3), progress=False).save(
        tmp_path / "c.squeeze", progress=False)
    model._tp_size = 4
    with pytest.raises(ValueError, match="cannot split its 2 KV heads evenly"):
        SqueezedCache.load(path, model, progress=False)
