"""Prepare a document once (the command line, or the API), save it, then load it and ask.

    python examples/prepare_save_load_ask.py [WORKDIR]

The command line: `hf-squeeze prepare --chat --context doc.txt --out doc.squeeze` prefills the file
and writes the squeezed cache; `--chat` opens a user turn of the model's chat template with the
document, so every question continues that turn. The API does the same in two calls.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import hf_squeeze
from hf_squeeze import SqueezedCache, SqueezeConfig
from hf_squeeze.demo import FACTS, chat_prompt_ids, document

work = Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
model, tokenizer = hf_squeeze.load_default_model()
text = document(tokenizer, tokens=1000)  # an essay with a few facts planted in it
(work / "doc.txt").write_text(text, encoding="utf-8")

# 1. Prepare with the command line (the embedded SmolLM2 by default; --model DIR_OR_GGUF for another).
subprocess.run([sys.executable, "-m", "hf_squeeze.cli", "prepare", "--chat", "--keep", "0.3",
                "--context", str(work / "doc.txt"), "--out", str(work / "doc.squeeze"), "--device", "cpu"], check=True)

# ... or with the API: the same context ids, the same index.
context_ids, _ = chat_prompt_ids(tokenizer, text, question="")
SqueezedCache.from_context(model, context_ids, SqueezeConfig(keep=0.3), progress=False).save(work / "api.squeeze")

# 2. Load (checked against this model and the file's checksums) and ask, one fork per question.
cache = SqueezedCache.load(work / "doc.squeeze", model)
assert torch.equal(cache.fixed.context_ids, context_ids)
for fact in FACTS[:2]:
    context_ids, question_ids = chat_prompt_ids(tokenizer, text, fact.question)
    prompt = torch.cat([context_ids, question_ids])[None]
    out = model.generate(prompt, cache=cache.fork(), max_new_tokens=16, do_sample=False)
    print(f"Q: {fact.question}\nA: {tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)}")
