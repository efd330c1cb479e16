import random
import re

import pytest

from chainstep.checks import evaluate
from chainstep.config import SuiteConfig
from chainstep.judge import ProgrammaticJudge
from chainstep.perturb import ARITHMETIC_KINDS, CHOICE_KINDS, clean_labels, perturb
from chainstep.steps import parse, render
from chainstep.synthetic import generate
from chainstep.teacher import ProgrammaticTeacher

ARITH = re.compile(r"(\d+(?: [-+] \d+)+) = (-?\d+)")
CHOICE = re.compile(r"(\w+), option ([A-Z])")


def _kinds(record):
    return CHOICE_KINDS if record.get("options") else ARITHMETIC_KINDS


def _final_result(chain) -> str:
    thought = chain.steps[-1].thought
    found = ARITH.search(thought)
    return found.group(2) if found else CHOICE.search(thought).group(2)


@pytest.fixture(params=["two operands", "three operands"])
def records(request, train_records):
    """The shared suite's records, and a suite whose sums add three groups."""
    if request.param == "two operands":
        return train_records
    return [record for record, _ in generate(SuiteConfig(train=40, operands=3), "train")]


def _cases(records):
    teacher = ProgrammaticTeacher()
    for i, record in enumerate(records):
        for kind in _kinds(record):
            clean = teacher.chain(record)
            yield record, clean, perturb(record, clean, random.Random(i), kind)


def test_one_first_error_labels_bad_from_it_on(records):
    judge = ProgrammaticJudge()
    for record, clean, made in _cases(records):
        n, first = len(clean.steps), made.first_error
        assert made.labels == [1] * first + [0] * (n + 1 - first)
        assert made.chain.steps[:first] == clean.steps[:first]  # nothing wrong before the error
        assert made.chain.answer != record["answer"]
        assert parse(render(made.chain)) == made.chain
        ratings = judge.rate(record, made.chain)
        assert ratings[:first] == ["good"] * first
        if first < n:
            assert ratings[first] == "bad"


def test_everything_after_the_error_is_recomputed(records):
    judge = ProgrammaticJudge()
    seen, operands = set(), set()
    for record, clean, made in _cases(records):
        seen.add(made.kind)
        steps = made.chain.steps
        if made.kind == "answer":
            assert steps == clean.steps and made.chain.answer != _final_result(clean)
            continue
        assert made.chain.answer == _final_result(made.chain)  # the answer follows the last step
        arith = ARITH.search(steps[-1].thought)
        if arith:
            left, result = arith.groups()
            operands.add(left.count(" ") // 2 + 1)
            assert (evaluate(left) == int(result)) != (made.kind == "arithmetic")
        if made.kind == "read":  # the final step combines the misread value correctly
            assert judge.rate(record, made.chain)[-1] == "neutral"
            assert steps[made.first_error] != clean.steps[made.first_error]
        else:
            assert steps[:-1] == clean.steps[:-1]
    assert seen == set(ARITHMETIC_KINDS) | set(CHOICE_KINDS)
    asked = [ARITH.search(r["meta"]["steps"][-1]["value"]) for r in records]
    assert operands == {m.group(1).count(" ") // 2 + 1 for m in asked if m}  # 2, or 2 and 3


def test_a_kind_that_does_not_apply_falls_back(train_records):
    record = next(r for r in train_records if not r.get("options"))
    made = perturb(record, ProgrammaticTeacher().chain(record), random.Random(0), "letter")
    assert made.kind in ARITHMETIC_KINDS


def test_clean_labels_are_all_good(train_records):
    chain = ProgrammaticTeacher().chain(train_records[0])
    assert clean_labels(chain) == [1] * (len(chain.steps) + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_perturbations_are_deterministic(train_records, seed):
    record = train_records[1]
    chain = ProgrammaticTeacher().chain(record)
    assert perturb(record, chain, random.Random(seed)) == perturb(record, chain, random.Random(seed))
