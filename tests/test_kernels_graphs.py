"""Eager decode steps replayed per layer (`kernels/graphs.py`): which step is eager, captured or
replayed, and that a replayed step gives what launching its kernels gives.

The CPU has no CUDA graphs: here a capture records the step as a CUDA graph holds it (the launch
on the graph's own query and slot buffers, with the other tensors of the capture step) and a
replay runs it again, the kernels in Triton's interpreter. The tokens and reads must equal those
of the same requests launched kernel by kernel: the query and the written slots reach the replay,
its output comes back, the counters it adds to count each step once, and a new request (new
buffers, pins and counters) is captured again. (tools/check_cuda.py runs the real graphs.)
"""

import pytest
import torch

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs
from hf_squeeze.kernels import graphs

from .test_cache import padded_batch


class _Recorded:
    """A captured step on the CPU: `replay` runs it again and writes the graph's output buffer."""

    def __init__(self, step, out):
        self.step, self.out = step, out

    def replay(self):
        self.out.copy_(self.step())


def _record_on_cpu(self, step):
    q = self.query
    out = q.new_full((q.shape[0], q.shape[2], q.shape[1], q.shape[3]), float("nan"))  # poisoned until replayed
    return _Recorded(step, out), out


@pytest.fixture
def cpu_graphs(monkeypatch):
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1")
    monkeypatch.setattr(graphs, "available", lambda device: graphs.os.environ.get(graphs._ENV, "1") != "0")
    monkeypatch.setattr(graphs.DecodeGraph, "_record", _record_on_cpu)


def _steps(fork):
    found = [layer.attention._graph for layer in fork.layers]
    return [(g.captures, g.replays) if g is not None else (0, 0) for g in found]


def test_eager_steps_are_replayed_with_the_tensors_they_read(llama, cpu_graphs, monkeypatch):
    context = torch.randint(3, 256, (160,), generator=torch.Generator().manual_seed(4))
    cache = SqueezedCache.from_context(llama, context, SqueezeConfig(keep=0.25), progress=False)
    g = torch.Generator().manual_seed(5)
    single = torch.cat([context, torch.randint(3, 256, (6,), generator=g)])[None]
    batch, mask = padded_batch(context, [torch.randint(3, 256, (n,), generator=g) for n in (3, 6)])
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(graphs._ENV, flag)
        fork, outputs, counts = cache.fork(), [], []
        # two requests in one fork (new pins, a batch of four rows: every signature changes)
        for ids, extra in ((single, {}), (batch, dict(attention_mask=mask, do_sample=True, top_k=20,
                                                         num_return_sequences=2))):
            torch.manual_seed(0)
            before = _steps(fork)
            out = llama.generate(ids, **cache_kwargs(llama, fork), max_new_tokens=4, **{"do_sample": False, **extra})
            counts.append([(c - c0, r - r0) for (c, r), (c0, r0) in zip(_steps(fork), before)])
            outputs.append((out, fork.stats()["attended_fraction"]))
        runs[flag] = outputs, counts
    for (graphed, read), (launched, read_launched) in zip(runs["1"][0], runs["0"][0]):
        assert torch.equal(graphed, launched)
        assert read == pytest.approx(read_launched, abs=1e-12)
    # 4 tokens: the prefill, then 3 decode steps per layer: eager, captured and replayed, replayed
    assert runs["1"][1] == [[(1, 2)] * 2] * 2
    assert runs["0"][1] == [[(0, 0)] * 2] * 2
