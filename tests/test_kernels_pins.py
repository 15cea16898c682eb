"""The pins' key weights (`kernels/pins.py`): the input prefill's log-sum-exp per query row, written by
the attention kernels (`sparse_attention(lse=)`), then each key's exact attention probability summed
over the input's real tokens, against the torch path (`SparseAttention.input_weights`, over
`selection.key_weights`). The log-sum-exp buffer is NaN-poisoned before the call; on the CPU the
kernels run under TRITON_INTERPRET=1."""

import dataclasses

import pytest
import torch

from hf_squeeze import kernels
from hf_squeeze.attention import SparseAttention, dynamic_mask
from hf_squeeze.kernels import pins

from .kernel_cases import DEVICE, FLAT_RULES, make_index, make_inputs, padding_mask


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype,group,tokens,padded,splits", [
    (torch.float32, 3, 9, 5, 1), (torch.float32, 4, 70, 0, 3), (torch.bfloat16, 7, 9, 5, 2),
])
def test_key_weights_match_the_reference(dtype, group, tokens, padded, splits, fused, monkeypatch):
    """What pins keys on the kernel path: the prefill's log-sum-exp per query row (`lse=`), then each
    key's exact attention probability summed over the real input tokens (`kernels.key_weights`),
    against the torch path's (`SparseAttention.input_weights`). Row 0's first 2 query tokens are
    padding (they must not count); 70 tokens span two token tiles of 64 (the default's tile of 128
    serves the others). `fused`: the prefill reads the clustered keys through torch's fused
    attention (`kernels/read_all.py`), else in its own kernel."""
    monkeypatch.setattr(kernels.read_all, "MIN_ROWS", 1 if fused else 1 << 30)
    if tokens > 64:
        monkeypatch.setattr(pins, "BLOCK_T", 64)
    index = make_index(dtype=dtype)
    query, dyn_k, dyn_v = make_inputs(index, group, tokens=tokens, dyn_len=tokens + 3)
    mask, _ = padding_mask(2, tokens, dyn_k.shape[2], padded)
    scaling = query.shape[-1] ** -0.5
    dyn_mask, q_valid = dynamic_mask(mask, tokens, dyn_k.shape[2], DEVICE)
    view = kernels.kernel_index(index)
    lse = torch.full((2, view.heads, tokens * group), float("nan"), device=DEVICE)
    stats = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    kernels.attend(query, dyn_k, dyn_v, view, FLAT_RULES["all"], scaling, mask[:, 0, -1, :], q_valid, stats, splits,
                   lse=lse)
    got = kernels.key_weights(query, view, lse, scaling, q_valid)
    heads = index.keys.shape[0]
    q = query.view(2, heads, group, tokens, -1).float()
    # the reference in float32 on the same (rounded) inputs: the torch path's bf16 scores are coarser
    exact = dataclasses.replace(index, **{name: getattr(index, name).float()
                                          for name in ("keys", "values", "dense_keys", "dense_values")})
    expected = SparseAttention(exact, FLAT_RULES["all"]).input_weights(q, scaling, q_valid, dyn_k.float(), dyn_mask)
    assert got.shape == expected.shape == (2, heads, group, index.keys.shape[1])
    assert torch.isfinite(lse).all() and expected.sum() > 1.0
    assert ((got - expected).abs().max() / expected.abs().max()) <= 1e-4
    if padded:  # every real token's probabilities sum to at most 1: row 0 counts 2 tokens fewer
        assert got[0].sum(-1).max() <= tokens - 2 + 1e-3
