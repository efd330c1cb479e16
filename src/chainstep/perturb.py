"""Ground-truth chains with exactly one error put in and everything after it recomputed.

A verifier stronger than the policy needs data the policy never produced: these chains cost
nothing to label (the scene facts are known) and can be made for every training question.
Each comes with its clean twin (same wording, no error), so the PRM sees minimal pairs: two
chains that differ only where the first one goes wrong.

Error kinds, one per chain:
- `read`: a misread value; the final step then combines the misread value and the answer
  follows it.
- `copy`: the final step copies an operand that is not what the chain read; its arithmetic
  on the copied numbers is right.
- `arithmetic`: right operands, wrong result.
- `choice` / `letter`: multiple choice picks the wrong colour (with its right letter), or
  the right colour with the wrong letter.
- `answer`: the answer does not follow the final step.
Labels are good before the first error and bad from it on, answer tag included.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .steps import Chain, Step
from .synthetic import LETTERS, SIZES, arithmetic

ARITHMETIC_KINDS = ("read", "copy", "arithmetic", "answer")
CHOICE_KINDS = ("read", "choice", "letter", "answer")
_ARITH = re.compile(r"^(\d+(?: ([-+]) \d+)+) = (-?\d+)$")
_CHOICE = re.compile(r"^(\w+), option ([A-Z])$")


@dataclass(frozen=True)
class Perturbed:
    chain: Chain
    labels: list[int]  # one per step, then the answer tag
    kind: str
    first_error: int  # index of the first bad tag (len(steps) = the answer)


def clean_labels(chain: Chain) -> list[int]:
    return [1] * (len(chain.steps) + 1)


def perturb(record: dict, chain: Chain, rng: random.Random, kind: str | None = None) -> Perturbed:
    """`chain` (a right teacher chain of `record`) with one error of `kind` (random if None;
    another kind when this one cannot change the answer of this question)."""
    facts = record["meta"]["steps"]
    kinds = CHOICE_KINDS if _CHOICE.match(facts[-1]["value"]) else ARITHMETIC_KINDS
    order = [kind] if kind else []
    order += rng.sample([k for k in kinds if k != kind], len(kinds) - bool(kind))
    for k in order:
        if k in kinds and (made := _MAKERS[k](record, chain, rng)) is not None:
            return made
    raise ValueError(f"record {record['id']}: no perturbation changes the answer")


def _readings(record: dict) -> dict[str, str]:
    return {f["key"].split(" ")[0].lower(): f["value"] for f in record["meta"]["steps"][:-1]}


def _magnitude(value: str) -> int:
    return SIZES[value] if value in SIZES else int(value)


def _combine(record: dict, readings: dict[str, str]) -> tuple[str, str] | None:
    """The final step's value and the answer, recomputed from (possibly wrong) readings;
    None when a comparison becomes a tie."""
    final = record["meta"]["steps"][-1]
    key = final["key"].lower()
    values = {c: _magnitude(v) for c, v in readings.items()}
    if _ARITH.match(final["value"]):
        op = "-" if " minus " in key else "+"
        if key.startswith("tallest"):
            names = [max(values, key=values.get), min(values, key=values.get)]
        else:
            names = key.split(" minus " if op == "-" else " plus ")
        return _arithmetic([values[c] for c in names], op)
    want = max if key.split()[0] in ("most", "largest") else min
    best = want(values.values())
    picked = [c for c, v in values.items() if v == best]
    if len(picked) > 1:
        return None
    letter = LETTERS[record["options"].index(picked[0])]
    return f"{picked[0]}, option {letter}", letter


def _arithmetic(operands: list[int], op: str, result: int | None = None) -> tuple[str, str]:
    """The final step's value and the answer it gives."""
    expression, result = arithmetic(operands, op, result)
    return expression, str(result)


def _with_value(step: Step, old: str, new: str) -> Step:
    head, found, tail = step.thought.rpartition(old)
    if not found:
        raise ValueError(f"{old!r} is not in the step {step.thought!r}")
    return Step(step.name, head + new + tail, step.reflection)


def _nearby(value: int, rng: random.Random, low: int = 1) -> int:
    return rng.choice([v for v in (value - 2, value - 1, value + 1, value + 2) if v >= low])


def _finish(record: dict, kind: str, first: int, steps: list[Step], final: str,
            answer: str) -> Perturbed | None:
    if answer == record["answer"]:
        return None
    steps[-1] = _with_value(steps[-1], record["meta"]["steps"][-1]["value"], final)
    labels = [1] * first + [0] * (len(steps) + 1 - first)
    return Perturbed(Chain(tuple(steps), answer), labels, kind, first)


def _read(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    readings = _readings(record)
    for i in rng.sample(range(len(readings)), len(readings)):
        colour, value = list(readings.items())[i]
        if value in SIZES:
            candidates = rng.sample([s for s in SIZES if s != value], len(SIZES) - 1)
        else:
            candidates = [str(_nearby(int(value), rng))]
        for new in candidates:
            combined = _combine(record, {**readings, colour: new})
            if combined is None:
                continue
            steps = list(chain.steps)
            steps[i] = _with_value(steps[i], value, new)
            if (made := _finish(record, "read", i, steps, *combined)) is not None:
                return made
    return None


def _final_parts(record: dict) -> tuple[list[int], str, int]:
    """The final step's operands, its operator and its result ("6 + 1 + 2 = 9")."""
    expression, op, result = _ARITH.match(record["meta"]["steps"][-1]["value"]).groups()
    return [int(x) for x in re.findall(r"\d+", expression)], op, int(result)


def _copy(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    operands, op, _ = _final_parts(record)
    others = [_magnitude(v) for v in _readings(record).values()]
    i = int(rng.random() * len(operands))
    operands[i] = rng.choice([v for v in others if v != operands[i]] or [_nearby(operands[i], rng)])
    return _finish(record, "copy", len(chain.steps) - 1, list(chain.steps), *_arithmetic(operands, op))


def _wrong_arithmetic(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    operands, op, result = _final_parts(record)
    made = _arithmetic(operands, op, _nearby(result, rng, low=0))
    return _finish(record, "arithmetic", len(chain.steps) - 1, list(chain.steps), *made)


def _other_letter(record: dict, letter: str, rng: random.Random) -> str:
    return rng.choice([x for x in LETTERS[:len(record["options"])] if x != letter])


def _choice(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    picked = _CHOICE.match(record["meta"]["steps"][-1]["value"]).group(1)
    colour = rng.choice([c for c in _readings(record) if c != picked])
    letter = LETTERS[record["options"].index(colour)]
    return _finish(record, "choice", len(chain.steps) - 1, list(chain.steps),
                   f"{colour}, option {letter}", letter)


def _letter(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    picked = _CHOICE.match(record["meta"]["steps"][-1]["value"]).group(1)
    letter = _other_letter(record, record["answer"], rng)
    return _finish(record, "letter", len(chain.steps) - 1, list(chain.steps),
                   f"{picked}, option {letter}", letter)


def _answer(record: dict, chain: Chain, rng: random.Random) -> Perturbed | None:
    answer = (_other_letter(record, record["answer"], rng) if record.get("options")
              else str(_nearby(int(record["answer"]), rng, low=0)))
    labels = [1] * len(chain.steps) + [0]
    return Perturbed(Chain(chain.steps, answer), labels, "answer", len(chain.steps))


_MAKERS = {"read": _read, "copy": _copy, "arithmetic": _wrong_arithmetic, "choice": _choice,
           "letter": _letter, "answer": _answer}
