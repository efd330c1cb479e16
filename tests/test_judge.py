import pytest

from chainstep.client import ChatClient
from chainstep.errors import ChainstepError
from chainstep.judge import HTTPJudge, JudgeError, JudgeVerifier, ProgrammaticJudge, parse_ratings
from chainstep.scoring import ChainScore
from chainstep.steps import STEP_END, Chain, Step, render
from chainstep.teacher import ProgrammaticTeacher

RECORD = {
    "id": "q1", "question": "How many red and blue shapes are there in total?", "options": None,
    "answer": "4", "image": None,
    "meta": {"steps": [
        {"name": "Count red", "key": "Red shapes", "value": "1"},
        {"name": "Count green", "key": "Green shapes", "value": "2"},
        {"name": "Count blue", "key": "Blue shapes", "value": "3"},
        {"name": "Add", "key": "Red plus blue", "value": "1 + 3 = 4"},
    ]},
}


def chain(*thoughts: str, answer: str = "4") -> Chain:
    return Chain(tuple(Step(f"s{i}", t, "ok") for i, t in enumerate(thoughts)), answer)


def test_teacher_chains_are_all_good(train_records):
    teacher, judge = ProgrammaticTeacher(), ProgrammaticJudge()
    for record in train_records:
        assert set(judge.rate(record, teacher.chain(record))) == {"good"}


def test_wrong_reading_is_bad_and_a_true_later_step_stays_good():
    ratings = ProgrammaticJudge().rate(RECORD, chain(
        "Red shapes: 2", "Green shapes: 2.", "From the image, blue shapes: 3", "Red plus blue: 1 + 3 = 4"))
    assert ratings == ["bad", "good", "good", "good"]


def test_an_error_carried_forward_is_neutral_a_new_one_bad():
    carried = chain("Red shapes: 2", "Green shapes: 2", "Blue shapes: 3", "Red plus blue: 2 + 3 = 5")
    assert ProgrammaticJudge().rate(RECORD, carried)[-1] == "neutral"
    miscomputed = chain("Red shapes: 2", "Green shapes: 2", "Blue shapes: 3", "Red plus blue: 2 + 3 = 6")
    assert ProgrammaticJudge().rate(RECORD, miscomputed)[-1] == "bad"
    fresh = chain("Red shapes: 1", "Green shapes: 2", "Blue shapes: 3", "Red plus blue: 1 + 3 = 5")
    assert ProgrammaticJudge().rate(RECORD, fresh)[-1] == "bad"
    three = {**RECORD, "meta": {"steps": [*RECORD["meta"]["steps"][:3],
                                          {"name": "Add", "key": "Red plus green plus blue",
                                           "value": "1 + 2 + 3 = 6"}]}}
    read = ("Red shapes: 2", "Green shapes: 2", "Blue shapes: 3")
    carried = chain(*read, "Red plus green plus blue: 2 + 2 + 3 = 7")
    assert ProgrammaticJudge().rate(three, carried) == ["bad", "good", "good", "neutral"]
    miscomputed = chain(*read, "Red plus green plus blue: 2 + 2 + 3 = 8")
    assert ProgrammaticJudge().rate(three, miscomputed)[-1] == "bad"


def test_unknown_repeated_or_unreadable_claims_are_bad():
    ratings = ProgrammaticJudge().rate(RECORD, chain(
        "Red shapes: 1", "Red shapes: 1", "Purple shapes: 0", "I think so"))
    assert ratings == ["good", "bad", "bad", "bad"]


def test_parse_ratings():
    assert parse_ratings("Step 1: Good\nstep 2 - neutral\nStep 3: BAD", 3) == ["good", "neutral", "bad"]
    with pytest.raises(JudgeError, match="expected 1..3"):
        parse_ratings("Step 1: Good\nStep 3: Bad", 3)


def test_http_judge_retries_then_rates(endpoint, train_records):
    record = train_records[0]
    steps = ProgrammaticTeacher().chain(record)
    text = "\n".join(f"Step {i + 1}: Good" for i in range(len(steps.steps)))
    server, url = endpoint(text, fail_first=2, status=429)
    judge = HTTPJudge(ChatClient(url, "judge-model", max_retries=3))
    assert judge.rate(record, steps) == ["good"] * len(steps.steps)
    assert len(server.requests) == 3
    content = server.requests[-1]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert record["question"] in content[1]["text"] and "Step 1:" in content[1]["text"]
    assert judge.usage == {"prompt_tokens": 10, "completion_tokens": 5}


def test_http_judge_gives_up_with_the_reason(endpoint, train_records):
    from chainstep.client import RemoteError

    server, url = endpoint("", fail_first=100, status=503)
    judge = HTTPJudge(ChatClient(url, "judge-model", max_retries=1))
    with pytest.raises(RemoteError) as err:
        judge.rate(train_records[0], ProgrammaticTeacher().chain(train_records[0]))
    assert err.value.reason == "http_503" and len(server.requests) == 2


RIGHT = chain("Red shapes: 1", "Green shapes: 2", "Blue shapes: 3", "Red plus blue: 1 + 3 = 4")
WRONG = chain("Red shapes: 2", "Green shapes: 2", "Blue shapes: 3", "Red plus blue: 2 + 3 = 5", answer="5")


def test_oracle_verifier_scores_steps_by_the_judge():
    right, wrong = JudgeVerifier().score([RECORD, RECORD], [render(RIGHT), render(WRONG)])
    assert right.steps == [1.0, 1.0, 1.0, 1.0] and right.answer == 1.0
    assert wrong.steps == [0.0, 1.0, 1.0, 0.5] and wrong.answer == 0.625
    partial = render(RIGHT)[:render(RIGHT).index(STEP_END) + len(STEP_END)]
    assert JudgeVerifier().score([RECORD], [partial])[0].steps == [1.0]
    assert JudgeVerifier().score([RECORD], [partial])[0].answer is None
    broken = render(RIGHT).replace("<|reasoning_end|>", "")  # steps readable, grammar broken
    scores = JudgeVerifier().score([RECORD], [broken])[0]
    assert scores.steps == [1.0, 1.0, 1.0, 1.0] and scores.answer == 0.0


def test_oracle_verifier_continuations_match_whole_chains():
    text = render(RIGHT)
    cut = text.index(STEP_END) + len(STEP_END)
    verifier = JudgeVerifier(flip=0.5)
    grouped = verifier.score_continuations([RECORD], [text[:cut]], [[text[cut:], render(WRONG)[cut:]]])
    assert grouped == [verifier.score([RECORD, RECORD], [text, text[:cut] + render(WRONG)[cut:]])]


def test_noisy_verifier_flips_that_share_of_verdicts_the_same_way_each_time(train_records):
    teacher = ProgrammaticTeacher()
    texts = [render(teacher.chain(r)) for r in train_records]
    noisy = JudgeVerifier(flip=0.3).score(train_records, texts)
    assert noisy == JudgeVerifier(flip=0.3).score(train_records, texts)
    steps = [v for s in noisy for v in s.steps]
    assert 0.15 < steps.count(0.0) / len(steps) < 0.45  # all 1.0 without noise
    assert all(v == 0.0 for s in JudgeVerifier(flip=1.0).score(train_records, texts) for v in s.steps)
    assert JudgeVerifier(flip=0.3, seed=1).score(train_records, texts) != noisy
    assert ChainScore()(noisy[0]) == pytest.approx(sum(noisy[0].steps) / len(noisy[0].steps))
    with pytest.raises(ChainstepError, match="flip"):
        JudgeVerifier(flip=1.5)
