import json

import pytest

from chainstep.layout import RunLayout
from chainstep.records import replace_jsonl
from chainstep.seeds import seed_dirs, summarize_seeds


def fake_run(folder, accuracy: dict[str, list[bool]]):
    layout = RunLayout(folder)
    layout.eval.mkdir(parents=True)
    results = []
    for model, correct in accuracy.items():
        replace_jsonl(layout.predictions(model, "test"),
                    [{"id": f"q{i}", "correct": c} for i, c in enumerate(correct)])
        results.append({"model": model, "strategy": "greedy", "n": 1, "split": "test",
                        "accuracy": sum(correct) / len(correct)})
    diff = (sum(accuracy["dpo"]) - sum(accuracy["sft"])) / len(accuracy["sft"])
    layout.metrics.write_text(json.dumps({"results": results, "comparisons": [
        {"a": "dpo", "b": "sft", "split": "test", "diff": diff}]}))


def test_seeds_give_mean_spread_and_a_pooled_paired_test(tmp_path):
    dirs = seed_dirs(tmp_path, 3)
    sft = [True] * 6 + [False] * 4
    fake_run(dirs[0], {"sft": sft, "dpo": [True] * 8 + [False] * 2})  # +2 questions
    fake_run(dirs[1], {"sft": sft, "dpo": [True] * 7 + [False] * 3})  # +1
    fake_run(dirs[2], {"sft": sft, "dpo": [True] * 5 + [False] * 5})  # -1
    summary = summarize_seeds(dirs)
    dpo = next(r for r in summary["results"] if r["model"] == "dpo")
    assert dpo["mean"] == pytest.approx(0.6667, abs=1e-3)
    assert (dpo["min"], dpo["max"], dpo["seeds"]) == (0.5, 0.8, 3)
    assert dpo["sd"] == pytest.approx(0.1528, abs=1e-3)
    (c,) = summary["comparisons"]
    assert c["n"] == 30 and c["only_a_correct"] == 3 and c["only_b_correct"] == 1
    assert c["diff"] == pytest.approx(2 / 30)
    assert (c["seeds_positive"], c["seeds_negative"]) == (2, 1)
    assert not c["significant"] and c["detectable"] > c["diff"]
