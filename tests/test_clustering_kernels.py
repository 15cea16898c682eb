"""The K-means kernels (`clustering/kernels.py`) against their readable reference, `clustering/naive.py`,
and K-means through them against K-means through the reference (Triton's interpreter, in a fresh
process: TRITON_INTERPRET must be set before Triton loads)."""

import pytest

_TRITON_CHECK = """
import torch, torch.nn.functional as F
from hf_squeeze import clustering as C
from hf_squeeze.clustering import kernels as K
from hf_squeeze.clustering import naive
g = torch.Generator().manual_seed(0)
x = F.normalize(torch.randn(2, 300, 24, generator=g), dim=-1)
c = F.normalize(torch.randn(2, 150, 24, generator=g), dim=-1)
labels, best = K.assign(x, c)
ref_labels, ref_best = naive.assign(x, c)
assert torch.equal(labels, ref_labels) and torch.allclose(best, ref_best, atol=1e-5)
lab = torch.randint(7, (2, 300), generator=g)
counts = C._counts(lab, 7)
sums = K.cluster_sums(x, lab.argsort(dim=1, stable=True), F.pad(counts.cumsum(1), (1, 0)))
assert torch.allclose(sums, naive.cluster_sums(x, lab, 7), atol=1e-5)
dist = torch.rand(2, 300, generator=g)
assert torch.allclose(K.seeding_gains(x, c[:, :37], dist), naive.seeding_gains(x, c[:, :37], dist), atol=1e-4)
points = torch.randn(2, 200, 16, generator=g)
a, b = C.kmeans(points, 9, 5, seed=1), C.kmeans(points, 9, 5, seed=1)  # the Triton path (interpreter)
assert torch.equal(a, b)
# a head's clusters do not depend on the heads batched with it (seeding gains split by points only)
seeds = C.head_seeds(2, 1)
assert torch.equal(C.kmeans(points[1:], 9, 5, seed=seeds[1:]), a[1:])
C._use_triton = lambda x: False
ref = C.kmeans(points, 9, 5, seed=1)  # the torch path, same seed
ours, theirs = float(C.cosine_objective(points, a, 9).sum()), float(C.cosine_objective(points, ref, 9).sum())
assert abs(ours - theirs) <= 0.01 * theirs, (ours, theirs)
"""


def test_kmeans_kernels_match_the_reference_in_the_interpreter():
    # The GPU path of kmeans (fused assignment, ordered cluster sums, seeding gains) runs here in
    # Triton's interpreter against clustering/naive.py; whole K-means through it must match the
    # torch path's objective.
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", HF_SQUEEZE_KERNELS="1")
    run = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
