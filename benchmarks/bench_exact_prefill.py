"""The default's exact input prefill, per layer: where its time goes, and which path reads the context.

The default (`SqueezeConfig(prefill="exact", pin=0.5)`) reads every key of the fixed context once per
request for the input's attention, then finds the pins' key weights (each clustered key's exact
attention probability summed over the input: `kernels.key_weights`). The clustered keys are read
through torch's fused attention from `kernels.read_all.MIN_ROWS` query rows per KV head, and by our
prefill kernel below. Per layer, Llama-3.1-8B attention shape (32 query heads, 8 KV heads, head dim
128), bf16, batch 1, the index of `bench_kernels.synthetic_index`; CUDA-graph replays (median):

1. per input length: `kernels.attend` under the exact rule (with the log-sum-exp the pins need) with
   the clustered keys read by the prefill kernel and by the fused path; their largest difference;
2. at the longest input: the pieces against dense SDPA (GQA, all keys) and each fused operator on
   the folded queries (what `read_all` runs), with TFLOP/s of the attention's work;
3. with `--sweep`: the key weights kernel's tiles, warps and pipelining.

    PYTHONPATH=. python3 benchmarks/bench_exact_prefill.py --context 131072 --sweep
"""

from __future__ import annotations

import argparse
import itertools

import torch

from bench_kernels import synthetic_index
from common import gpu_time
from hf_squeeze import kernels
from hf_squeeze.kernels import pins, read_all
from hf_squeeze.selection import SelectionRule

HEADS, GROUP, DIM = 8, 4, 128


def prefill_inputs(kindex, tokens: int):
    """An exact prefill of `tokens` random input tokens: a function running it (the clustered keys
    read by the prefill kernel, or by the fused path), its queries and its log-sum-exp buffer."""
    dev, dtype = kindex.keys.device, kindex.keys.dtype
    q = torch.randn(1, HEADS * GROUP, tokens, DIM, device=dev, dtype=dtype)
    dyn_k = torch.randn(1, HEADS, tokens, DIM, device=dev, dtype=dtype)
    dyn_v = torch.randn_like(dyn_k)
    lse = torch.empty(1, HEADS, tokens * GROUP, device=dev)
    stats = torch.zeros(1, dtype=torch.int64, device=dev)
    rule = SelectionRule(exact=True)

    def run(fused: bool):
        read_all.MIN_ROWS = 1 if fused else 1 << 30
        return kernels.attend(q, dyn_k, dyn_v, kindex, rule, DIM**-0.5, None, None, stats, lse=lse)

    return run, q, dyn_k, dyn_v, lse


def paths(kindex, tokens: int) -> tuple[float, float, float]:
    """Microseconds of the exact prefill with the prefill kernel reading the context, then the fused
    path, and the largest difference of their outputs."""
    run = prefill_inputs(kindex, tokens)[0]
    outs = [run(fused).float() for fused in (False, True)]
    times = [gpu_time(lambda fused=fused: run(fused)) for fused in (False, True)]
    return times[0], times[1], (outs[0] - outs[1]).abs().max().item()


def pieces(index, kindex, tokens: int, scaling: float) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    run, q, dyn_k, dyn_v, lse = prefill_inputs(kindex, tokens)
    found = {}
    for name, fused in (("exact prefill, prefill kernel reads the context", False), ("exact prefill, fused path", True)):
        found[name] = gpu_time(lambda fused=fused: run(fused))
    found["pins' key weights"] = gpu_time(lambda: kernels.key_weights(q, kindex, lse, scaling))
    all_k = torch.cat([torch.cat([index.dense_keys, index.keys], 1)[None], dyn_k], 2)
    all_v = torch.cat([torch.cat([index.dense_values, index.values], 1)[None], dyn_v], 2)
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, all_k, all_v, enable_gqa=True)

        found[f"dense SDPA {name}, GQA, all keys (no lse)"] = gpu_time(dense)
    rows = read_all._folded(q, HEADS)
    keys, values = kindex.keys[None], kindex.values[None]
    for name, (operator, _) in read_all._OPERATORS.items():
        found[f"{name} on the folded queries (+lse)"] = gpu_time(lambda op=operator: op(rows, keys, values, scaling))
    return found


def sweep(kindex, tokens: int, scaling: float) -> list[tuple]:
    run, q, _, _, lse = prefill_inputs(kindex, tokens)
    run(fused=True)  # the rows' log-sum-exp
    default = (pins.BLOCK_N, pins.BLOCK_T, pins.WARPS, pins.STAGES)
    reference = kernels.key_weights(q, kindex, lse, scaling).clone()
    rows = []
    for config in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (1, 2, 3)):
        pins.BLOCK_N, pins.BLOCK_T, pins.WARPS, pins.STAGES = config
        got = kernels.key_weights(q, kindex, lse, scaling)
        err = ((got - reference).abs().max() / reference.abs().max()).item()
        rows.append((gpu_time(lambda: kernels.key_weights(q, kindex, lse, scaling)), *config, err))
    pins.BLOCK_N, pins.BLOCK_T, pins.WARPS, pins.STAGES = default
    return sorted(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=131072)
    parser.add_argument("--inputs", type=int, nargs="+", default=[8, 32, 64, 128, 256, 1024])
    parser.add_argument("--sweep", action="store_true", help="also sweep the key weights kernel's configuration")
    args = parser.parse_args()
    index = synthetic_index(args.context, HEADS, DIM, 0.05, 4, 100, torch.bfloat16, "cuda")
    kindex = kernels.kernel_index(index)
    scaling = DIM**-0.5
    default_rows = read_all.MIN_ROWS
    print(f"{torch.cuda.get_device_name()}, context {args.context}, bf16, per layer (8 KV heads, G = {GROUP})")
    print("\n| input tokens | rows per KV head | prefill kernel us | fused path us | fused / kernel | max diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for tokens in args.inputs:
        kernel_us, fused_us, diff = paths(kindex, tokens)
        print(f"| {tokens} | {tokens * GROUP} | {kernel_us:.1f} | {fused_us:.1f} | {fused_us / kernel_us:.2f} | {diff:.1e} |")
    tokens = max(args.inputs)
    flop = 4 * HEADS * GROUP * tokens * args.context * DIM
    print(f"\n{tokens} input tokens: | piece | us | TFLOP/s of the attention's work |\n| --- | --- | --- |")
    for name, us in pieces(index, kindex, tokens, scaling).items():
        print(f"| {name} | {us:.1f} | {flop / us / 1e6:.0f} |")
    read_all.MIN_ROWS = default_rows
    if args.sweep:
        print("\nkey weights: | us | BLOCK_N | BLOCK_T | warps | stages | max rel. diff |\n| --- | --- | --- | --- | --- | --- |")
        rows = sweep(kindex, tokens, scaling)
        default = (pins.BLOCK_N, pins.BLOCK_T, pins.WARPS, pins.STAGES)
        for row in rows[:8] + [r for r in rows[8:] if r[1:5] in (default, (64, 64, 4, 3))]:
            print("| %.1f | %d | %d | %d | %d | %.1e |" % row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
