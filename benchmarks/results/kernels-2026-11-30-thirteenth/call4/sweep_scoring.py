"""Times _row_norm_kernel and _aggregate_kernel apart, at many tiles (1,024 tokens over 128K, 8B shape)."""
import itertools, sys
import torch, triton
sys.path.insert(0, "benchmarks")
from bench_kernels import synthetic_index
from hf_squeeze import kernels
from hf_squeeze.kernels import scoring
from hf_squeeze.kernels.common import LOG2E

dev = "cuda" if torch.cuda.is_available() else "cpu"
ctx, tokens = (int(sys.argv[1]), int(sys.argv[2])) if len(sys.argv) > 2 else (131072, 1024)
heads, group, dim = 8, 4, 128
index = synthetic_index(ctx, heads, dim, 0.05, 4, 100, torch.bfloat16, dev)
kindex = kernels.kernel_index(index)
cent, logn = kindex.centroids, kindex.log_counts
C = logn.shape[1]
g = torch.Generator(device=dev).manual_seed(1)
centre = index.centroids[:, torch.randint(C, (group * tokens,), device=dev, generator=g)]
query = (centre.view(heads, group, tokens, dim) + torch.randn(heads, group, tokens, dim, device=dev, generator=g))
query = query.reshape(1, heads * group, tokens, dim).to(torch.bfloat16)
logw = kernels.query_weights(None, 1, tokens, dev)
sq = query.stride()
qk = dim**-0.5 * LOG2E.value
norm = torch.empty(1, heads, group, tokens, device=dev)
logp = torch.empty(1, heads, C, device=dev)

def run_norm(bt, bc, w, s, out=norm):
    scoring._row_norm_kernel[(heads * group, triton.cdiv(tokens, bt))](
        query, cent, logn, out, qk, heads, C, group, tokens, sq[0], sq[1], sq[2],
        D=dim, BLOCK_T=bt, BLOCK_C=bc, PRECISION="tf32", num_warps=w, num_stages=s)

def run_agg(bc, bt, w, s, out=logp):
    scoring._aggregate_kernel[(heads, triton.cdiv(C, bc))](
        query, cent, logn, norm, norm, norm, norm, logw, out, qk, heads, C, C, triton.cdiv(C, bc), group, tokens,
        sq[0], sq[1], sq[2], D=dim, BLOCK_T=bt, BLOCK_C=bc, PRECISION="tf32", HAS_IDS=False, num_warps=w, num_stages=s)

def t(fn):
    if dev == "cpu":
        return float("nan")
    return triton.testing.do_bench(fn, warmup=25, rep=150, return_mode="median") * 1e3

run_norm(128, 64, 4, 3); ref_norm = norm.clone()
run_agg(64, 128, 4, 3); ref_logp = logp.clone()
rows = []
for kind, fn, ref, out in (("norm", run_norm, ref_norm, norm), ("aggregate", run_agg, ref_logp, logp)):
    # norm: (tokens, centroids, warps, stages); aggregate: (centroids, tokens, warps, stages)
    grid = ((64, 128, 256), (32, 64, 128)) if kind == "norm" else ((32, 64, 128), (64, 128, 256))
    for cfg in itertools.product(*grid, (4, 8), (2, 3, 4)):
        if dev == "cpu" and cfg[2:] != (4, 3):
            continue
        try:
            out.fill_(float("nan")); fn(*cfg)
            if dev == "cuda":
                torch.cuda.synchronize()
            ok = torch.allclose(out, ref, rtol=1e-4, atol=1e-3, equal_nan=False)
            us = t(lambda: fn(*cfg))
        except Exception as e:  # out of resources
            print(e)
            us, ok = float("nan"), type(e).__name__
        rows.append((kind, cfg, us, ok)); print(kind, cfg, f"{us:.1f}", ok, flush=True)
print("\n| kernel | tile | us | matches |\n|---|---|---|---|")
for kind in ("norm", "aggregate"):
    best = sorted([r for r in rows if r[0] == kind and r[2] == r[2]], key=lambda r: r[2])[:6]
    for r in best:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]} |")
    d = [r for r in rows if r[0] == kind and r[1] == ((128, 64, 4, 3) if kind == "norm" else (64, 128, 4, 3))]
    print(f"| {kind} default | {d[0][1]} | {d[0][2]:.1f} | {d[0][3]} |")
