"""A tiny slice of the RULER evaluation on SmolLM2, so that the harness cannot rot.

One short context per task family, one method of each kind, a few answer tokens: it checks that
samples are well formed, every method answers, scores are RULER's, a run resumes without redoing
anything, and the report (CSV, markdown, PNG) is written.
"""

import json

import pytest

from hf_squeeze import ruler
from hf_squeeze.eval import run_eval
from hf_squeeze.eval.runner import read_results

TASKS = "niah_multikey_2,vt,cwe,fwe,qa_1"
METHODS = "full,flat-topk-0.3,flat-topk-0.1,quest@0.125,streaming@0.125,oracle@0.125"  # five batches per context
LENGTH = 1200


def test_samples_fit_and_hold_their_answers(smollm2):
    _, tokenizer = smollm2
    tasks = [t for t in ruler.task_names("all") if t != "qa_2"]  # one HotpotQA question brings ~2K tokens of documents
    samples = ruler.make_samples(tokenizer, tasks, 1500, 1, 3, progress=False)
    assert {s.family for s in samples} == set(ruler.FAMILIES)
    assert len(samples) == len(ruler.task_configs()) - 1
    for sample in samples:
        context, questions = ruler.prompt_ids(tokenizer, sample)
        assert len(context) + max(map(len, questions)) + sample.tokens_to_generate <= 1500, sample.id
        for question in sample.questions:
            for answer in question.answers:
                if sample.family in ("niah", "variable_tracking", "freq_words_extraction"):
                    assert answer in sample.context, (sample.id, answer)
        if sample.task == "niah_multikey_1":
            assert len(sample.questions) == 3  # several needles, asked one at a time
    # the RULER metrics themselves
    assert ruler.metric("niah")(["a 123 b 456"], [["123", "456"]]) == [100.0]
    assert ruler.metric("niah")(["a 123"], [["123", "456"]]) == [50.0]
    assert ruler.metric("qa")(["Paris, France"], [["paris", "lyon"]]) == [100.0]


def test_tiny_slice_runs_resumes_and_reports(smollm2, tmp_path):
    model, tokenizer = smollm2
    folder = tmp_path / "run"
    kwargs = dict(model="smollm2", max_seq_length=LENGTH, tasks=TASKS, contexts_per_task=1, questions_per_context=2,
                  methods=METHODS, max_new_tokens={f: 2 for f in ruler.FAMILIES}, progress=False, loaded=(model, tokenizer))
    result = run_eval(folder, **kwargs)
    rows = read_results(folder)
    methods = METHODS.split(",")
    assert len(rows) == 5 * len(methods)
    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
        assert row["context_tokens"] <= LENGTH
        for q in row["questions"]:
            assert 0.0 <= q["score"] <= 100.0 and 1 <= q["new_tokens"] <= 2
    assert set(by_method) == {m.replace("@0.125", "-0.125").replace("quest-0.125", "quest-0.0625") for m in methods}
    for row in by_method["flat-topk-0.3"]:
        assert abs(row["read_fraction"] - 0.3) < 0.03  # top-k reads its keep
    for row in by_method["full"]:
        assert row["read_fraction"] == pytest.approx(1.0)
    for row in by_method["streaming-0.125"]:
        assert row["read_fraction"] == pytest.approx(0.125, abs=0.01)

    # a crash mid-line loses that line only; resuming redoes it and nothing else
    path = next(folder.glob("results-*.jsonl"))
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])
    run_eval(folder, **kwargs)
    again = read_results(folder)
    assert len(again) == len(rows)
    assert {(r["sample"], r["method"]) for r in again} == {(r["sample"], r["method"]) for r in rows}

    for name in ("results.csv", "results.md", "accuracy_vs_budget.png"):
        assert (folder / name).stat().st_size > 0
    summary = result["summaries"][0]
    assert summary["contexts"] == 5
    assert "| flat-topk-0.3 | 0.325 |" in (folder / "results.md").read_text()
    spec = json.loads((folder / "run.json").read_text())
    assert spec["max_seq_length"] == LENGTH


def test_greedy_decode_answers_as_generate(smollm2, tmp_path):
    """decode="greedy" (one generate_greedy call per answer: CUDA graphs on a GPU, eager here) gives
    the answers and the reads of the batched model.generate path."""
    model, tokenizer = smollm2
    methods = "full,flat-topk+exact+pin0.5-0.1,quest@0.125,oracle@0.125"  # each kind of cache once
    kwargs = dict(model="smollm2", max_seq_length=LENGTH, tasks="niah_multikey_1", contexts_per_task=1,
                  questions_per_context=2, methods=methods, max_new_tokens={f: 6 for f in ruler.FAMILIES},
                  progress=False, loaded=(model, tokenizer))
    rows = {}
    for decode in ("generate", "greedy"):
        run_eval(tmp_path / decode, decode=decode, **kwargs)
        rows[decode] = {(r["sample"], r["method"]): r for r in read_results(tmp_path / decode)}
    assert rows["generate"].keys() == rows["greedy"].keys() and len(rows["greedy"]) == 4  # one sample, four methods
    for key, batched in rows["generate"].items():
        alone = rows["greedy"][key]
        assert [q["pred"] for q in alone["questions"]] == [q["pred"] for q in batched["questions"]], key
        assert alone["batch_rows"] == 1
        assert alone["read_fraction"] == pytest.approx(batched["read_fraction"], abs=0.03), key
    # threads of one process (each on its own CUDA stream on a GPU) answer as one thread does
    run_eval(tmp_path / "threads", decode="greedy", threads=2, **{**kwargs, "methods": "full,flat-topk+exact+pin0.5-0.1"})
    threaded = {(r["sample"], r["method"]): r for r in read_results(tmp_path / "threads")}
    assert len(threaded) == 2 and threaded.keys() <= rows["greedy"].keys()
    for key, row in threaded.items():
        assert [q["pred"] for q in row["questions"]] == [q["pred"] for q in rows["greedy"][key]["questions"]], key
    assert (tmp_path / "threads" / "results-0-0.jsonl").is_file()
    with pytest.raises(ValueError, match="decode='fast'"):
        run_eval(tmp_path / "bad", decode="fast", **kwargs)
    for threads in (0, 33):
        with pytest.raises(ValueError, match=f"threads={threads} must be 1 ... 32"):
            run_eval(tmp_path / "bad", threads=threads, **kwargs)
    with pytest.raises(ValueError, match="decode='compiled'"):
        run_eval(tmp_path / "bad", threads=2, decode="compiled", **kwargs)
