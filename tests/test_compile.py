"""torch.compile over a squeezed decode step: what transformers' compile path and CUDA graphs need.

A reserved cache (`SqueezedCache.reserve`, fixed capacity, length on the device) gives one-token
steps of fixed shapes with no host synchronisation. Here the torch path of such a step (the
attention's reference implementation, the cache's in-place writes) is traced by dynamo as one graph
with no break, and the compiled step gives the eager step's logits, step after step.
"""

import pytest
import torch
import torch._dynamo as dynamo

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs

from .conftest import PAPER, full_prompt


def started(model, context, config):
    """A fork that served its prompt's prefill (eagerly, as generate does), then reserved."""
    fork = SqueezedCache.from_context(model, context, config, progress=False).fork()
    ids = full_prompt(context)
    with torch.no_grad():
        logits = model(ids[:, context.numel():], **cache_kwargs(model, fork)).logits
    fork.reserve(fork.layers[0].length + 8)
    return fork, logits[:, -1:].argmax(-1), torch.tensor([[ids.shape[1]]])


@pytest.mark.parametrize("config", [SqueezeConfig(keep=0.2), SqueezeConfig(keep=0.2, **PAPER)],
                         ids=["default", "paper"])
def test_a_reserved_decode_step_compiles_as_one_graph(tiny, context, config):
    eager, token, position = started(tiny, context, config)
    compiled, _, _ = started(tiny, context, config)

    def step(cache, token, position):
        return tiny(input_ids=token, position_ids=position, use_cache=True, **cache_kwargs(tiny, cache)).logits

    with torch.no_grad():
        explained = dynamo.explain(step)(started(tiny, context, config)[0], token, position)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        dynamo.reset()
        fast = torch.compile(step, backend="aot_eager", fullgraph=True)
        for _ in range(3):
            want, got = step(eager, token, position), fast(compiled, token, position)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            token, position = want[:, -1:].argmax(-1), position + 1
    assert int(compiled.layers[0].device_length) == int(eager.layers[0].device_length) > 0
