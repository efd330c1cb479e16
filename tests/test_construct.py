from chainstep.construct import (
    FilterConfig,
    check_chain,
    construct,
    direct_response,
    plain_response,
    write_plain,
)
from chainstep.records import read_jsonl
from chainstep.steps import Chain, Step, parse, render
from chainstep.teacher import ProgrammaticTeacher


def test_teacher_chains_parse_and_reach_the_answer(train_records):
    teacher = ProgrammaticTeacher()
    for record in train_records:
        chain = parse(teacher.explain(record))
        assert chain.answer == record["answer"]
        assert len(chain.steps) == len(record["meta"]["steps"])
        for step, fact in zip(chain.steps, record["meta"]["steps"]):
            assert fact["key"].lower() in step.thought.lower()
            # the quantity is named before its value
            assert step.thought.lower().index(fact["key"].lower()) < step.thought.index(fact["value"])


def test_teacher_wording_varies_but_is_deterministic(train_records):
    teacher = ProgrammaticTeacher()
    texts = [teacher.explain(r) for r in train_records]
    assert texts == [teacher.explain(r) for r in train_records]
    reflections = {s.reflection for t in texts for s in parse(t).steps}
    assert len(reflections) >= 5


class FaultyTeacher:
    """Cycles through the ways a teacher can fail the filter."""

    def __init__(self):
        self.calls = 0

    def explain(self, record):
        self.calls += 1
        good = ProgrammaticTeacher().explain(record)
        kind = self.calls % 5
        if kind == 1:
            return good.replace("<|reasoning_end|>\n", "")
        if kind == 2:
            return render(Chain(parse(good).steps, "wrong answer"))
        if kind == 3:
            return render(Chain(parse(good).steps * 4, record["answer"]))
        if kind == 4:
            step = Step("n", "x" * 500, "r")
            return render(Chain((step,), record["answer"]))
        return good


def test_filter_rejects_with_reason_codes(tmp_path, suite_dir):
    stats = construct(suite_dir / "tasks" / "train.jsonl", tmp_path, FaultyTeacher(),
                      FilterConfig(max_steps=8, max_field_chars=300))
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert {r["reason"] for r in rejects} == {"format:missing_reasoning_end", "answer_mismatch",
                                               "too_many_steps", "field_too_long"}
    assert stats["accepted"] + stats["rejected"] == 40
    assert stats["accepted"] == 8


def test_construct_resumes_without_duplicates(tmp_path, suite_dir):
    tasks = suite_dir / "tasks" / "train.jsonl"
    construct(tasks, tmp_path, ProgrammaticTeacher())
    sft = tmp_path / "sft.jsonl"
    lines = sft.read_text().splitlines()
    sft.write_text("\n".join(lines[:10]) + "\n" + lines[10][:15])  # killed mid-write
    teacher = ProgrammaticTeacher()
    calls = []
    teacher.explain = lambda r, f=teacher.explain: calls.append(r["id"]) or f(r)
    cot = tmp_path / "cot.jsonl"
    cot.write_text("\n".join(cot.read_text().splitlines()[:5]) + "\n")
    construct(tasks, tmp_path, teacher)
    ids = [r["id"] for r in read_jsonl(sft)]
    assert len(ids) == len(set(ids)) == 40
    assert len(calls) == 30
    assert sorted(r["id"] for r in read_jsonl(cot)) == sorted(ids)  # the plain twins, none twice


def test_plain_twins_are_written_for_a_run_constructed_before_them(tmp_path, suite_dir):
    construct(suite_dir / "tasks" / "train.jsonl", tmp_path, ProgrammaticTeacher())
    (tmp_path / "cot.jsonl").unlink()
    write_plain(tmp_path / "sft.jsonl", tmp_path / "cot.jsonl")  # what the cot stage does first
    plain = read_jsonl(tmp_path / "cot.jsonl")
    assert sorted(r["id"] for r in plain) == sorted(r["id"] for r in read_jsonl(tmp_path / "sft.jsonl"))
    assert all("<|reasoning" not in r["response"] for r in plain)


def test_check_chain_and_direct_response(train_records):
    record = train_records[0]
    text = ProgrammaticTeacher().explain(record)
    assert check_chain(text, record, FilterConfig())[1] is None
    assert check_chain(text, record, FilterConfig(min_steps=9))[1] == "too_few_steps"
    assert direct_response("7") == "<|answer_start|>7<|answer_end|>"


def test_plain_reasoning_keeps_the_thoughts_and_the_answer_without_the_steps(train_records):
    from chainstep.grading import grade_response
    from chainstep.steps import parse

    record = train_records[0]
    chain = parse(ProgrammaticTeacher().explain(record))
    text = plain_response(chain)
    assert text.splitlines()[:len(chain.steps)] == [s.thought for s in chain.steps]
    assert "<|reasoning" not in text and chain.steps[0].name not in text.splitlines()
    graded = grade_response(text, record, "cot")
    assert graded["correct"] and graded["predicted"] == record["answer"] and graded["steps_right"] is None
    assert not grade_response(text, record, "cos")["parsed"]  # not a step chain
