"""The evaluation's baselines and batched rules against naive references, on random keys and a tiny model."""

import pytest
import torch

from hf_squeeze import cache_kwargs
from hf_squeeze.eval import baselines
from hf_squeeze.eval.contexts import ContextCaches
from hf_squeeze.eval.methods import Method, at_budget, default_methods, parse_methods
from hf_squeeze.selection import SelectionRule
from .kernel_cases import DEVICE


def random_kv(heads=2, n=300, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(heads, n, dim, generator=g), torch.randn(heads, n, dim, generator=g)


class _Layer:  # what a policy reads from a layer
    def __init__(self, index, rule, extra=None):
        self.index, self.rule, self.extra = index, rule, extra


def selected_tokens(selection, b, h):
    out = []
    for start, length in zip(selection.starts[b, h].tolist(), selection.lengths[b, h].tolist()):
        out += list(range(start, start + length))
    return sorted(out)


def test_oracle_selects_the_exact_top_keys():
    key, value = random_kv()
    index = baselines.oracle_index(key, value, sinks=4, window=10)
    q = torch.randn(1, 2, 1, 1, 8, generator=torch.Generator().manual_seed(3))  # one head per KV head, one token
    budget = 37
    selection = baselines.centroid_policy(_Layer(index, SelectionRule(budget=budget)), q, 0.35, None)
    for h in range(2):
        scores = index.keys[h] @ q[0, h, 0, 0]
        expected = sorted(scores.topk(budget).indices.tolist())
        assert selected_tokens(selection, 0, h) == expected


def test_quest_bound_and_page_selection():
    key, value = random_kv(n=333)
    index, low, high = baselines.page_index(key, value, sinks=4, window=10, page=16)
    assert index.offsets[0, -1] == index.keys.shape[1] == 333 - 14  # the last page is short
    q = torch.randn(1, 2, 1, 1, 8, generator=torch.Generator().manual_seed(7))
    bound = baselines.quest_scores(q, low, high, 1.0)[0, :, 0, 0]  # [H, P]
    for h in range(2):
        for p in range(index.counts.shape[1]):
            a, b = index.offsets[h, p], index.offsets[h, p + 1]
            page = index.keys[h, a:b]
            naive = torch.maximum(q[0, h, 0, 0] * page.amin(0), q[0, h, 0, 0] * page.amax(0)).sum()
            assert torch.allclose(bound[h, p], naive, atol=1e-5)
            assert bound[h, p] >= (page @ q[0, h, 0, 0]).max() - 1e-5  # an upper bound of every key's score
    budget = 64
    selection = baselines.quest_policy(_Layer(index, SelectionRule(budget=budget), (low, high)), q, 1.0, None)
    for h in range(2):
        expected, taken = [], 0
        for p in bound[h].argsort(descending=True).tolist():  # best pages until the budget is reached
            if taken >= budget:
                break
            expected += range(index.offsets[h, p], index.offsets[h, p + 1])
            taken += int(index.counts[h, p])
        expected.sort()
        assert selected_tokens(selection, 0, h) == expected


def test_streaming_reads_the_tokens_before_the_window():
    key, value = random_kv(n=200)
    index, _, _ = baselines.page_index(key, value, sinks=4, window=10, page=16)
    rule = SelectionRule(budget=torch.tensor([5, 50])[:, None, None])  # two rows, two budgets
    selection = baselines.streaming_policy(_Layer(index, rule), torch.randn(2, 2, 1, 1, 8), 1.0, None)
    n = index.keys.shape[1]
    assert selected_tokens(selection, 0, 1) == list(range(n - 5, n))
    assert selected_tokens(selection, 1, 0) == list(range(n - 50, n))


def test_budget_accounting():
    assert Method("squeezed", 0.3).budget == 0.325  # centroids (5%) count as keys only
    assert Method("squeezed", 0.3, hierarchical=True).budget == 0.33
    assert at_budget("quest", 0.125).keep == 0.0625  # min + max key per 16-token page
    assert at_budget("oracle", 0.125).keep == 0.125
    names = [m.name for m in parse_methods("full,flat-threshold-0.1,hier-topk@0.33,streaming@0.125")]
    assert names == ["full", "flat-threshold-0.1", "hier-topk-0.3", "streaming-0.125"]
    assert len(default_methods()) == 37
    pinned = parse_methods("flat-topk+exact+pin0.5-0.1,flat-topk+rest@0.125,flat-topk-0.1")
    assert [m.name for m in pinned] == ["flat-topk+exact+pin0.5-0.1", "flat-topk+rest-0.075", "flat-topk-0.1"]
    assert pinned[0].config().pin == 0.5 and pinned[0].config().prefill == "exact" and pinned[0].budget == 0.125
    assert pinned[2].config().pin == 0.0 and pinned[2].config().prefill == "lookup"  # the paper's method
    with pytest.raises(ValueError, match="only squeezed"):
        Method("oracle", 0.1, pin=0.5)
    with pytest.raises(ValueError, match="cannot read method"):
        parse_methods("squeezy-0.3")
    with pytest.raises(ValueError, match="metadata alone"):
        at_budget("quest", 0.05)


@pytest.mark.parametrize("label", ["flat-topk", "flat-threshold", "hier-topk", "flat-topk+exact+pin0.5", "quest", "oracle",
                                   "streaming"])
def test_rows_with_different_rules_answer_as_alone(tiny, context, label):
    """One batch carrying several keeps (per-row rules) gives each row what its own cache gives."""
    methods = parse_methods(",".join(f"{label}-{k}" for k in (0.5, 0.2)))
    caches = ContextCaches(tiny, context, progress=False)
    question = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    rows = question.shape[0]
    step = torch.tensor([[7], [9]])

    def logits(ids, cache):  # the question's prefill, then one decode step (where pinned keys are read)
        kwargs = cache_kwargs(tiny, cache)
        first = tiny(ids, **kwargs).logits
        return torch.cat([first, tiny(step.repeat(ids.shape[0] // rows, 1), **kwargs).logits], 1)

    with torch.no_grad():
        batched = logits(question.repeat(len(methods), 1), caches.cache(methods, rows=rows).fork())
        for k, method in enumerate(methods):
            alone = logits(question, caches.cache([method], rows=rows).fork())
            torch.testing.assert_close(batched[k * rows : (k + 1) * rows], alone, atol=1e-5, rtol=1e-5)
        if label != "streaming":  # different keeps read different keys: the rows must differ
            assert not torch.allclose(batched[:rows], batched[rows:], atol=1e-4)


def test_full_reads_everything(tiny, context):
    caches = ContextCaches(tiny, context, progress=False)
    cache = caches.cache([Method("full")], rows=1).fork()
    question = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        squeezed = tiny(question, **cache_kwargs(tiny, cache)).logits
        reference = tiny(torch.cat([context[None], question], 1)).logits[:, -5:]
    torch.testing.assert_close(squeezed, reference, atol=1e-4, rtol=1e-4)
    read, _ = cache.row_stats()
    assert read == [1.0]


def test_a_squeezed_method_alone_takes_the_kernel_path(tiny, context, monkeypatch):
    """attention="kernels": a squeezed method in its own batch reads through the Triton kernels (the
    interpreter here) and answers as the torch path does, its reads still counted per row."""
    monkeypatch.setenv("HF_SQUEEZE_KERNELS", "1" if DEVICE == "cpu" else "auto")
    method = parse_methods("flat-topk+exact+pin0.5-0.2")[0]
    caches = ContextCaches(tiny, context[:200], progress=False)  # (the interpreter runs each kernel)
    question = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    step = torch.tensor([[7], [9]])
    results = {}
    for kernels in (False, True):
        request = caches.cache([method], rows=2, kernels=kernels).fork()
        with torch.no_grad():
            first = tiny(question, **cache_kwargs(tiny, request)).logits
            results[kernels] = torch.cat([first, tiny(step, **cache_kwargs(tiny, request)).logits], 1)
        served = int(request.layers[0].attention.kernel_keys.sum()) > 0
        assert served == kernels
        read, _ = request.row_stats()
        assert len(read) == 2 and all(0 < r < 1 for r in read)
    torch.testing.assert_close(results[True], results[False], atol=1e-4, rtol=1e-4)


def test_enough_questions_stops_each_task_at_its_count():
    from hf_squeeze import ruler
    from hf_squeeze.eval import enough_questions

    def sample(task, i, questions):
        qs = [ruler.Question(f"q{k}", "", [str(k)]) for k in range(questions)]
        return ruler.Sample(f"{task}-{i}", task, "niah", [], "context", qs, 8)

    # round-robin, as a run's samples are: one task asks 4 questions per context, the other 1
    samples = [s for i in range(6) for s in (sample("multi", i, 4), sample("single", i, 1))]
    picked = enough_questions(samples, 5)
    assert [s.id for s in picked] == ["multi-0", "single-0", "multi-1", "single-1", "single-2", "single-3", "single-4"]
    assert enough_questions(samples, None) is samples
    assert len(enough_questions(samples, 100)) == len(samples)
    with pytest.raises(ValueError, match="questions_per_task"):
        enough_questions(samples, 0)


def test_report_judges_the_targets_with_paired_errors():
    from hf_squeeze.eval.report import AVERAGE, _targets

    def rows(method, budget, gap, se, scores):
        task = dict(task="vt", method=method, budget=budget, score=sum(scores) / len(scores), scores=scores)
        return [task, dict(task=AVERAGE, method=method, budget=budget, gap=gap, gap_se=se)]

    quest = [100.0, 100.0, 0.0, 100.0]
    summary = dict(model="qwen2.5-coder-0.5b", tasks=["vt"], methods=["full", "flat-topk+exact+pin0.5-0.1", "quest-0.0625"], table=(
        rows("full", 1.0, 0.0, 0.0, [100.0] * 4)
        + rows("flat-topk+exact+pin0.5-0.1", 0.125, -0.9, 0.5, [0.0, 0.0, 100.0, 100.0])
        + rows("quest-0.0625", 0.125, -25.0, 5.0, quest)))
    (line,) = _targets(summary)
    assert "average gap -0.90 ± 0.50: met (target >= -1)" in line
    # paired differences -100, -100, +100, 0: mean -25, standard error 47.9: below, but within one
    assert "vt (50.0 vs 75.0: -25.0 ± 47.9, within a standard error)" in line
    summary["table"][3]["gap"] = -1.5
    assert "missed by 0.50 points, but within two standard errors (1.00) of the target -1" in _targets(summary)[0]


def test_report_holds_a_model_to_its_own_target():
    from hf_squeeze.eval.report import AVERAGE, _targets

    name = "flat-topk+exact+pin0.5-0.3"
    table = [dict(task=AVERAGE, method="full", budget=1.0, gap=0.0, gap_se=0.0),
             dict(task=AVERAGE, method=name, budget=0.325, gap=-2.2, gap_se=0.7)]
    summary = dict(model="smollm2", tasks=["vt"], methods=["full", name], table=table)
    assert "-2.20 ± 0.70 points: met (target >= -3)" in _targets(summary)[0]
    summary["model"] = "qwen2.5-coder-0.5b"
    assert "missed by 1.70 points" in _targets(summary)[0]
