import json

import pytest

from chainstep.evaluate import (
    clopper_pearson,
    mcnemar_p,
    paired_comparison,
    summarize,
    update_metrics,
    wilson,
)
from chainstep.grading import grade_response
from chainstep.steps import Chain, Step, render

GOOD = render(Chain((Step("Count red", "Red shapes: 3", "Ok."),), "3"))
RECORD = {"id": "q", "answer": "3"}


def test_unparseable_output_is_wrong_even_with_the_right_answer():
    broken = GOOD.replace("<|reasoning_end|>\n", "")
    scored = grade_response(broken, RECORD)
    assert not scored["parsed"] and not scored["correct"]
    assert scored["format_error"] == "missing_reasoning_end"
    assert grade_response(GOOD, RECORD)["correct"]
    assert not grade_response(GOOD, {"id": "q", "answer": "4"})["correct"]


def test_direct_style_needs_only_the_answer_span():
    assert grade_response("<|answer_start|>3<|answer_end|>", RECORD, "direct")["correct"]
    scored = grade_response("3", RECORD, "direct")
    assert not scored["parsed"] and not scored["correct"]


def test_right_answer_from_a_wrong_step_is_correct_but_not_a_right_chain():
    facts = {"steps": [{"name": "Count red", "key": "Red shapes", "value": "3"}]}
    record = {**RECORD, "meta": facts}
    assert grade_response(GOOD, record)["steps_right"] is True
    lucky = GOOD.replace("Red shapes: 3", "Red shapes: 2")
    scored = grade_response(lucky, record)
    assert scored["correct"] and scored["steps_right"] is False
    assert grade_response(lucky.replace("<|reasoning_end|>\n", ""), record)["steps_right"] is False
    assert grade_response(GOOD, RECORD)["steps_right"] is None  # no facts to check
    preds = [{**_pred(i, True), "steps_right": right} for i, right in enumerate([True, False, None])]
    assert summarize(preds, "sft")["right_chain_rate"] == 0.5
    assert summarize([_pred(0, True)], "sft")["right_chain_rate"] is None


def _pred(i, correct, parsed=True, family="f"):
    return {"id": str(i), "family": family, "correct": correct, "parsed": parsed,
            "steps": 2 if parsed else None, "tokens": 10}


def test_summarize_counts_parse_failures():
    preds = [_pred(0, True), _pred(1, False, parsed=False), _pred(2, False, family="g"),
             _pred(3, True, family="g")]
    row = summarize(preds, "sft")
    assert row["accuracy"] == 0.5
    assert row["parse_failure_rate"] == 0.25
    assert row["per_family"] == {"f": 0.5, "g": 0.5}
    assert row["ci_low"] < 0.5 < row["ci_high"]
    assert row["avg_steps"] == 2


def test_wilson_interval():
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-3) and high == pytest.approx(0.5962, abs=1e-3)
    assert wilson(0, 20)[0] == 0.0 and wilson(0, 20)[1] > 0.1
    assert wilson(20, 20)[1] == pytest.approx(1.0)
    assert wilson(0, 300)[0] == 0.0 and wilson(300, 300)[1] == 1.0  # exact, not off by rounding


def test_mcnemar_exact():
    assert mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)
    assert mcnemar_p(10, 0) < 0.01


def test_paired_comparison_tells_gain_from_noise():
    a = [_pred(i, i % 10 < 6) for i in range(300)]
    b = [_pred(i, i % 10 < 5) for i in range(300)]
    c = paired_comparison(a, b, "a", "b")
    assert c["diff"] == pytest.approx(0.1) and c["significant"]
    noisy = [_pred(i, (i * 7) % 10 < 6) for i in range(300)]
    c = paired_comparison(noisy, [_pred(i, (i * 3) % 10 < 6 if i % 2 else (i * 7) % 10 < 6)
                                  for i in range(300)], "x", "y")
    assert not c["significant"] and c["ci_low"] < 0 < c["ci_high"]


def test_significance_follows_the_exact_test():
    # 4 questions only `a` gets right, none the other way, 296 ties: a Wald interval on the
    # per-question differences excludes 0, but the exact McNemar p is 2 / 16 = 0.125
    a = [_pred(i, i < 4) for i in range(300)]
    b = [_pred(i, False) for i in range(300)]
    c = paired_comparison(a, b, "a", "b")
    assert c["p_value"] == pytest.approx(0.125)
    assert not c["significant"] and c["ci_low"] <= 0 < c["ci_high"]
    # 6 vs 0: p = 2 / 64 < 0.05, and the interval agrees
    c = paired_comparison([_pred(i, i < 6) for i in range(300)], b, "a", "b")
    assert c["significant"] and 0 < c["ci_low"] < c["diff"] <= c["ci_high"]


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (3, 0), (5, 1), (9, 2), (20, 10), (40, 25), (13, 13)])
def test_interval_excludes_zero_exactly_when_p_is_small(only_a, only_b):
    a = [_pred(i, i < only_a) for i in range(100)]
    b = [_pred(i, only_a <= i < only_a + only_b) for i in range(100)]
    c = paired_comparison(a, b, "a", "b")
    assert c["significant"] == (c["p_value"] < 0.05) == (c["ci_low"] > 0 or c["ci_high"] < 0)
    assert c["ci_low"] <= c["diff"] <= c["ci_high"]


def test_clopper_pearson():
    low, high = clopper_pearson(3, 10)
    assert low == pytest.approx(0.0667, abs=1e-3) and high == pytest.approx(0.6525, abs=1e-3)
    assert clopper_pearson(0, 5)[0] == 0.0 and clopper_pearson(5, 5)[1] == 1.0


def test_thousands_of_discordant_pairs_pooled_over_seeds():
    """Three seeds of 1,000 questions: binomial coefficients beyond a float's range."""
    assert mcnemar_p(0, 427) == pytest.approx(2 * 0.5 ** 427)
    assert mcnemar_p(600, 640) == pytest.approx(0.268, abs=0.005)
    low, high = clopper_pearson(1200, 1300)
    assert 0.907 < low < 0.923 < high < 0.937


def test_update_metrics_replaces_rows_by_key(tmp_path):
    path = tmp_path / "metrics.json"
    row = summarize([_pred(0, True)], "sft")
    update_metrics(path, [row])
    update_metrics(path, [{**row, "accuracy": 0.0}, summarize([_pred(0, False)], "base")])
    results = json.loads(path.read_text())["results"]
    assert len(results) == 2
    assert {r["model"]: r["accuracy"] for r in results} == {"sft": 0.0, "base": 0.0}
    for key in ("model", "strategy", "n", "split", "accuracy", "per_family",
                "parse_failure_rate", "avg_steps", "avg_tokens", "ci_low", "ci_high"):
        assert key in results[0]


def test_predictions_resume_only_under_the_same_model_and_settings(tiny_model_dir, sft_model_dir,
                                                                   test_records, tmp_path):
    from chainstep.errors import ChainstepError
    from chainstep.evaluate import predict
    from chainstep.sampling import Policy, SamplingParams

    out = tmp_path / "sft-test.jsonl"
    records = test_records[:2]
    policy = Policy.from_dir(sft_model_dir)
    first = predict(policy, records, out, params=SamplingParams(max_tokens=8))
    calls = []
    policy.generate = lambda *a, **k: calls.append(1)  # a resume must not generate again
    assert predict(policy, records, out, params=SamplingParams(max_tokens=8)) == first and not calls
    with pytest.raises(ChainstepError, match="other settings \\(params differ"):
        predict(policy, records, out, params=SamplingParams(max_tokens=16))
    other = Policy.from_dir(tiny_model_dir("llava"))  # another model, same file name
    with pytest.raises(ChainstepError, match="other settings \\(model differ"):
        predict(other, records, out, params=SamplingParams(max_tokens=8))


def test_a_cut_sampling_run_redraws_exactly_what_it_would_have_drawn(sft_model_dir, test_records, tmp_path):
    """A kill mid-chunk, or a resumed stage whose earlier split was already done, must end with
    the rows an uninterrupted run writes (the kill/resume bench found val samples redrawn)."""
    from chainstep.evaluate import sample_responses
    from chainstep.records import read_jsonl
    from chainstep.sampling import Policy, SamplingParams

    params = SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=0)
    train, val = test_records[:3], test_records[3:6]
    policy = Policy.from_dir(sft_model_dir)
    sample_responses(policy, train, tmp_path / "train.jsonl", params)
    sample_responses(policy, val, tmp_path / "val.jsonl", params)  # after train, in one process
    whole = read_jsonl(tmp_path / "val.jsonl")
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(line for line in (tmp_path / "val.jsonl").read_text().splitlines(True)[:3]))
    (tmp_path / "cut.settings.json").write_text((tmp_path / "val.settings.json").read_text())
    sample_responses(Policy.from_dir(sft_model_dir), val, cut, params)  # a fresh process, val only
    assert read_jsonl(cut) == whole
