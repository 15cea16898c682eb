"""Time variants of the decode kernels at one shape, replayed from CUDA graphs (a tuning probe)."""

import sys

import torch

from benchmarks.bench_kernels import bench, synthetic_index
from hf_squeeze import kernels
from hf_squeeze.kernels import attention as ka
from hf_squeeze.kernels import lookup as kl

ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
dev = torch.device("cuda")
index = synthetic_index(ctx, 8, 128, 0.05, 4, 100, torch.bfloat16, dev)
kindex = kernels.kernel_index(index)
q = torch.randn(1, 32, 1, 128, device=dev, dtype=torch.bfloat16)
stats = torch.zeros(1, dtype=torch.int64, device=dev)
rows = index.keys.shape[1]
for warps in (4, 8, 16):
    kl.SELECT_WARPS = warps
    for name, thr, budget in (("budget", None, round(0.1 * rows)), ("threshold", -9.0, None)):
        t = bench(lambda: kernels.lookup(q, kindex, 0.088, thr, budget, None, stats), graph=True)
        print(f"lookup select_warps={warps:2d} {name:9s}: {t:7.1f} us")
kl.SELECT_WARPS = 8

work = kernels.lookup(q, kindex, 0.088, None, round(0.1 * rows), None, stats)
dk = torch.randn(1, 8, 65, 128, device=dev, dtype=torch.bfloat16)
for pieces in (1, 2, 4):
    for warps in (2, 4):
        for stages in (1,):
            for splits in (32, 64, 128):
                ka.DECODE_PIECES, ka.DECODE_WARPS, ka.DECODE_STAGES = pieces, warps, stages
                t = bench(lambda: kernels.sparse_attention(q, dk, dk, kindex, work, 0.088, splits=splits), graph=True)
                print(f"decode pieces={pieces} warps={warps} stages={stages} splits={splits:3d}: {t:7.1f} us")
