import json

import pytest

from chainstep.config import PRMConfig, load_config
from chainstep.errors import ChainstepError
from chainstep.judge import JudgeVerifier
from chainstep.scoring import ChainScore, StepScores, regroup, score_responses
from chainstep.teacher import ProgrammaticTeacher


def test_chain_score_formula():
    s = StepScores([0.5, 1.0, 0.0, 0.5], answer=0.9)
    assert ChainScore()(s) == pytest.approx(0.2 * 0.5 + 0.8 * 0.9)
    assert ChainScore(0.5, "min")(s) == pytest.approx(0.5 * 0.0 + 0.5 * 0.9)
    assert ChainScore(1.0, "last")(s) == pytest.approx(0.5)
    assert ChainScore(0.2, "prod")(s) == pytest.approx(0.8 * 0.9)
    assert ChainScore()(StepScores([0.4, 0.6], None)) == pytest.approx(0.5)
    assert ChainScore(0.7, "min").answer_only()(s) == pytest.approx(0.9)
    with pytest.raises(ChainstepError, match="prm.aggregate"):
        PRMConfig(aggregate="median")
    with pytest.raises(ChainstepError, match="prm.step_weight"):
        ChainScore(step_weight=1.5)


def test_a_verifier_carries_the_rule_it_was_trained_with_unless_overridden():
    trained = ChainScore.trained({"prm": {"step_weight": 0.6, "aggregate": "min"}})
    assert (trained.step_weight, trained.aggregate, trained.source) == (0.6, "min", "verifier")
    assert ChainScore.trained({}).source == "default"
    assert trained.override() is trained
    over = trained.override(aggregate="last")
    assert (over.step_weight, over.aggregate, over.source) == (0.6, "last", "override")
    assert json.loads(json.dumps(over.describe())) == {"step_weight": 0.6, "aggregate": "last",
                                                       "source": "override"}


def test_moved_keys_name_their_new_home():
    with pytest.raises(ChainstepError, match="is now 'prm.step_weight'"):
        load_config(overrides={"dpo.step_weight": 0.5})


def test_regroup_cuts_in_order():
    assert regroup([1, 2, 3, 4, 5], [2, 0, 3]) == [[1, 2], [], [3, 4, 5]]


def test_scored_as_samples_of_their_record_responses_keep_row_order(train_records):
    first, second = train_records[:2]
    right = [ProgrammaticTeacher().explain(r) for r in (first, second)]
    records, responses = [first, second, first, second], [right[0], right[1], right[1], right[0]]
    verifier = JudgeVerifier()
    got = score_responses(verifier, records, responses)
    assert got == verifier.score(records, responses)
    assert got[0] != got[2]  # a right and a wrong chain of one record: a reordering would show
