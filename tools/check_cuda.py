"""Check the squeezed path on a CUDA device (the test suite runs on the CPU): `PYTHONPATH=. python3 tools/check_cuda.py`.

Exit status 0 when every check passes. Checks, on a tiny random Llama (GQA 6/2):
- float32, keep=1.0: same greedy tokens as a dense DynamicCache, logits within 1e-4;
- bfloat16, keep=1.0: logits within bf16 tolerance of dense bf16 attention;
- keep=0.2 flat / hierarchical / threshold (the paper's step) and the default (exact question
  prefill, pins): generation runs, attended fraction near what each reads;
- a padded batch of questions; save -> load onto the GPU -> identical tokens;
- Triton kernels (the default on CUDA) vs the torch reference path, flat and hierarchical index:
  keep=1 logits within 1e-4, same tokens at keep=1 and keep=0.2; a long input's exact prefill through
  torch's fused attention (fp32, bf16) against the reference;
- `generate_greedy` (decode step replayed as a CUDA graph): same tokens as `model.generate`, squeezed
  and with a dense StaticCache; the evaluation's caches (full, the default, Quest, the oracle) give
  the tokens and reads of the eager loop, and six threads answering 8 times each at once, each on
  its own stream, the tokens of one thread;
- eager decode steps (`generate(disable_compile=True)`) replayed per layer as CUDA graphs: the tokens
  and reads of the same steps launched kernel by kernel (bf16 and fp32, flat, two-level, the paper's
  step, a padded batch sampled);
- a request through `generate` waits for the GPU in hf_squeeze only per request (its prompt
  check, its release), for both input prefills;
- the budget selection over 6,554 and 26,214 clusters against the reference;
- the GPU K-means builds the same index whatever layers share its batch (as on several GPUs).
"""

import os
import sys
import tempfile

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import hf_squeeze  # noqa: F401
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs

failures = []


def check(name, ok, detail=""):
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}")
    if not ok:
        failures.append(name)


def model_on(device, dtype):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, head_dim=16, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    model.set_attn_implementation("squeezed")
    return model


def main():
    device = "cuda"
    assert torch.cuda.is_available(), "no CUDA device"
    g = torch.Generator().manual_seed(1)
    context = torch.randint(3, 256, (3000,), generator=g).to(device)
    question = torch.randint(3, 256, (16,), generator=g).to(device)
    full = torch.cat([context, question])[None]
    gen = dict(max_new_tokens=12, do_sample=False)

    model = model_on(device, torch.float32)
    cache = SqueezedCache.from_context(model, context, SqueezeConfig(keep=1.0), progress=False)
    a = model.generate(full, **cache_kwargs(model, cache.fork()), **gen)
    b = model.generate(full, **cache_kwargs(model, DynamicCache()), **gen)
    check("fp32 keep=1 tokens equal dense", torch.equal(a, b))
    with torch.no_grad():
        la = model(question[None], **cache_kwargs(model, cache.fork())).logits
        lb = model(full).logits[:, -question.numel():]
    check("fp32 keep=1 logits", (la - lb).abs().max().item() < 1e-4, f"max diff {(la - lb).abs().max().item():.2e}")

    half = model_on(device, torch.bfloat16)
    cache16 = SqueezedCache.from_context(half, context, SqueezeConfig(keep=1.0), progress=False)
    with torch.no_grad():
        la = half(question[None], **cache_kwargs(half, cache16.fork())).logits.float()
        half.set_attn_implementation("sdpa")
        lb = half(full).logits[:, -question.numel():].float()
        half.set_attn_implementation("squeezed")
    err = ((la - lb).norm() / lb.norm()).item()
    check("bf16 keep=1 logits vs sdpa", err < 2e-2, f"relative error {err:.2e}")

    # The lookup alone (the paper's step: every selection reads about keep), then the default, whose
    # question prefill reads every key once (1 of the 12 selections per head) and whose 11 decode
    # steps read about keep (pinned keys included).
    paper = dict(prefill="lookup", pin=0.0)
    for config, expected in ((SqueezeConfig(keep=0.2, **paper), 0.2),
                             (SqueezeConfig(keep=0.2, hierarchical=True, **paper), 0.2),
                             (SqueezeConfig(keep=0.2, selection="threshold", **paper), 0.2),
                             (SqueezeConfig(keep=0.2), (1 + 11 * 0.2) / 12)):
        for m in (model, half):
            request = SqueezedCache.from_context(m, context, config, progress=False).fork()
            out = m.generate(full, **cache_kwargs(m, request), **gen)
            s = request.stats()
            name = f"{m.dtype} {config.selection} hierarchical={config.hierarchical} prefill={config.prefill} pin={config.pin}"
            check(name, out.shape[1] == full.shape[1] + 12 and abs(s["attended_fraction"] - expected) < 0.05,
                  f"attended {s['attended_fraction']:.3f} (expected {expected:.3f}), centroids scored "
                  f"{s['centroids_scored']:.1f}/{s['clusters']}")

    from hf_squeeze import kernels

    # Kernels vs the torch reference. With keep=1 both read every key: outputs must agree to float32
    # rounding. At keep=0.2 on this random model attention is nearly uniform (log p of most
    # clusters within 1e-3 of -log N), so the two implementations may break near-ties at the budget
    # differently and read one cluster more or less: the tokens must agree, the logit gap is shown.
    for keep, hierarchical in ((1.0, False), (0.2, False), (1.0, True), (0.2, True)):
        config = SqueezeConfig(keep=keep, hierarchical=hierarchical)
        request = SqueezedCache.from_context(model, context, config, progress=False)
        name = f"keep={keep}{' hierarchical' if hierarchical else ''}"
        if keep == 1.0:
            probe = torch.empty(1, 6, 1, 16, device=device)
            check(f"kernels serve the CUDA path ({name})", kernels.supports(request.layers[0].index, probe) is None)
        outputs = {}
        for mode in ("auto", "0"):  # Triton kernels, then the torch reference
            os.environ["HF_SQUEEZE_KERNELS"] = mode
            with torch.no_grad():
                logits = model(question[None], **cache_kwargs(model, request.fork())).logits
            outputs[mode] = (logits, model.generate(full, **cache_kwargs(model, request.fork()), **gen))
        os.environ["HF_SQUEEZE_KERNELS"] = "auto"
        diff = (outputs["auto"][0] - outputs["0"][0]).abs().max().item()
        if keep == 1.0:
            check(f"kernels vs reference {name} logits", diff < 1e-4, f"max diff {diff:.2e}")
        else:
            print(f"info  kernels vs reference {name} logits  max diff {diff:.2e}")
        check(f"kernels vs reference {name} tokens", torch.equal(outputs["auto"][1], outputs["0"][1]))

    # A long input under the default (exact prefill, pins): enough query rows that the prefill reads
    # the clustered keys through torch's fused attention (kernels/read_all.py; fp32 takes the
    # efficient kernel, bf16 cuDNN or flash), against the torch reference: logits, then the tokens
    # of the decode steps, which read the keys pinned from that prefill.
    long_question = torch.randint(3, 256, (kernels.read_all.MIN_ROWS // 3 + 8,), generator=g).to(device)
    fused = kernels.read_all.clustered_attention
    served = []  # the layer steps the fused kernels served

    def spy(*args):
        found = fused(*args)
        served.extend([1] if found is not None else [])
        return found

    kernels.read_all.clustered_attention = spy
    for m, tolerance in ((model, 1e-4), (half, 2e-2)):
        request = SqueezedCache.from_context(m, context, SqueezeConfig(keep=0.2), progress=False)
        outputs = {}
        for mode in ("auto", "0"):
            os.environ["HF_SQUEEZE_KERNELS"] = mode
            with torch.no_grad():
                logits = m(long_question[None], **cache_kwargs(m, request.fork())).logits.float()
            ids = torch.cat([context, long_question])[None]
            outputs[mode] = (logits, m.generate(ids, **cache_kwargs(m, request.fork()), **gen))
        os.environ["HF_SQUEEZE_KERNELS"] = "auto"
        ref = outputs["0"][0]
        err = ((outputs["auto"][0] - ref).norm() / ref.norm()).item()
        name = f"{m.dtype} exact prefill of {long_question.numel()} tokens through the fused kernels"
        check(f"{name}: served", len(served) == 2 * len(request.layers), f"{len(served)} calls")
        check(f"{name}: logits vs reference", err < tolerance, f"relative error {err:.2e}")
        if m is model:
            check(f"{name}: tokens vs reference", torch.equal(outputs["auto"][1], outputs["0"][1]))
        served.clear()
    kernels.read_all.clustered_attention = fused

    # Eager fixed-capacity decode steps (generate with disable_compile=True) replay each layer's step
    # as a CUDA graph (kernels/graphs.py): the tokens and reads of the same steps launched kernel by
    # kernel, for flat / two-level / the paper's step, and a padded batch of two prompts, sampled.
    short = torch.randint(3, 256, (5,), generator=g).to(device)
    padded = torch.stack([torch.cat([context, torch.zeros(11, dtype=torch.long, device=device), short]), full[0]])
    padded_mask = torch.ones_like(padded)
    padded_mask[0, context.numel(): context.numel() + 11] = 0
    for config, ids, sample in ((SqueezeConfig(keep=0.2), full, False),
                                (SqueezeConfig(keep=0.2, hierarchical=True), full, False),
                                (SqueezeConfig(keep=0.2, **paper), full, False),
                                (SqueezeConfig(keep=0.2), padded, True)):
        for m in (model, half):
            built = SqueezedCache.from_context(m, context, config, progress=False)
            runs = {}
            for flag in ("1", "0"):
                os.environ["HF_SQUEEZE_STEP_GRAPHS"] = flag
                fork = built.fork()
                torch.manual_seed(5)
                extra = dict(attention_mask=padded_mask, do_sample=True, top_k=20, num_return_sequences=2) if sample else {}
                out = m.generate(ids, **cache_kwargs(m, fork), max_new_tokens=24, disable_compile=True,
                                 **{"do_sample": False, **extra})
                replays = sum(layer.attention._graph.replays for layer in fork.layers if layer.attention._graph is not None)
                runs[flag] = out, fork.stats()["attended_fraction"], replays
            del os.environ["HF_SQUEEZE_STEP_GRAPHS"]
            name = f"{m.dtype} eager steps replayed per layer ({config.selection}, hierarchical={config.hierarchical}, " \
                   f"prefill={config.prefill}{', padded batch, sampled' if sample else ''})"
            # n tokens, n - 1 decode steps per layer: the first eager, the second captured, the rest replayed
            steps = runs["1"][0].shape[1] - ids.shape[1] - 1
            check(f"{name}: graphs replayed", runs["1"][2] == (steps - 1) * len(fork.layers) > 0 and runs["0"][2] == 0,
                  f"{runs['1'][2]} replays in {steps} steps of {len(fork.layers)} layers")
            check(f"{name}: tokens == kernel by kernel", torch.equal(runs["1"][0], runs["0"][0]))
            check(f"{name}: reads == kernel by kernel", abs(runs["1"][1] - runs["0"][1]) < 1e-9,
                  f"attended {runs['1'][1]:.4f} vs {runs['0'][1]:.4f}")


    ids = torch.stack([torch.cat([context, torch.zeros(11, dtype=torch.long, device=device), short]), full[0]])
    mask = torch.ones_like(ids)
    mask[0, context.numel(): context.numel() + 11] = 0
    a = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache.fork()), **gen)
    b = model.generate(ids, attention_mask=mask, **cache_kwargs(model, DynamicCache()), **gen)
    check("padded batch keep=1 equals dense", torch.equal(a, b))

    request = SqueezedCache.from_context(model, context, SqueezeConfig(keep=0.2), progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = SqueezedCache.load(request.save(f"{tmp}/c.squeeze"), model)
    check("loaded onto the GPU", loaded.layers[0].index.keys.device.type == "cuda")
    a = model.generate(full, **cache_kwargs(model, request.fork()), **gen)
    b = model.generate(full, **cache_kwargs(model, loaded.fork()), **gen)
    check("save/load round trip on the GPU", torch.equal(a, b))

    # generate_greedy: the decode step captured in a CUDA graph and replayed must give the tokens of
    # model.generate (kernel path, keep 0.2 and 1.0, fp32 and bf16), and of the eager replay-free loop.
    from transformers import StaticCache

    from hf_squeeze import generate_greedy
    from hf_squeeze.generation import GenerationTimes

    for m in (model, half):
        m.generation_config.eos_token_id = None  # generate_greedy does not stop (or suppress) at EOS
        for keep in (1.0, 0.2):
            built = SqueezedCache.from_context(m, context, SqueezeConfig(keep=keep), progress=False)
            want = m.generate(full, **cache_kwargs(m, built.fork()), max_new_tokens=24, do_sample=False)
            times = GenerationTimes()
            fork = built.fork()
            got = generate_greedy(m, full, fork, 24, times=times)
            eager = generate_greedy(m, full, built.fork(), 24, cuda_graph=False)
            same = int((got == want)[0, full.shape[1]:].cumprod(0).sum())
            check(f"{m.dtype} keep={keep} CUDA graph tokens == generate", torch.equal(got, want),
                  f"{same}/24 equal; capture {times.capture * 1e3:.1f} ms, {times.per_token * 1e3:.2f} ms/token")
            check(f"{m.dtype} keep={keep} CUDA graph tokens == eager loop", torch.equal(got, eager))
            check(f"{m.dtype} keep={keep} cache length after graph", fork.get_seq_length() == got.shape[1] - 1)
    # Requests in a row through transformers' compile path (bf16, keep 0.2, compiled above): the
    # second fork holds its step tensors in the first's memory (recycle.py), nothing compiles again,
    # and its tokens are those of a fork in fresh memory.
    import gc

    from torch._dynamo.utils import counters

    other = torch.cat([context, question.flip(0)])[None]
    first = built.fork()
    half.generate(full, **cache_kwargs(half, first), max_new_tokens=12, do_sample=False)
    address, graphs = first.layers[0]._key_buffer.data_ptr(), counters["stats"]["unique_graphs"]
    del first
    gc.collect()
    second = built.fork()
    got = half.generate(other, **cache_kwargs(half, second), max_new_tokens=12, do_sample=False)
    fresh = built.fork()  # (the second still lives: this one gets memory of its own)
    want = half.generate(other, **cache_kwargs(half, fresh), max_new_tokens=12, do_sample=False)
    check("requests in a row: the second in the first's step memory", second.layers[0]._key_buffer.data_ptr() == address
          and fresh.layers[0]._key_buffer.data_ptr() != address)
    check("requests in a row: nothing compiled again", counters["stats"]["unique_graphs"] == graphs)
    check("requests in a row: tokens == a fork in fresh memory", torch.equal(got, want))
    del second, fresh
    # A request waits for the GPU only to compare its prompt with the context (refusing another
    # context) and to read the lengths back at its end: per request, not per layer or step.
    from hf_squeeze.devices import host_waits

    for prefill in ("exact", "lookup"):
        request = built.fork(prefill=prefill) if prefill == "lookup" else built.fork()
        sites = host_waits(lambda: half.generate(full, **cache_kwargs(half, request), max_new_tokens=12,
                                                  do_sample=False))
        ours = {site: n for site, n in sites.items() if site.startswith("hf_squeeze/")}  # (not transformers')
        check(f"a request ({prefill} prefill) waits for the GPU per request only", sum(ours.values()) <= 3,
              ", ".join(f"{site} x{n}" for site, n in ours.items()))
    # The evaluation's caches under generate_greedy: the torch path of Quest and the oracle (its
    # gather sized by the budget, so nothing waits for the device) and the kernels of full attention
    # and the default replay as CUDA graphs with the tokens and the reads of the eager loop.
    from hf_squeeze.eval.contexts import ContextCaches
    from hf_squeeze.eval.methods import parse_methods

    caches = ContextCaches(model, context)
    for method in parse_methods("full,flat-topk+exact+pin0.5-0.1,quest@0.125,oracle@0.125"):
        kernels = method.family in ("full", "squeezed")
        graphed, eager = (caches.cache([method], kernels=kernels).fork() for _ in range(2))
        got = generate_greedy(model, full, graphed, 24)
        want = generate_greedy(model, full, eager, 24, cuda_graph=False)
        reads = graphed.row_stats()[0][0], eager.row_stats()[0][0]
        check(f"eval {method.name} CUDA graph tokens == eager loop", torch.equal(got, want))
        check(f"eval {method.name} CUDA graph reads == eager loop", abs(reads[0] - reads[1]) < 1e-9,
              f"read fraction {reads[0]:.4f} vs {reads[1]:.4f}")
    # Threads of one process (hf-squeeze eval --threads): each on its own stream, capturing and
    # replaying its own graphs while the others run, gives the tokens of one thread alone.
    import threading

    methods = parse_methods("full,flat-topk+exact+pin0.5-0.1,oracle@0.125") * 2
    alone = [generate_greedy(model, full, caches.cache([m], kernels=m.family != "oracle").fork(), 24) for m in methods]
    rounds = 8  # 48 captures in all: more than the 32 streams torch hands out in turn per device
    streams = [torch.cuda.Stream(device) for _ in methods]  # as the eval makes them: before the threads start
    side_by_side = [[] for _ in methods]

    def answer(i):
        with torch.cuda.stream(streams[i]):
            method = methods[i]
            for _ in range(rounds):
                fork = caches.cache([method], kernels=method.family != "oracle").fork()
                side_by_side[i].append(generate_greedy(model, full, fork, 24))
            torch.cuda.current_stream().synchronize()

    pool = [threading.Thread(target=answer, args=(i,)) for i in range(len(methods))]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    check("eval threads on their own streams: tokens == one thread",
          all(len(got) == rounds and all(torch.equal(want, g) for g in got) for want, got in zip(alone, side_by_side)),
          f"{sum(map(len, side_by_side))} of {rounds * len(methods)} answers")
    model.set_attn_implementation("sdpa")
    static = StaticCache(config=model.config, max_cache_len=full.shape[1] + 24)
    got = generate_greedy(model, full, static, 24)
    want = model.generate(full, max_new_tokens=24, do_sample=False)
    model.set_attn_implementation("squeezed")
    check("dense StaticCache CUDA graph tokens == generate", torch.equal(got, want))

    # The budget selection at the sizes of 128K and 512K contexts (5% centroids; 8 and 32 warps per
    # search) against the torch reference, on scores with ties, empty clusters and -inf.
    from hf_squeeze.kernels import selection as kselection
    from hf_squeeze.selection import select as reference_select

    for clusters in (6554, 26214):
        counts = torch.randint(0, 41, (8, clusters), generator=g)
        counts[:, ::9] = 0
        logp = torch.randn(2, 8, clusters, generator=g) * 3 - 12
        logp[1] = (logp[1] * 8).round() / 8  # many equal scores
        logp[1, :, 5::97] = float("-inf")
        c32 = counts.to(device, torch.int32)
        same = True
        for budget in (1, int(0.1 * counts.sum(-1).min()), int(counts.sum(-1).max()) + 1):
            stats = torch.zeros(1, dtype=torch.int64, device=device)
            keep = kselection.select(logp.to(device), c32, c32, None, budget, int(counts.max()), 32, stats)[0]
            same &= torch.equal(keep.bool().cpu(), reference_select(logp, counts[None].expand(2, -1, -1), None, budget))
        check(f"budget selection over {clusters} clusters == reference", same)

    # K-means on the GPU: a layer's index must not depend on which layers share its K-means batch
    # (on several GPUs the batches split at device boundaries) - Triton kernels, bf16 keys.
    import hf_squeeze.index as index_module

    kg = torch.Generator(device=device).manual_seed(3)
    keys = [torch.randn(4, 6000, 64, device=device, generator=kg, dtype=torch.bfloat16) for _ in range(5)]
    values = [torch.randn_like(k) for k in keys]
    for hierarchical in (False, True):
        config = SqueezeConfig(hierarchical=hierarchical)
        together = index_module.build_indices(keys, values, config)
        saved = index_module._KMEANS_GROUP_ELEMENTS
        index_module._KMEANS_GROUP_ELEMENTS = 2 * 4 * 6000 * 64  # two layers per batch
        try:
            apart = index_module.build_indices(keys, values, config)
        finally:
            index_module._KMEANS_GROUP_ELEMENTS = saved
        same = all(torch.equal(t, b.tensors()[n]) for a, b in zip(together, apart) for n, t in a.tensors().items())
        check(f"GPU K-means index independent of layer grouping (hierarchical={hierarchical})", same)

    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    print(f"{len(failures)} failed" if failures else "all CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
