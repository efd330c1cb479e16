"""The one grader: a response and its record -> parsed, answer, correct, steps right.

Evaluation, Monte Carlo rollouts, labels, DPO pair scoring (through sampled rows), GRPO rewards
and voting all call `grade_response`, and the teacher filter and judge labels call `matches`,
the answer check it uses; benchmark records plug in their own official rule, synthetic ones are
checked step by step by the programmatic judge. An unparseable chain is wrong. No torch here.
"""

from __future__ import annotations

from .answers import is_correct
from .benchmarks import BENCHMARKS, grade, score
from .judge import ProgrammaticJudge
from .steps import Chain, FormatError, extract_answer, parse


def grade_response(text: str, record: dict, style: str = "cos", extractor=None) -> dict:
    """Grade one response: predicted answer, parsed, format error, steps, correct, and (on tasks
    with step facts) whether every step is right. `cos` needs a parseable chain; `direct` needs
    an answer span. Benchmark records are graded by their benchmark's own rule, which also reads
    free text."""
    if record.get("source") in BENCHMARKS:
        return grade(record["source"], text, record, extractor)
    steps = chain = None
    if style == "cos":
        try:
            chain = parse(text)
            predicted, steps, error = chain.answer, len(chain.steps), None
        except FormatError as err:
            predicted, error = None, err.code
    else:
        predicted = extract_answer(text)
        error = None if predicted is not None else "missing_answer"
    return {"predicted": predicted, "parsed": error is None, "format_error": error,
            "steps": steps, "correct": error is None and matches(predicted, record),
            "steps_right": chain_is_right(chain, record) if style == "cos" else None}


def matches(predicted: str | None, record: dict) -> bool:
    """`predicted` answers `record` under its task's rule: a benchmark's own for benchmark records
    (`chainstep.benchmarks`), exact match after normalisation otherwise."""
    if predicted is not None and record.get("source") in BENCHMARKS:
        return score(record["source"], predicted, record) > 0
    return is_correct(predicted, record["answer"])


def chain_is_right(chain: Chain | None, record: dict) -> bool | None:
    """Every step rated good by the programmatic judge; an unparseable chain (None) is not right.
    None when the record has no step facts to check."""
    if not record.get("meta", {}).get("steps"):
        return None
    return chain is not None and all(r == "good" for r in ProgrammaticJudge().rate(record, chain))
