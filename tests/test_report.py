"""report.html from a run directory's metrics: Table 1, the DPO sections, edge cases."""

import json

from chainstep.evaluate import summarize
from chainstep.report import write_report


def _preds(model_right: list[bool]) -> list[dict]:
    return [{"id": f"q{i}", "family": "count_sum" if i % 2 else "measure", "correct": ok, "parsed": ok,
             "steps": 3 if ok else None, "tokens": 40 + i} for i, ok in enumerate(model_right)]


def _round(pairs: int) -> dict:
    return {"pairs": pairs, "questions": 8, "questions_with_pairs": min(pairs, 8), "mean_gap": 0.1,
            "chosen_tokens": 100.0, "rejected_tokens": 120.0, "chosen_correct": 0.5, "rejected_correct": 0.1,
            "sampled": {"chains": 48, "correct": 0.2, "parsed": 0.8, "tokens": 110.0, "steps": 3.0}}


def test_report_with_dpo_rounds_ablation_and_a_zero_accuracy_model(tmp_path):
    results = [summarize(_preds([True, False] * 5), "sft"),
               summarize(_preds([True] * 6 + [False] * 4), "dpo-r1"),
               summarize(_preds([False] * 300), "dpo-r2"),  # 0% of 300: a bound 1e-18 off broke the plot
               summarize(_preds([True, False] * 5), "dpo-r1-outcome")]
    metrics = {"results": results, "comparisons": [],
               "dpo": {"rounds": {"dpo-r1": _round(6), "dpo-r2": _round(0)},
                       "ablation": {"dpo-r1-outcome": _round(4)}, "pair_source": "prm", "threshold": 0.05}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "stages").mkdir()
    html = write_report(tmp_path).read_text()
    table1 = html[html.index("Table 1"):html.index("Iterative DPO")]
    assert "dpo-r2" in table1 and "dpo-r1-outcome" not in table1  # ablation rows have their own table
    ablation = html[html.index("Pair-source ablation"):html.index("Paired comparisons")]
    assert "outcome" in ablation and "60.0" in html
    assert "reasoning length per round" in html
    assert "Reasoning modes" not in html  # the run trained no reasoning-mode ablation


def test_benchmark_results_in_the_paper_table_layout_with_categories(tmp_path):
    settings = {"max_tokens": 1024, "extraction": "rules", "instructions": ["Reason step by step."]}
    results = []
    for k, name in enumerate(("mathvista", "mmstar", "mmmu", "m3cot", "ai2d", "chartqa")):
        right = [True] * (k + 1) + [False] * 3
        preds = [{**p, "family": f"{name}-cat{i % 2}"} for i, p in enumerate(_preds(right))]
        results.append({**summarize(preds, "sft", split=name), "benchmark": name, **settings})
    results.append({**summarize(_preds([True, False]), "sft", "sc", 4, split="mmmu"), "benchmark": "mmmu",
                    **settings})
    (tmp_path / "metrics.json").write_text(json.dumps({"results": results}))
    html = write_report(tmp_path).read_text()
    layout = html[html.index("the paper's Table 1 layout"):html.index("MathVista — sft")]
    titles = ("MathVista", "MMStar", "MMMU", "M3CoT", "AI2D", "ChartQA")
    assert "".join(f"<th>{t}</th>" for t in titles) in layout
    assert "paper: InternVL2.5-MPO-8B" in layout and "69.4" in layout  # the published average
    average = sum((k + 1) / (k + 4) for k in range(6)) / 6
    assert f"{100 * average:.1f}" in layout  # our row has all six, so it has an average
    assert "sft (sc, N=4)" in layout
    assert "mmmu-cat0" in html and "max tokens 1024" in html
    assert "Table 1 — greedy decoding" not in html  # no synthetic-suite rows in this run


def test_the_verifier_cost_counts_its_stages_and_its_scoring_in_search(tmp_path):
    from chainstep.report import verifier_cost

    timings = [("sft", 600.0), ("sample", 50.0), ("label", 30.0), ("prm", 200.0), ("prm_eval", 20.0),
               ("search", 100.0)]
    cost = verifier_cost(timings, {"verifier_s": 25.0})
    assert cost["seconds"] == 325.0 and cost["share"] == 325.0 / 1000.0
    assert cost["parts"]["scoring in search"] == 25.0 and "sft" not in cost["parts"]
    assert verifier_cost([("sft", 600.0)], {}) is None
    metrics = {"results": [summarize(_preds([True, False]), "sft")], "comparisons": [],
               "search": {"verifier_s": 25.0}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "stages").mkdir()
    for name, secs in timings:
        (tmp_path / "stages" / f"{name}.json").write_text(json.dumps({"seconds": secs}))
    html = " ".join(write_report(tmp_path).read_text().split())
    assert "325 s of the run's 1000 s (32.5%)" in html
