"""Selection rules: budgets and calibrated thresholds read about `keep` of the clustered keys."""

import pytest

import hf_squeeze.attention as attention_module
from hf_squeeze import SqueezeConfig, SqueezedCache

from .conftest import PAPER, full_prompt, generate


def count_gathered(monkeypatch):
    """Count the fixed-context key rows attention actually gathers (independently of stats())."""
    seen = {"rows": 0, "selections": 0}
    original = attention_module.expand_ranges

    def counting(starts, lengths, width=None):
        rows, valid = original(starts, lengths, width)
        seen["rows"] += int(valid.sum())
        seen["selections"] += valid.shape[0] * valid.shape[1]
        return rows, valid

    monkeypatch.setattr(attention_module, "expand_ranges", counting)
    return seen


@pytest.mark.parametrize("selection", ["threshold", "topk"])
@pytest.mark.parametrize("keep", [0.1, 0.2])
def test_attended_fraction_tracks_keep(tiny, context, keep, selection, monkeypatch):
    config = SqueezeConfig(keep=keep, selection=selection, **PAPER)
    cache = SqueezedCache.from_context(tiny, context, config, progress=False)
    seen = count_gathered(monkeypatch)
    request = cache.fork()
    generate(tiny, full_prompt(context), request, max_new_tokens=20)
    stats = request.stats()
    assert abs(stats["attended_fraction"] - keep) <= 0.05, stats
    assert stats["selections"] == seen["selections"] == 20 * 2 * 2  # (1 prefill + 19 decode) x layers x heads
    independent = seen["rows"] / seen["selections"] / stats["clustered_tokens"]
    assert abs(independent - stats["attended_fraction"]) < 1e-9


def test_budget_rules():
    """Top-k needs no calibration: a budget of `keep` of the clustered keys (and `coarse_keep` for the
    coarse level); keep=1 reads everything; thresholds are refused here (they need queries)."""
    from hf_squeeze.calibration import budget_rules

    rules = budget_rules(3, 1000, SqueezeConfig(keep=0.1, hierarchical=True, coarse_margin=2.5, **PAPER))
    assert len(rules) == 3 and rules[0].budget == 100 and rules[0].coarse_budget == 250 and not rules[0].exact
    assert rules[0].pin_budget is None and not rules[0].exact_prefill
    # the default: half of keep pinned by the input's exact prefill, the lookup takes the other half
    pinned = budget_rules(3, 1000, SqueezeConfig(keep=0.1, pin=0.3))[0]
    assert (pinned.budget, pinned.pin_budget, pinned.exact_prefill) == (70, 30, True)
    assert budget_rules(2, 1000, SqueezeConfig(keep=1.0))[0].exact
    with pytest.raises(ValueError, match="calibrated on the observation window"):
        budget_rules(2, 1000, SqueezeConfig(keep=0.1, selection="threshold"))
