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
    lines = [line.removeprefix("compiled ") for line in done.stdout.splitlines()]
    chained = {line.removesuffix(" (chained)"): line.endswith(" (chained)") for line in lines}
    assert len(chained) == 27 and "decode pins=False kvalid=True" in chained, done.stdout
    assert "aggregate ids=True" in chained and "_mixed_norm_kernel" in chained
    assert "select budget=True ids=False clusters=8192" in chained
    assert "prefill at the default tile" in chained and "_row_norm_kernel at the default tile" in chained
    assert "_aggregate_kernel at the default tile" in chained
    assert "prefill lse=True splits=2 context=True" in chained and "key weights weighted=True" in chained
    # every kernel of a lookup and its attention compiles in its chained form (programmatic dependent
    # launch; the launchers chain all but a prefill's gather and attention, `attention.CHAIN_PREFILL`)
    assert [name for name, yes in chained.items() if not yes] == ["key weights weighted=False", "key weights weighted=True"]


def test_kernels_are_chained_on_gpus_that_can(monkeypatch):
    """Programmatic dependent launch where the device has it (compute capability 9.0+), unless
    HF_SQUEEZE_PDL=0 or the launcher leaves a kernel out; never on the CPU (the interpreter)."""
    import torch

    from hf_squeeze.kernels import common

    gpu = torch.device("cuda", 0)
    unchained = {"CHAIN": False, "enable_fp_fusion": True}
    assert common.launch_options(torch.device("cpu")) == unchained
    monkeypatch.setattr(common, "_pdl_device", lambda index: index == 0)
    assert common.launch_options(gpu) == {"CHAIN": True, "launch_pdl": True, "enable_fp_fusion": True}
    assert common.launch_options(gpu, chain=False) == unchained
    assert common.launch_options(torch.device("cuda", 1)) == unchained  # an older GPU
    monkeypatch.setattr(common, "PDL", False)  # HF_SQUEEZE_PDL=0
    assert common.launch_options(gpu) == unchained


def test_kernels_run_unchained_on_a_triton_without_grid_dependency_control():
    """Triton before 3.4 has no `gdc_wait`: the package still imports, nothing is chained, and a lookup
    runs (here under the interpreter, in a process where triton lacks the two functions)."""
    code = """
import sys
import triton.language.extra.cuda
cuda = sys.modules["triton.language.extra.cuda"]  # (the module `from ... import` reads)
del cuda.gdc_wait, cuda.gdc_launch_dependents
import torch
from hf_squeeze.kernels import common, naive
assert common.gdc_wait is None and common.PDL is False
assert common.launch_options(torch.device("cuda", 0)) == {"CHAIN": False, "enable_fp_fusion": True}
from tests.kernel_cases import FLAT_RULES, make_index, make_inputs, run_lookup
index = make_index()
query, _, _ = make_inputs(index, 3, 5, dyn_len=5)
ranges, _, _ = run_lookup(index, FLAT_RULES["budget"], query, 0.125)
assert torch.equal(ranges.keep.bool(), naive.lookup(query, index, 0.125, FLAT_RULES["budget"]))
print("ran unchained")
"""
    env = dict(os.environ, TRITON_INTERPRET="1", HF_SQUEEZE_KERNELS="1")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ran unchained" in done.stdout, done.stderr[-3000:]
