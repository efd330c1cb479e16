import json

import pytest

from chainstep.errors import ChainstepError
from chainstep.judge import JudgeVerifier
from chainstep.prm import PRM
from chainstep.scoring import ChainScore, StepScores, finished
from chainstep.steps import Chain, Step, render
from chainstep.verifier import UNCHECKED, CheckedVerifier, load_verifier, record_choice

RECORD = {"id": "q", "question": "How many red and blue shapes are there in total?", "options": None,
          "answer": "7", "image": "x.png"}


def chain(sum_line: str, answer: str) -> str:
    return render(Chain((Step("Count red", "Red shapes: 3", "ok"), Step("Count blue", "Blue shapes: 4", "ok"),
                         Step("Add", sum_line, "ok")), answer))


class FixedVerifier:
    """A base verifier that gives every step and answer one value."""

    def __init__(self, value: float):
        self.value, self.scoring, self.chains_scored, self.forward_passes = value, ChainScore(), 0, 3

    def score(self, records, responses):
        return [StepScores([self.value] * r.count("<|reasoning_step_end|>"),
                           self.value if "<|answer_end|>" in r else None) for r in responses]


def test_the_checks_verdicts_are_averaged_with_the_base_scores():
    verifier = CheckedVerifier(FixedVerifier(0.6))
    right, slip, copy = verifier.score([RECORD] * 3, [chain("Red plus blue: 3 + 4 = 7", "7"),
                                                      chain("Red plus blue: 3 + 4 = 8", "8"),
                                                      chain("Red plus blue: 3 + 4 = 7", "8")])
    unchecked = (UNCHECKED + 0.6) / 2
    assert right == StepScores([unchecked, unchecked, 0.8], 0.8)
    assert slip == StepScores([unchecked, unchecked, 0.3], 0.3)  # 8 is not what 3 and 4 give
    assert copy == StepScores([unchecked, unchecked, 0.8], 0.3)  # not what the chain concluded
    assert verifier.forward_passes == 3 and verifier.chains_scored == 3
    assert verifier.scoring(right) > verifier.scoring(copy) > verifier.scoring(slip)
    alone = CheckedVerifier()  # under the mean rule: the mean of the two verifiers' chain scores
    texts = [chain("Red plus blue: 3 + 4 = 8", "8")]
    both = verifier.scoring(verifier.score([RECORD], texts)[0])
    assert both == pytest.approx((alone.scoring(alone.score([RECORD], texts)[0]) + 0.6) / 2)


def test_checks_alone_and_partial_chains():
    verifier = CheckedVerifier()
    full = chain("Red plus blue: 3 + 4 = 7", "7")
    partial = full[:full.index("<|answer_start|>")]
    scores = verifier.score([RECORD] * 2, [full, partial])
    assert scores[0] == StepScores([UNCHECKED, UNCHECKED, 1.0], 1.0)
    assert scores[1].answer is None  # step search: not finished yet
    assert finished(scores[1]).answer == 0.0  # a finished chain without an answer: a wrong one


def test_checks_raise_the_oracle_judge_nowhere_and_lower_a_noisy_one(train_records):
    record = next(r for r in train_records if r["meta"]["steps"][-1]["value"].count("=") == 1)
    facts = record["meta"]["steps"]
    steps = tuple(Step(f["name"], f"{f['key']}: {f['value']}", "ok") for f in facts)
    right = render(Chain(steps, record["answer"]))
    expression, _, result = facts[-1]["value"].rpartition(" = ")
    wrong_sum = Step(facts[-1]["name"], f"{facts[-1]['key']}: {expression} = {int(result) + 1}", "ok")
    slip = render(Chain(steps[:-1] + (wrong_sum,), str(int(result) + 1)))
    oracle, checked = JudgeVerifier(), CheckedVerifier(JudgeVerifier())
    for verifier in (oracle, checked):  # the same order, and the slip's step judged bad by both
        good, bad = verifier.score([record] * 2, [right, slip])
        assert verifier.scoring(good) > verifier.scoring(bad) and bad.steps[-1] < 0.5 <= good.steps[-1]
    noisy = CheckedVerifier(JudgeVerifier(flip=1.0))  # every verdict flipped: calls the slip good
    assert JudgeVerifier(flip=1.0).score([record], [slip])[0].steps[-1] == 1.0
    assert noisy.score([record], [slip])[0].steps[-1] == 0.5


def test_load_verifier_reads_the_checks_setting(sft_model_dir, tmp_path):
    assert isinstance(load_verifier("checks"), CheckedVerifier)
    assert isinstance(load_verifier("judge:0.2"), JudgeVerifier)
    with pytest.raises(ChainstepError, match="judge:FLIP"):
        load_verifier("judge:lots")
    meta = json.loads((sft_model_dir / "chainstep.json").read_text())
    assert "checks" not in meta.get("prm", {})
    assert isinstance(load_verifier(sft_model_dir), PRM)  # a checkpoint that says nothing
    with_checks = load_verifier(sft_model_dir, checks=True)
    assert isinstance(with_checks, CheckedVerifier) and isinstance(with_checks.base, PRM)


def test_a_choice_recorded_beside_a_prm_reaches_load_verifier(sft_model_dir, tmp_path):
    import shutil

    prm_dir = shutil.copytree(sft_model_dir, tmp_path / "prm")
    meta = json.loads((prm_dir / "chainstep.json").read_text())
    meta["prm"] = {"checks": True, "step_weight": 0.4, "aggregate": "min"}
    (prm_dir / "chainstep.json").write_text(json.dumps(meta))
    assert isinstance(load_verifier(prm_dir).base, PRM)  # as trained: with the checks
    record_choice(prm_dir, "checks alone", {"checks alone": 0.9})
    checks = load_verifier(prm_dir)
    assert isinstance(checks, CheckedVerifier) and checks.base is None
    assert (checks.scoring.step_weight, checks.scoring.aggregate) == (0.4, "min")  # the PRM's rule
    assert isinstance(load_verifier(prm_dir, checks=False), PRM)  # the caller still decides
    record_choice(prm_dir, "learned PRM alone", {})
    assert isinstance(load_verifier(prm_dir), PRM)
    assert isinstance(load_verifier(prm_dir, checks=True).base, PRM)
    with pytest.raises(ChainstepError, match="unknown verifier"):
        record_choice(prm_dir, "both", {})
    (prm_dir / "verifier.json").write_text("{}")
    with pytest.raises(ChainstepError, match="verifier.json names no verifier"):
        load_verifier(prm_dir)
