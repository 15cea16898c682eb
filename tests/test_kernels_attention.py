"""The sparse attention kernels (`kernels/attention.py`, fed by the lookup kernels) against their
readable reference, `kernels/naive.py`: one softmax over the kept keys, the sinks and window, and
the dynamic tokens. Outputs are written into a NaN-poisoned buffer, and the tests check the
kernels served (on the CPU they run under TRITON_INTERPRET=1)."""

import copy

import pytest
import torch

from hf_squeeze import SqueezeConfig, SqueezedCache, cache_kwargs, kernels
from hf_squeeze.attention import SparseAttention
from hf_squeeze.kernels import naive
from hf_squeeze.selection import Pinned

from .kernel_cases import (
    DEVICE,
    FLAT_RULES,
    TWO_LEVEL_RULES,
    assert_close,
    check_ranges,
    make_hier_index,
    make_index,
    make_inputs,
    padding_mask,
    poisoned,
    run_lookup,
)


def run_kernels(index, rule, query, dyn_k, dyn_v, mask=None, splits=1, pinned=None):
    """The kernels' output, written into a NaN-poisoned buffer, and the reference's."""
    scaling = query.shape[-1] ** -0.5
    expected = naive.attention(query, dyn_k, dyn_v, index, rule, scaling, mask,
                               None if pinned is None else pinned.mask.bool())
    key_valid = q_valid = None
    if mask is not None:
        tokens, dyn_len = query.shape[2], dyn_k.shape[2]
        key_valid = mask[:, 0, -1, :]
        t = torch.arange(tokens, device=query.device)
        q_valid = mask[:, 0, t, dyn_len - tokens + t]
    out = poisoned(query)
    stats = torch.zeros(1, dtype=torch.int64, device=query.device)
    got = kernels.attend(query, dyn_k, dyn_v, kernels.kernel_index(index), rule, scaling, key_valid, q_valid, stats,
                         splits, out, pinned=pinned)
    assert got.data_ptr() == out.data_ptr()
    return got.float(), expected.float()


@pytest.mark.parametrize(
    "dtype,kind,group,dim,splits",
    [(torch.float32, kind, group, dim, 4) for kind in FLAT_RULES for group, dim in ((1, 64), (4, 128), (7, 64))]
    + [(dtype, "budget", 3, 128, splits) for dtype in (torch.bfloat16, torch.float16) for splits in (1, 3)],
)
def test_decode_matches_the_reference(dtype, kind, group, dim, splits):
    index = make_index(dim=dim, dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=1, dyn_len=37)
    got, expected = run_kernels(index, FLAT_RULES[kind], query, dyn_k, dyn_v, splits=splits)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("pieces", [2, 4, 16])
def test_decode_tiles_of_other_sizes(pieces, monkeypatch):
    """The decode tile (pieces of kept rows per step, with and without pins, as bench_kernels.py
    --decode-pieces sets it) changes no output."""
    import importlib

    attention = importlib.import_module("hf_squeeze.kernels.attention")
    monkeypatch.setattr(attention, "DECODE_TILE", (pieces, 4))
    monkeypatch.setattr(attention, "PINNED_DECODE_TILE", (pieces, 4))
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=37)
    for pinned in (None, random_pins(index, batch=2, most=70)):
        got, expected = run_kernels(index, FLAT_RULES["budget"], query, dyn_k, dyn_v, splits=2, pinned=pinned)
        assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("piece_rows", [16, 32])
def test_other_piece_sizes_change_no_output(piece_rows, monkeypatch):
    """Views built with longer pieces of kept keys than the default (`layout.PIECE_ROWS`, as
    bench_kernels.py --piece-rows sets it) list the same
    keys and give the reference's output: decode with and without pins, flat and two-level, and a
    prefill (which gathers the kept keys by pieces)."""
    monkeypatch.setattr(kernels.layout, "PIECE_ROWS", piece_rows)
    for index, rules in ((make_index(), FLAT_RULES), (make_hier_index(), TWO_LEVEL_RULES)):
        assert kernels.kernel_index(index).piece_rows == piece_rows
        query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=11)
        for pinned in (None, random_pins(index, batch=2, most=40)):
            got, expected = run_kernels(index, rules["budget"], query, dyn_k, dyn_v, splits=2, pinned=pinned)
            assert_close(got, expected, torch.float32)
        ranges, _, _ = run_lookup(index, rules["budget"], query, query.shape[-1] ** -0.5)
        check_ranges(ranges, naive.lookup(query, index, query.shape[-1] ** -0.5, rules["budget"]), index)
        assert int(ranges.lengths[0, 0, : int(ranges.nsel[0, 0])].max()) <= piece_rows
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=9, dyn_len=14)
    got, expected = run_kernels(index, FLAT_RULES["budget"], query, dyn_k, dyn_v)
    assert_close(got, expected, torch.float32)


def random_pins(index, batch, most, seed=3) -> Pinned:
    """Random pinned keys: a different number per (row, head), some inside kept clusters."""
    g = torch.Generator().manual_seed(seed)
    heads, n = index.keys.shape[:2]
    rows = torch.stack([torch.stack([torch.randperm(n, generator=g)[:most] for _ in range(heads)]) for _ in range(batch)])
    count = torch.randint(0, most + 1, (batch, heads), generator=g)
    count[0, 0] = most
    valid = torch.arange(most) < count[..., None]
    mask = torch.zeros(batch, heads, n, dtype=torch.int8).scatter(-1, rows, valid.to(torch.int8))
    weights = torch.zeros(*mask.shape[:2], 1, mask.shape[2]).to(DEVICE)  # what chose them: not read by the kernels
    return Pinned(rows.to(torch.int32).to(DEVICE), count.to(torch.int32).to(DEVICE), mask.to(DEVICE), weights)


@pytest.mark.parametrize("dtype,kind,group,splits", [
    (torch.float32, "budget", 3, 1), (torch.float32, "threshold", 4, 3), (torch.float32, "none", 7, 2),
    (torch.bfloat16, "budget", 3, 4),
])
def test_decode_reads_pinned_keys_once(dtype, kind, group, splits):
    """Pinned keys (SqueezeConfig.pin) join the kept clusters' keys; those in both count once."""
    index = make_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=1, dyn_len=21)
    pinned = random_pins(index, batch=2, most=70)
    got, expected = run_kernels(index, FLAT_RULES[kind], query, dyn_k, dyn_v, splits=splits, pinned=pinned)
    assert_close(got, expected, dtype)
    without, _ = run_kernels(index, FLAT_RULES[kind], query, dyn_k, dyn_v, splits=splits)
    assert (got - without).abs().max() > 1e-3  # the pins changed what was read


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_counts_the_pinned_keys_and_the_step(splits):
    """A decode step's counters need no launch of their own: the decode kernel adds the pinned keys
    it reads to the keys read (after the lookup's kept keys) and, when asked, one step."""
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=9)
    rule, scaling = FLAT_RULES["budget"], query.shape[-1] ** -0.5
    kept = int((index.counts[None].cpu() * naive.lookup(query, index, scaling, rule).cpu()).sum())
    kindex = kernels.kernel_index(index)
    for pinned in (None, random_pins(index, batch=2, most=70)):
        stats, steps = (torch.full((1,), 5, dtype=torch.int64, device=DEVICE) for _ in range(2))
        kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, None, None, stats, splits, pinned=pinned, steps=steps)
        pins = 0 if pinned is None else int(pinned.count.sum())
        assert int(stats) == 5 + kept + pins and int(steps) == 5 + 1
        assert pins > 0 or pinned is None
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, None, None, stats, splits, pinned=pinned)
    assert int(stats) == kept + pins  # (no step counter asked for: none written)


def test_decode_reads_the_written_slots_as_they_come(monkeypatch):
    """The mask of a decode step's written slots (a fixed-capacity cache's) is read as it comes, bool
    or int8, with no conversion (a launch per layer and step); other dtypes and layouts are converted.
    All give the output of the slots cut to the written ones."""
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=20)
    written = torch.arange(20, device=DEVICE)[None].expand(2, -1) < torch.tensor([[13], [17]], device=DEVICE)
    rule, scaling, kindex = FLAT_RULES["budget"], query.shape[-1] ** -0.5, kernels.kernel_index(index)
    converted = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: converted.append(self.dtype) or real_to(self, *a, **k))
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    outputs = []
    for mask, conversions in ((written.contiguous(), 0), (written.to(torch.int8), 0), (written.int(), 1),
                              (written.t().contiguous().t(), 1)):
        converted.clear()
        outputs.append(kernels.attend(query, dyn_k, dyn_v, kindex, rule, scaling, mask, None, stats).float())
        assert converted.count(mask.dtype) == conversions, (mask.dtype, converted)
    for out in outputs[1:]:
        assert torch.equal(out, outputs[0])
    for b, n in ((0, 13), (1, 17)):  # the unwritten slots are not read
        alone = kernels.attend(query[b:b + 1], dyn_k[b:b + 1, :, :n], dyn_v[b:b + 1, :, :n], kindex, rule, scaling,
                               None, None, stats).float()
        assert_close(outputs[0][b:b + 1], alone, torch.float32)


@pytest.mark.parametrize("tokens", [1, 9])
def test_dynamic_part_read_in_place_from_a_larger_buffer(tokens, monkeypatch):
    """A cache layer's dynamic part is a view of a buffer with room to grow: the kernels read it
    through its strides, without a copy per step, and give what a contiguous copy gives."""
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=tokens, dyn_len=tokens + 6)
    room = [torch.randn(*dyn_k.shape[:2], dyn_k.shape[2] + 11, dyn_k.shape[3], device=DEVICE) for _ in range(2)]
    for buffer, part in zip(room, (dyn_k, dyn_v)):
        buffer[:, :, : part.shape[2]] = part
    views = [buffer[:, :, : dyn_k.shape[2]] for buffer in room]
    assert not views[0].is_contiguous()
    copies = []
    real = torch.Tensor.contiguous
    monkeypatch.setattr(torch.Tensor, "contiguous",
                        lambda self, *a, **k: copies.append(self.shape) or real(self, *a, **k) if not self.is_contiguous() else self)
    got, expected = run_kernels(index, FLAT_RULES["budget"], query, *views)
    assert tuple(views[0].shape) not in [tuple(c) for c in copies]
    assert_close(got, expected, torch.float32)


def test_two_level_decode_reads_pinned_keys_once():
    index = make_hier_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=9)
    got, expected = run_kernels(index, TWO_LEVEL_RULES["budget"], query, dyn_k, dyn_v, splits=2,
                                pinned=random_pins(index, batch=2, most=50))
    assert_close(got, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["budget", "threshold", "all"])  # all: the keys read in place, no gather
@pytest.mark.parametrize("group,tokens", [(3, 9), (4, 33)])
def test_prefill_matches_the_reference(dtype, kind, group, tokens):
    index = make_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=tokens, dyn_len=tokens + 5)
    got, expected = run_kernels(index, FLAT_RULES[kind], query, dyn_k, dyn_v)
    assert_close(got, expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_exact_prefill_reads_the_context_through_the_fused_kernels(dtype, splits, monkeypatch):
    """An exact prefill of enough query rows reads the clustered keys through torch's fused attention
    (`kernels/read_all.py`, rows folded over the group and the batch) and the rest in the prefill
    kernel, from that attention's state; row 0 has 3 padded dynamic tokens."""
    index = make_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=9, dyn_len=14)
    mask, valid = padding_mask(2, 9, dyn_k.shape[2], padded=3)
    calls = []  # the prefills the fused kernels served

    def spy(*args):
        found = fused(*args)
        calls.extend([1] if found is not None else [])
        return found

    fused = kernels.read_all.clustered_attention
    monkeypatch.setattr(kernels.read_all, "clustered_attention", spy)
    monkeypatch.setattr(kernels.read_all, "MIN_ROWS", 2 * 3 * 9)  # this prefill's rows: served
    got, expected = run_kernels(index, FLAT_RULES["all"], query, dyn_k, dyn_v, mask=mask, splits=splits)
    assert calls == [1]
    real = valid[:, dyn_k.shape[2] - 9:]
    assert_close(got[real], expected[real], dtype)
    monkeypatch.setattr(kernels.read_all, "MIN_ROWS", 2 * 3 * 9 + 1)  # one row fewer than it takes
    run_kernels(index, FLAT_RULES["all"], query, dyn_k, dyn_v, mask=mask, splits=splits)
    assert calls == [1]


@pytest.mark.parametrize("tokens", [1, 7])
def test_padding_masks_keys_and_query_tokens(tokens):
    """Left padding: row 0 has 4 padded dynamic tokens; padded query tokens do not vote."""
    index = make_index()
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=tokens, dyn_len=12)
    mask, valid = padding_mask(2, tokens, dyn_k.shape[2], padded=4)
    got, expected = run_kernels(index, FLAT_RULES["budget"], query, dyn_k, dyn_v, mask=mask, splits=2)
    real = valid[:, dyn_k.shape[2] - tokens :]  # outputs of padding query tokens are not used
    assert_close(got[real], expected[real], torch.float32)


@pytest.mark.parametrize("dtype,kind,group,tokens", [
    (torch.float32, "budget", 4, 1),
    (torch.float32, "threshold", 7, 1),
    (torch.bfloat16, "budget", 3, 1),
    (torch.float32, "budget", 3, 9),
    (torch.bfloat16, "threshold", 4, 7),
    (torch.float32, "all", 3, 9),
])
def test_two_level_index_matches_the_reference(dtype, kind, group, tokens):
    """Lookup over a two-level index then sparse attention, with left padding for the prefills."""
    index = make_hier_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=tokens, dyn_len=tokens + 6)
    mask, valid = padding_mask(2, tokens, dyn_k.shape[2], padded=3)
    got, expected = run_kernels(index, TWO_LEVEL_RULES[kind], query, dyn_k, dyn_v, mask=mask, splits=2)
    real = valid[:, dyn_k.shape[2] - tokens:]
    assert_close(got[real], expected[real], dtype)


def test_the_layer_takes_the_kernel_path_and_counts_what_it_reads(monkeypatch):
    """`SparseAttention.attend` dispatches to the kernels when asked to, and counts the keys the
    reference keeps."""
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if DEVICE == "cpu" else "auto")
    index = make_index()
    rule = FLAT_RULES["budget"]
    query, dyn_k, dyn_v = make_inputs(index, 3, tokens=1, dyn_len=5)
    layer = SparseAttention(index, rule)
    assert kernels.supports(index, query) is None
    layer.attend(query, dyn_k, dyn_v, None, 0.125)
    expected = (index.counts[None] * naive.lookup(query, index, 0.125, rule)).sum()
    assert int(layer.kernel_keys.sum()) == int(expected) > 0
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "0")
    assert kernels.supports(index, query) == "HF_SQUEEZE_KERNELS=0"


def test_forks_share_the_kernel_view_and_match_the_torch_path(llama, context, monkeypatch):
    """Through the model: the kernel path gives the torch path's logits, and the device view of the
    index is built once per cache, not once per request."""
    model = copy.deepcopy(llama).to(DEVICE)  # the session fixture stays on the CPU for the other tests
    question = torch.randint(3, 256, (7,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    cache = SqueezedCache.from_context(model, context.to(DEVICE), SqueezeConfig(keep=0.3), progress=False)
    outputs = {}
    for mode in ("0", "1" if DEVICE == "cpu" else "auto"):
        monkeypatch.setenv("HF_SQUEEZE_KERNELS", mode)
        request = cache.fork()
        with torch.no_grad():  # the question's prefill (exact, pins keys), then a step that reads the pins
            first = model(question[None], **cache_kwargs(model, request)).logits
            step = model(question[None, -1:], **cache_kwargs(model, request)).logits
        assert request.layers[0].attention.pinned is not None
        outputs[mode] = torch.cat([first, step], 1)
    views = cache.layers[0].attention.kernel_views
    assert len(views) == 1
    view = next(iter(views.values()))
    with torch.no_grad():
        model(question[None], **cache_kwargs(model, cache.fork()))
    assert len(views) == 1 and next(iter(cache.fork().layers[0].attention.kernel_views.values())) is view
    torch.testing.assert_close(outputs["0"], outputs["1" if DEVICE == "cpu" else "auto"], atol=1e-4, rtol=1e-4)


def test_kernel_path_serves_a_two_level_cache(llama, context, monkeypatch):
    """Through the model (prefill of a question, then one decode step): a two-level cache takes the
    kernel path and gives the torch path's logits, and both paths count the same centroids scored."""
    model = copy.deepcopy(llama).to(DEVICE)  # the session fixture stays on the CPU for the other tests
    question = torch.randint(3, 256, (6,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    config = SqueezeConfig(keep=0.3, hierarchical=True, centroid_ratio=0.1, coarse_ratio=0.02, kmeans_iters=5)
    cache = SqueezedCache.from_context(model, context.to(DEVICE), config, progress=False)
    kernel_mode = "1" if DEVICE == "cpu" else "auto"
    outputs, scored = {}, {}
    for mode in ("0", kernel_mode):
        monkeypatch.setenv("HF_SQUEEZE_KERNELS", mode)
        request = cache.fork()
        with torch.no_grad():
            logits = model(question[None], **cache_kwargs(model, request)).logits
            step = model(question[None, :1], **cache_kwargs(model, request)).logits
        outputs[mode] = torch.cat([logits, step], 1)
        scored[mode] = request.stats()["centroids_scored"]
        fine_by_kernels = sum(int(layer.attention.kernel_fine_scored.sum()) for layer in request.layers)
        assert (fine_by_kernels > 0) == (mode == kernel_mode)  # the kernels served the kernel mode
    torch.testing.assert_close(outputs["0"], outputs[kernel_mode], atol=1e-4, rtol=1e-4)
    assert scored["0"] == pytest.approx(scored[kernel_mode])
