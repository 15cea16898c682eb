"""Compile the attention kernels (and the pins' key weights, the selection, a prefill's scoring) for a GPU (sm_90) without one: `python -m tests.compile_kernels`.

Run by tests/test_kernels_compile.py in a process of its own, since the test session's kernels are
the interpreter's. Prints one line per variant compiled; exits non-zero on the first failure.
"""

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret (before the kernels are defined)

import triton
from triton.backends.compiler import GPUTarget

from hf_squeeze.kernels import attention, scoring
from hf_squeeze.kernels.attention import _decode_kernel, _merge_kernel, _prefill_kernel
from hf_squeeze.kernels.pins import _key_weights_kernel
from hf_squeeze.kernels.scoring import _aggregate_kernel, _mixed_norm_kernel, _row_norm_kernel
from hf_squeeze.kernels.selection import _select_kernel

SM90 = GPUTarget("cuda", 90, 32)
BF16 = "*bf16"
FLOATS = ("scaling", "qk_scale", "threshold")  # the kernels' float scalar arguments


def compile_for_gpu(kernel, types: dict, constexprs: dict, options: dict | None = None):
    """Compile `kernel` for SM90: `types` per pointer or float argument (the others are int32);
    `options`: num_warps, num_stages."""
    names = kernel.arg_names
    if "CHAIN" in names:  # on sm_90 the launchers chain these kernels (programmatic dependent launch)
        constexprs = {"CHAIN": True, **constexprs}
    # pointers and float scalars must be typed (a renamed argument would otherwise compile as an int)
    untyped = [n for n in names if n not in constexprs and n not in types and (n.endswith("_ptr") or n in FLOATS)]
    assert not untyped, f"{kernel.fn.__name__}: no type given for {untyped}"
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in names}
    source = triton.compiler.ASTSource(
        fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    return triton.compile(source, target=SM90, options={"enable_fp_fusion": True, **(options or {})})  # as launched


def common_types(**extra):
    types = {n: BF16 for n in ("q_ptr", "k_ptr", "v_ptr", "dk_ptr", "dv_ptr", "yk_ptr", "yv_ptr", "out_ptr")}
    types.update(po_ptr="*fp32", plse_ptr="*fp32", qk_scale="fp32", kvalid_ptr="*i1", **extra)  # (or *i8)
    return types


def variants():
    for pins in (False, True):
        # without pins the launcher passes the output (bf16) for the three pin pointers
        pin_types = dict(pin_rows_ptr="*i32", pin_count_ptr="*i32", pin_mask_ptr="*i8") if pins else dict(
            pin_rows_ptr=BF16, pin_count_ptr=BF16, pin_mask_ptr=BF16)
        for kvalid in (False, True):
            # counters: the pinned keys where there are pins, the step with the written slots (a
            # compiled step's); else the launcher passes the output for their pointers
            types = common_types(sel_start_ptr="*i32", sel_len_ptr="*i32", nsel_ptr="*i32", **pin_types,
                                 stats_ptr="*i64" if pins else BF16, steps_ptr="*i64" if kvalid else BF16)
            yield f"decode pins={pins} kvalid={kvalid}", _decode_kernel, types, dict(
                D=64, BLOCK_M=16, BLOCK_N=64, PIECE=8, SPLITS=4, HAS_KVALID=kvalid, HAS_PINS=pins, PRECISION="tf32",
                COUNT_PINS=pins, COUNT_STEP=kvalid)
    for lse in (False, True):  # without lse the launcher passes the output (bf16) for its pointer
        for splits in (1, 2):
            for context in (False, True):  # without it the output again for both; with it, for nkeys
                types = common_types(gk_ptr=BF16, gv_ptr=BF16, nkeys_ptr=BF16 if context else "*i32",
                                     lse_ptr="*fp32" if lse else BF16, co_ptr=BF16, clse_ptr="*fp32" if context else BF16)
                yield f"prefill lse={lse} splits={splits} context={context}", _prefill_kernel, types, dict(
                    D=64, BLOCK_M=64, BLOCK_N=64, SPLITS=splits, HAS_KVALID=True, PRECISION="tf32", STORE_LSE=lse,
                    HAS_CONTEXT=context)
        yield f"merge lse={lse}", _merge_kernel, dict(po_ptr="*fp32", plse_ptr="*fp32", out_ptr=BF16,
                                                      lse_ptr="*fp32" if lse else BF16), dict(
            D=64, SPLITS=4, BLOCK_S=4, STORE_LSE=lse)
    # the prefill at the launcher's tile, bf16, head dim 128 (an 8B model's)
    types = common_types(gk_ptr=BF16, gv_ptr=BF16, nkeys_ptr="*i32", lse_ptr=BF16, co_ptr=BF16, clse_ptr=BF16)
    yield "prefill at the default tile", _prefill_kernel, types, dict(
        D=128, BLOCK_M=attention.PREFILL_BLOCK_M, BLOCK_N=attention.PREFILL_BLOCK_N, SPLITS=1, HAS_KVALID=False,
        PRECISION="tf32", STORE_LSE=False, HAS_CONTEXT=False), dict(
        num_warps=attention.PREFILL_WARPS, num_stages=attention.PREFILL_STAGES)
    for weighted in (False, True):  # unweighted: the launcher passes lse for the weights' pointer
        yield f"key weights weighted={weighted}", _key_weights_kernel, dict(
            q_ptr=BF16, k_ptr=BF16, lse_ptr="*fp32", w_ptr="*fp32", out_ptr="*fp32", scaling="fp32"), dict(
            D=64, BLOCK_N=128, BLOCK_T=128, HAS_W=weighted, PRECISION="tf32", STAGES=2)
    scores = dict(q_ptr=BF16, cent_ptr=BF16, cent1_ptr=BF16, logn_ptr="*fp32", logn1_ptr="*fp32", norm_ptr="*fp32",
                  ids_ptr="*i32", ncand_ptr="*i32", keep_ptr="*i8", keep1_ptr="*i8", logw_ptr="*fp32", logp_ptr="*fp32")
    tile = dict(D=64, BLOCK_T=64, BLOCK_C=128, PRECISION="tf32")
    for kernel in (_row_norm_kernel, _mixed_norm_kernel):  # a prefill's normaliser (flat; two-level, fine level)
        yield kernel.fn.__name__, kernel, dict(scores, qk_scale="fp32"), tile
    # a prefill's normaliser at the launcher's tile, head dim 128
    yield "_row_norm_kernel at the default tile", _row_norm_kernel, dict(scores, qk_scale="fp32"), dict(
        D=128, BLOCK_T=scoring.NORM_BLOCK_T, BLOCK_C=scoring.NORM_BLOCK_C, PRECISION="tf32"), dict(
        num_warps=scoring.NORM_WARPS, num_stages=scoring.NORM_STAGES)
    yield "_aggregate_kernel at the default tile", _aggregate_kernel, dict(scores, qk_scale="fp32"), dict(
        D=128, BLOCK_T=scoring.PREFILL_BLOCK_T, BLOCK_C=scoring.PREFILL_BLOCK_C, PRECISION="tf32", HAS_IDS=False), dict(
        num_warps=scoring.PREFILL_WARPS, num_stages=scoring.PREFILL_STAGES)
    for ids in (False, True):  # (flat: the launcher passes the normaliser for ids, ncand and keep)
        yield f"aggregate ids={ids}", _aggregate_kernel, dict(scores, qk_scale="fp32"), dict(tile, HAS_IDS=ids)
    for budget, ids, large in ((False, False, False), (True, False, False), (True, True, False), (True, False, True)):
        # (the launcher passes placeholders of other types for unused pointers: ids, ncand, keep_ids, scratch)
        types = dict(logp_ptr="*fp32", counts_ptr="*i32", sizes_ptr="*i32", ids_ptr="*i32", ncand_ptr="*i32",
                     keep_ptr="*i8", keep_ids_ptr="*i8", block_ptr="*i32", nsel_ptr="*i32", nsizes_ptr="*i32",
                     stats_ptr="*i64", scratch_ptr="*i32", threshold="fp32")
        yield f"select budget={budget} ids={ids} clusters={8192 if large else 1024}", _select_kernel, types, dict(
            USE_BUDGET=budget, HAS_IDS=ids, PIECE=8, BLOCK_C=8192 if large else 1024, BLOCK_S=128, RESOLVE=64)


if __name__ == "__main__":
    for name, kernel, types, constexprs, *options in variants():
        ptx = compile_for_gpu(kernel, types, constexprs, *options).asm["ptx"]
        assert ptx, name
        # a chained kernel lets the next one launch and waits for the previous one
        chained = "griddepcontrol.launch_dependents" in ptx and "griddepcontrol.wait" in ptx
        print(f"compiled {name}" + (" (chained)" if chained else ""), flush=True)
