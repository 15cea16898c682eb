"""Does torch.compile take a squeezed decode step on a CUDA device, kernels included?
`PYTHONPATH=. python3 tools/check_compile.py` (a diagnostic for the compile path of `generate`;
tests/test_compile.py checks the torch path on the CPU).

On a tiny random Llama (GQA 6/2), bf16, a reserved cache, for the default and the paper's lookup:
dynamo's graphs and breaks over one decode step (the kernels enter as one custom operator), the step
compiled by inductor against the eager step, then `generate_greedy(compile=True)` and
`model.generate(compile_config=CompileConfig())` against their uncompiled tokens.
"""

import sys
import time

import torch
import torch._dynamo as dynamo
from transformers import LlamaConfig, LlamaForCausalLM

import hf_squeeze  # noqa: F401
from hf_squeeze import SqueezedCache, SqueezeConfig, cache_kwargs


def main() -> int:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=128, head_dim=16, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, pad_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).eval()
    model.set_attn_implementation("squeezed")
    g = torch.Generator().manual_seed(1)
    context = torch.randint(3, 256, (3000,), generator=g).cuda()
    question = torch.randint(3, 256, (16,), generator=g).cuda()
    failed = 0
    for name, cfg in (("default", SqueezeConfig(keep=0.2)), ("paper", SqueezeConfig(keep=0.2, prefill="lookup", pin=0.0))):
        cache = SqueezedCache.from_context(model, context, cfg, progress=False)

        def started():
            fork = cache.fork()
            with torch.no_grad():
                logits = model(question[None], **cache_kwargs(model, fork)).logits
            fork.reserve(fork.layers[0].length + 16)
            return fork, logits[:, -1:].argmax(-1), torch.tensor([[context.numel() + question.numel()]], device="cuda")

        def step(fork, token, position):
            return model(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(model, fork)).logits

        with torch.no_grad():
            fork, token, position = started()
            explained = dynamo.explain(step)(fork, token, position)
            print(f"{name}: dynamo graphs {explained.graph_count}, breaks {explained.graph_break_count}")
            for reason in explained.break_reasons[:5]:
                print("  break:", reason.reason.splitlines()[0][:200], "|", str(reason.user_stack[-1])[:160])
            dynamo.reset()
            try:
                start = time.perf_counter()
                fast = torch.compile(step)
                eager, token_e, pos_e = started()
                compiled, token_c, pos_c = started()
                for _ in range(4):
                    want, got = step(eager, token_e, pos_e), fast(compiled, token_c, pos_c)
                    token_e, pos_e = want[:, -1:].argmax(-1), pos_e + 1
                    token_c, pos_c = got[:, -1:].argmax(-1), pos_c + 1
                torch.cuda.synchronize()
                diff = (want.float() - got.float()).abs().max().item()
                same = torch.equal(token_e, token_c)
                print(f"{name}: inductor step vs eager: max logit diff {diff:.3e}, same tokens {same}, "
                      f"compile + 4 steps {time.perf_counter() - start:.1f} s, "
                      f"kernel keys read {int(compiled.layers[0].attention.kernel_keys.sum())}")
                failed += not same
            except Exception as error:  # a diagnostic: say what failed and go on
                print(f"{name}: inductor failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
                failed += 1
        # the two users' paths: generate_greedy(compile=True) (its own CUDA graph of the compiled
        # step) and model.generate with a compile_config (transformers' compile path, CUDA graphs)
        from transformers import CompileConfig

        from hf_squeeze import generate_greedy

        full = torch.cat([context, question])[None]
        try:
            want = generate_greedy(model, full, cache.fork(), 16)
            got = generate_greedy(model, full, cache.fork(), 16, compile=True)
            print(f"{name}: generate_greedy compiled == uncompiled: {torch.equal(got, want)}")
            failed += not torch.equal(got, want)
            kwargs = dict(max_new_tokens=16, do_sample=False)
            want = model.generate(full, **cache_kwargs(model, cache.fork()), disable_compile=True, **kwargs)
            got = model.generate(full, **cache_kwargs(model, cache.fork()), compile_config=CompileConfig(), **kwargs)
            print(f"{name}: model.generate compiled == eager: {torch.equal(got, want)}")
            failed += not torch.equal(got, want)
        except Exception as error:
            print(f"{name}: compiled generation failed: {type(error).__name__}: {str(error).splitlines()[0][:300]}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
