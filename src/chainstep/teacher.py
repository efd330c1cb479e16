"""Teachers write step chains for "reasoning from outcome": given the image, the question and
the ground-truth answer, explain how to get there in the step format.

A teacher is anything with `explain(record) -> str` returning raw text; `construct` parses and
filters it. The programmatic teacher reads the per-step facts the synthetic suite keeps in
`meta`; a remote model behind an OpenAI-compatible endpoint plugs into the same protocol.
"""

from __future__ import annotations

import random
from typing import Protocol

from .errors import ChainstepError
from .steps import Chain, Step, render

THOUGHTS = ("{key}: {value}", "{key}: {value}.", "From the image, {lkey}: {value}")
REFLECTIONS = {
    "read": ("This matches the image.", "Checked against the image.", "The image confirms this."),
    "arithmetic": ("The arithmetic is correct.", "Computed step by step.",
                   "Double-checked the calculation."),
    "option": ("This option matches the finding.", "The option letter agrees with the result."),
}


class Teacher(Protocol):
    def explain(self, record: dict) -> str:
        """Raw step-format text explaining how to reach `record['answer']`."""
        ...


def _step_kind(fact: dict) -> str:
    if "=" in fact["value"]:
        return "arithmetic"
    if "option" in fact["value"]:
        return "option"
    return "read"


class ProgrammaticTeacher:
    """Writes chains from the scene facts with varied wording, deterministic per record."""

    name = "programmatic"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def chain(self, record: dict) -> Chain:
        facts = record.get("meta", {}).get("steps")
        if not facts:
            raise ChainstepError(f"record {record['id']}: no step facts in meta; the programmatic "
                                 "teacher only serves the synthetic suite (use --teacher URL)")
        rng = random.Random(f"{self.seed}:{record['id']}")
        steps = []
        for fact in facts:
            kind = _step_kind(fact)
            templates = THOUGHTS if kind == "read" else THOUGHTS[:2]
            thought = rng.choice(templates).format(key=fact["key"], lkey=fact["key"].lower(),
                                                  value=fact["value"])
            steps.append(Step(fact["name"], thought, rng.choice(REFLECTIONS[kind])))
        return Chain(tuple(steps), record["answer"])

    def explain(self, record: dict) -> str:
        return render(self.chain(record))
