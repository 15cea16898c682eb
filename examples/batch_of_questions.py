"""Several questions over one context in one `generate` call, with sampling.

    python examples/batch_of_questions.py

The context is shared by every row; each question follows it. Padding goes *between* the context
and a question (the questions are left-padded), and the attention mask says where it is.
"""

import torch

import hf_squeeze
from hf_squeeze import SqueezedCache, SqueezeConfig
from hf_squeeze.demo import FACTS, chat_prompt_ids, document

model, tokenizer = hf_squeeze.load_default_model()
text = document(tokenizer, tokens=1000)
context_ids, _ = chat_prompt_ids(tokenizer, text, question="")
cache = SqueezedCache.from_context(model, context_ids, SqueezeConfig(keep=0.3))

questions = [chat_prompt_ids(tokenizer, text, fact.question)[1] for fact in FACTS]
width = max(len(q) for q in questions)
pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
ids = torch.stack([torch.cat([context_ids, torch.full((width - len(q),), pad), q]) for q in questions])
mask = torch.ones_like(ids)
for row, q in enumerate(questions):
    mask[row, len(context_ids) : len(context_ids) + width - len(q)] = 0  # the padding of this row

torch.manual_seed(0)
out = model.generate(ids, attention_mask=mask, cache=cache.fork(), max_new_tokens=16, do_sample=True,
                     temperature=0.7, top_p=0.9, num_return_sequences=2, pad_token_id=pad)
for i, row in enumerate(out):  # num_return_sequences rows per question, in order
    fact = FACTS[i // 2]
    print(f"{fact.question} -> {tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)!r}")
