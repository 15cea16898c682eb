"""The attention kernels (and the pins' key weights, the selection, a prefill's scoring) compile for a GPU (sm_90), not only run under the interpreter.

The interpreter runs what a launch reaches; the compiler also types the code that a launch never
reaches (a loop over no pinned keys still loads from the placeholder pointers it was given). Each
kernel is compiled, without a GPU, in the variants the launcher passes (tests/compile_kernels.py).
"""

import os
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def test_attention_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_kernels"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = done.stdout.splitlines()
    assert len(compiled) == 27 and "compiled decode pins=False kvalid=True" in compiled, done.stdout
    assert "compiled aggregate ids=True" in compiled and "compiled _mixed_norm_kernel" in compiled
    assert "compiled select budget=True ids=False clusters=8192" in compiled
    assert "compiled prefill at the default tile" in compiled and "compiled _row_norm_kernel at the default tile" in compiled
    assert "compiled _aggregate_kernel at the default tile" in compiled
    assert "compiled prefill lse=True splits=2 context=True" in compiled and "compiled key weights weighted=True" in compiled
