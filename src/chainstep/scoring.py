"""How a verifier's step scores become one chain score: the one rule search, DPO pair scores,
GRPO rewards and the server apply.

A trained PRM carries the rule it was trained with (`prm.step_weight`, `prm.aggregate` in its
`chainstep.json`) and scores with it unless the caller overrides it; every stage that ranks
chains records the rule it used (`ChainScore.describe`). No torch here: a text-only consumer
(a grader, a report) reads scores without loading a model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .errors import ChainstepError

AGGREGATES = ("mean", "min", "last", "prod")


@dataclass
class StepScores:
    """P(good) per step tag, and for the answer tag (None for a partial chain)."""

    steps: list[float]
    answer: float | None


@dataclass(frozen=True)
class ChainScore:
    """score = step_weight * aggregate(steps) + (1 - step_weight) * answer; a partial chain (no
    answer yet, as in step search) is scored by its steps alone. `source` says where the rule
    came from: `default`, `verifier` (what the PRM was trained with) or `override`."""

    step_weight: float = 0.2
    aggregate: str = "mean"
    source: str = "default"

    def __post_init__(self):
        if not 0 <= self.step_weight <= 1:
            raise ChainstepError(f"prm.step_weight={self.step_weight} must be in [0, 1]")
        if self.aggregate not in AGGREGATES:
            raise ChainstepError(f"prm.aggregate={self.aggregate!r} must be one of {AGGREGATES}")

    def __call__(self, scores: StepScores) -> float:
        agg = aggregate(scores.steps, self.aggregate)
        if scores.answer is None:
            return agg if agg is not None else 0.0
        if agg is None:
            return scores.answer
        return self.step_weight * agg + (1 - self.step_weight) * scores.answer

    def answer_only(self) -> ChainScore:
        """The answer tag's score alone (the `prm_answer` pair source, the step-weight 0 row)."""
        return replace(self, step_weight=0.0)

    def with_step_weight(self, step_weight: float) -> ChainScore:
        return replace(self, step_weight=step_weight)

    def override(self, step_weight: float | None = None, aggregate: str | None = None) -> ChainScore:
        """This rule with what the caller set; unchanged (and keeping its source) when nothing is."""
        if step_weight is None and aggregate is None:
            return self
        return ChainScore(self.step_weight if step_weight is None else step_weight,
                          aggregate or self.aggregate, "override")

    def describe(self) -> dict:
        """What a stage's stats record about the rule it ranked with."""
        return asdict(self)

    @classmethod
    def trained(cls, meta: dict) -> ChainScore:
        """The rule a verifier's `chainstep.json` says it was trained with (the default rule for
        a checkpoint that says nothing)."""
        prm = meta.get("prm", {})
        if "step_weight" not in prm and "aggregate" not in prm:
            return cls()
        return cls(prm.get("step_weight", cls.step_weight), prm.get("aggregate", cls.aggregate), "verifier")


def finished(scores: StepScores) -> StepScores:
    """The scores of a chain whose generation has ended: one with no answer (cut at the token
    limit, stopped early) has a wrong answer, so its answer term is 0 rather than left out; read
    by its steps alone, an unfinished chain would outrank finished ones whose answers the
    verifier doubts. Partial chains in step search keep `answer=None`."""
    return scores if scores.answer is not None else StepScores(scores.steps, 0.0)


def aggregate(values: list[float], how: str) -> float | None:
    if not values:
        return None
    if how == "mean":
        return sum(values) / len(values)
    if how == "min":
        return min(values)
    if how == "last":
        return values[-1]
    return math.prod(values)


def score_joined(score, records: list[dict], prefixes: list[str],
                 continuations: list[list[str]]) -> list[list[StepScores]]:
    """Continuation scores the plain way: `score` on every prefix + continuation, regrouped."""
    flat = score([r for r, g in zip(records, continuations) for _ in g],
                 [p + c for p, g in zip(prefixes, continuations) for c in g])
    return regroup(flat, [len(g) for g in continuations])


def score_samples(verifier, records: list[dict], samples: list[list[str]]) -> list[StepScores]:
    """Scores of several responses to each record, flat in that order: continuations of an empty
    prefix, so a PRM encodes each prompt and image once for all of a record's samples."""
    scored = verifier.score_continuations(records, [""] * len(records), samples)
    return [s for group in scored for s in group]


def score_responses(verifier, records: list[dict], responses: list[str],
                    key=lambda record: record["id"]) -> list[StepScores]:
    """Scores of (record, response) pairs in order, the responses to one record (same `key`)
    scored together as its samples (`score_samples`)."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        groups.setdefault(key(record), []).append(i)
    order = [i for group in groups.values() for i in group]
    flat = score_samples(verifier, [records[group[0]] for group in groups.values()],
                         [[responses[i] for i in group] for group in groups.values()])
    out: list[StepScores] = [None] * len(records)
    for i, scores in zip(order, flat):
        out[i] = scores
    return out


def regroup(flat: list, sizes: list[int]) -> list[list]:
    """`flat` cut into consecutive groups of `sizes`."""
    out, at = [], 0
    for size in sizes:
        out.append(flat[at:at + size])
        at += size
    return out
