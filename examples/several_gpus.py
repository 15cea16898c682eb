"""A model spread over several GPUs with `device_map="auto"`: each layer's index is built and kept on
that layer's GPU, a saved cache loads onto the spread model, and `generate` works as on one device.

    python examples/several_gpus.py MODEL_DIR [--gguf FILE]   # needs two or more CUDA GPUs
    python examples/several_gpus.py --cpu-smoke              # the same steps on the CPU (embedded SmolLM2)
"""

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_squeeze
from hf_squeeze import SqueezedCache, SqueezeConfig, layer_devices
from hf_squeeze.demo import FACTS, chat_prompt_ids, document

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model", nargs="?", help="a Hugging Face model folder")
parser.add_argument("--gguf", help="a .gguf file in that folder")
parser.add_argument("--cpu-smoke", action="store_true", help="run the same steps on the CPU")
parser.add_argument("--tokens", type=int, default=8000, help="context length in tokens")
args = parser.parse_args()

if args.cpu_smoke:
    model, tokenizer = hf_squeeze.load_default_model()  # one device: the CPU
    args.tokens = min(args.tokens, 1000)
else:
    if torch.cuda.device_count() < 2 or args.model is None:
        raise SystemExit("this example needs a model folder and two or more CUDA GPUs (or --cpu-smoke)")
    extra = {"gguf_file": args.gguf} if args.gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(args.model, **extra)
    model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="squeezed", dtype=torch.bfloat16,
                                                 device_map="auto", **extra).eval()
devices = layer_devices(model)
print("layers per device:", {str(d): devices.count(d) for d in dict.fromkeys(devices)})

text = document(tokenizer, tokens=args.tokens)
context_ids, _ = chat_prompt_ids(tokenizer, text, question="")
cache = SqueezedCache.from_context(model, context_ids, SqueezeConfig(keep=0.2))
assert [ix.keys.device for ix in cache.fixed.layers] == devices  # each layer's index where it computes
path = Path(tempfile.mkdtemp()) / "doc.squeeze"
loaded = SqueezedCache.load(cache.save(path), model)  # placed like the model, layer by layer

fact = FACTS[0]
context_ids, question_ids = chat_prompt_ids(tokenizer, text, fact.question)
prompt = torch.cat([context_ids, question_ids])[None].to(model.device)
answers = [model.generate(prompt, cache=c.fork(), max_new_tokens=16, do_sample=False) for c in (cache, loaded)]
assert torch.equal(answers[0], answers[1])  # the saved cache answers as the one built here
print(f"Q: {fact.question}\nA: {tokenizer.decode(answers[0][0, prompt.shape[1]:], skip_special_tokens=True)}")
