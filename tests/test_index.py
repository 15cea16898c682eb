"""The offline index: built where each layer computes, kept on the CPU when asked, the same either way."""

import pytest
import torch

from hf_squeeze import SqueezeConfig, SqueezedCache
from hf_squeeze.index import build_indices


def test_index_groups_never_span_two_devices(monkeypatch):
    import hf_squeeze.index as index_module

    cpu, meta = torch.device("cpu"), torch.device("meta")
    monkeypatch.setattr(index_module, "_KMEANS_GROUP_ELEMENTS", 3 * 2 * 10 * 4)  # three layers of [2, 10, 4]
    groups = index_module._groups([cpu] * 4 + [meta] * 3 + [cpu], 2, 10, 4)
    assert [list(g) for g in groups] == [[0, 1, 2], [3], [4, 5, 6], [7]]


def test_per_layer_devices_build_the_same_index():
    g = torch.Generator().manual_seed(1)
    keys = [torch.randn(2, 300, 8, generator=g) for _ in range(3)]
    values = [torch.randn(2, 300, 8, generator=g) for _ in range(3)]
    config = SqueezeConfig(window=20, sinks=2, centroid_ratio=0.1)
    together = build_indices(keys, values, config)
    per_layer = build_indices(keys, values, config, device=["cpu"] * 3)
    for a, b in zip(together, per_layer):
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name
    with pytest.raises(ValueError, match="one per layer"):
        build_indices(keys, values, config, device=["cpu"] * 2)


def test_storage_on_cpu_gives_the_same_index(llama, context):
    config = SqueezeConfig(keep=0.2, hierarchical=True, coarse_ratio=0.01)
    a = SqueezedCache.from_context(llama, context, config, progress=False)
    b = SqueezedCache.from_context(llama, context, config, progress=False, storage="cpu")
    for x, y in zip(a.fixed.layers, b.fixed.layers):
        for name, tensor in x.tensors().items():
            assert torch.equal(tensor, y.tensors()[name]), name
    assert a.fixed.rules == b.fixed.rules
    stats = a.build_stats
    assert stats["context_tokens"] == context.numel() and stats["prefill_seconds"] > 0 and stats["index_seconds"] > 0
    moved = a.to("cpu", non_blocking=True)
    assert moved.fixed.layers[0].keys.data_ptr() != 0 and torch.equal(moved.fixed.layers[0].keys, a.fixed.layers[0].keys)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_value_means_and_positions(hierarchical):
    """Every index records where each clustered key stood (for pins); rest="estimate" adds each
    cluster's mean value (and, two-level, each coarse cluster's), which rest="drop" does not store."""
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 600, 16, generator=g), torch.randn(2, 600, 16, generator=g)
    base = dict(centroid_ratio=0.05, coarse_ratio=0.01, hierarchical=hierarchical, kmeans_iters=5)
    dropped = build_indices([keys], [values], SqueezeConfig(**base))[0]
    assert dropped.value_means is None and dropped.coarse_value_means is None
    config = SqueezeConfig(rest="estimate", pin=0.0, **base)
    index = build_indices([keys], [values], config)[0]
    clustered = slice(config.sinks, 600 - config.window)
    for h in range(2):  # the cluster-sorted keys are the context's, at their positions
        assert torch.equal(index.keys[h], keys[h, clustered][index.positions[h].long()])
        assert torch.equal(index.positions[h].sort().values, torch.arange(index.clustered_tokens, dtype=torch.int32))
        for c in range(index.counts.shape[1]):
            start, stop = int(index.offsets[h, c]), int(index.offsets[h, c + 1])
            if stop > start:
                torch.testing.assert_close(index.value_means[h, c], index.values[h, start:stop].mean(0))
        if hierarchical:
            for c1 in range(index.coarse_counts.shape[1]):
                first, last = int(index.coarse_offsets[h, c1]), int(index.coarse_offsets[h, c1 + 1])
                start, stop = int(index.offsets[h, first]), int(index.offsets[h, last])
                if stop > start:
                    torch.testing.assert_close(index.coarse_value_means[h, c1], index.values[h, start:stop].mean(0))
