"""Squeeze a document once, save it, load it back, and ask a question with model.generate."""

import sys
import tempfile
from pathlib import Path

import torch

import hf_squeeze  # registers attn_implementation="squeezed" with transformers
from hf_squeeze import SqueezedCache, SqueezeConfig
from hf_squeeze.demo import FACTS, chat_prompt_ids, document

model, tokenizer = hf_squeeze.load_default_model()  # SmolLM2-135M-Instruct, squeezed attention, offline
text = document(tokenizer, tokens=1500)  # an essay with a few facts planted in it
context_ids, _ = chat_prompt_ids(tokenizer, text, question="")

# Once per document: prefill it, cluster its keys, save the result.
cache = SqueezedCache.from_context(model, context_ids, SqueezeConfig(keep=0.3))
path = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()) / "essay.squeeze"
cache.save(path)

# Per request: load (or reuse) the cache, fork it, and pass the full prompt to generate.
cache = SqueezedCache.load(path, model)
fact = FACTS[0]
_, question_ids = chat_prompt_ids(tokenizer, text, fact.question)
prompt = torch.cat([context_ids, question_ids])[None]
request = cache.fork()  # shares the squeezed context; holds this request's tokens
out = model.generate(prompt, cache=request, max_new_tokens=16, do_sample=False)  # or past_key_values=request

print("Q:", fact.question)
print("A:", tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True))
print(request.stats())  # what this request read: attended_fraction, centroids_scored, ...
