"""One verifier interface for every consumer: search, DPO pair scores, GRPO rewards, the server
and `chainstep eval` score chains through `Verifier`, whatever is behind it.

- a learned PRM (`prm.PRM`), read with the rule it was trained with;
- the programmatic judge as an oracle (`judge.JudgeVerifier`, `judge[:FLIP]`);
- the checks alone (`checks`): arithmetic, operands, option letters and the answer's copy, from
  the chain's text (`chainstep.checks`);
- a PRM with the checks (`CheckedVerifier`): the checks' verdicts averaged with the PRM's
  scores, step by step. Whether a PRM is read with the checks is a verifier setting
  (`prm.checks`), saved with it like its chain-score rule and overridable by the caller. A run
  that compares the parts on val records its choice beside the PRM (`verifier.json`: with
  `prm.choose_on_val`, the learned PRM, the checks or both, whichever ranks val pairs best), and
  every consumer of the directory reads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from .checks import check_answer, check_steps
from .errors import ChainstepError
from .layout import model_summary
from .records import write_json
from .scoring import ChainScore, StepScores, score_joined
from .steps import ANSWER_END, FormatError, extract_answer, leading_steps, parse

UNCHECKED = 0.5  # what the checks alone give a step they cannot judge
CHOICE_FILE = "verifier.json"  # beside a PRM: the parts of it a run chose on val
PARTS = {"learned PRM with checks": {"learned": True, "checks": True},
         "checks alone": {"learned": False, "checks": True},
         "learned PRM alone": {"learned": True, "checks": False}}


class Verifier(Protocol):
    scoring: ChainScore
    chains_scored: int
    forward_passes: int

    def score(self, records: list[dict], responses: list[str]) -> list[StepScores]:
        """P(good) per step and for the answer (None while the chain has no answer)."""
        ...

    def score_continuations(self, records: list[dict], prefixes: list[str],
                            continuations: list[list[str]]) -> list[list[StepScores]]:
        """Scores of each prefix + continuation (step search)."""
        ...


class CheckedVerifier:
    """The checks' verdicts (1 held, 0 failed, `UNCHECKED` where they have none) averaged with
    `base`'s scores, step by step and for the answer; the verdicts alone without a base. An
    answer the chain did not conclude gets 0 from the checks.

    Averaging, rather than letting a verdict replace the base's score of its step, is what makes
    a failed check count: under the mean rule the chain score becomes the mean of the two
    verifiers' chain scores, where before a failed arithmetic step cost a chain 0.04 against an
    answer term the base alone set. Val ranking of right over wrong chains of one question on
    the default run (224 pairs): 0.929, against 0.70 for the 150-step PRM alone and 0.884 for
    the checks alone (docs/findings.md)."""

    def __init__(self, base: Verifier | None = None, scoring: ChainScore | None = None):
        self.base = base
        self.scoring = scoring or (base.scoring if base is not None else ChainScore())
        self.chains_scored = 0
        self.check_counts = {"steps": 0, "checked": 0, "failed": 0, "answers_failed": 0}

    @property
    def forward_passes(self) -> int:
        return self.base.forward_passes if self.base is not None else 0

    def describe(self) -> dict:
        return {"checks": True, "base": type(self.base).__name__ if self.base else None}

    def score(self, records: list[dict], responses: list[str]) -> list[StepScores]:
        return self.combine(records, responses,
                            self.base.score(records, responses) if self.base is not None else None)

    def combine(self, records: list[dict], responses: list[str],
                base: list[StepScores] | None = None) -> list[StepScores]:
        """The checks over scores `base` already gave these chains (a control that compares the
        base alone with the base under the checks scores each chain once)."""
        self.chains_scored += len(records)
        return [self._combine(r, t, b) for r, t, b in zip(records, responses, base or [None] * len(records))]

    def score_continuations(self, records: list[dict], prefixes: list[str],
                            continuations: list[list[str]]) -> list[list[StepScores]]:
        """The base's continuation scores (a PRM shares one prefill of prompt and prefix among
        them) under the checks of each joined chain."""
        base = self.base.score_continuations(records, prefixes, continuations) if self.base else None
        flat = [s for group in base for s in group] if base is not None else None
        return score_joined(lambda recs, texts: self.combine(recs, texts, flat),
                            records, prefixes, continuations)

    def _combine(self, record: dict, text: str, base: StepScores | None) -> StepScores:
        own = self._verdicts(record, text, len(base.steps) if base is not None else None)
        if base is None:
            return own
        steps = [(a + b) / 2 for a, b in zip(own.steps, base.steps)]
        if own.answer is None or base.answer is None:
            return StepScores(steps, own.answer)
        return StepScores(steps, (own.answer + base.answer) / 2)

    def _verdicts(self, record: dict, text: str, count: int | None) -> StepScores:
        """What the checks alone say of each step (`count` of them: as many as the base scores)
        and of the answer."""
        steps = leading_steps(text)
        checks = check_steps(steps, record.get("question", ""), record.get("options"))
        values = [UNCHECKED] * (len(steps) if count is None else count)
        for i, check in enumerate(checks[:len(values)]):
            self.check_counts["steps"] += 1
            if check.verdict is not None:
                self.check_counts["checked"] += 1
                self.check_counts["failed"] += check.verdict is False
                values[i] = float(check.verdict)
        if ANSWER_END not in text:
            return StepScores(values, None)
        verdict = check_answer(steps, _answer(text), record.get("options")).verdict
        self.check_counts["answers_failed"] += verdict is False
        return StepScores(values, UNCHECKED if verdict is None else float(verdict))


def _answer(text: str) -> str | None:
    try:
        return parse(text).answer
    except FormatError:
        return extract_answer(text)


def load_verifier(spec: str | Path, batch_size: int = 32, step_weight: float | None = None,
                  aggregate: str | None = None, checks: bool | None = None,
                  device: str | None = None) -> Verifier:
    """`judge[:FLIP]` (the programmatic judge, flipping FLIP of its verdicts), `checks` (the
    checks alone), or a PRM directory, read with the rule and the checks setting it was trained
    with; `step_weight`, `aggregate` and `checks` override them."""
    spec = str(spec)
    if spec == "judge" or spec.startswith("judge:"):
        from .judge import JudgeVerifier

        try:
            flip = float(spec.partition(":")[2] or 0)
        except ValueError:
            raise ChainstepError(f"--prm {spec!r}: write judge or judge:FLIP, FLIP in [0, 1]") from None
        return JudgeVerifier(flip=flip, scoring=ChainScore().override(step_weight, aggregate))
    if spec == "checks":
        return CheckedVerifier(None, ChainScore().override(step_weight, aggregate))
    from .prm import PRM

    parts = chosen_parts(spec)
    if checks is not None:  # the caller's setting; without the checks only the learned part is left
        parts = {"checks": checks, "learned": parts["learned"] or not checks}
    if not parts["learned"]:
        return compose(None, parts, ChainScore.trained(model_summary(spec)).override(step_weight, aggregate))
    prm = PRM.from_dir(spec, device=device, batch_size=batch_size, step_weight=step_weight,
                       aggregate=aggregate)
    return compose(prm, parts)


def compose(learned: Verifier | None, parts: dict[str, bool], scoring: ChainScore | None = None) -> Verifier:
    """The verifier `parts` (one of `PARTS`) name, built on `learned` (None when unused)."""
    if not parts["checks"]:
        return learned
    return CheckedVerifier(learned if parts["learned"] else None, scoring or learned.scoring)


def chosen_parts(model_dir: str | Path) -> dict[str, bool]:
    """Which parts of a PRM directory score: what a run chose on val (`verifier.json`), else the
    learned PRM with the checks as its summary says (`prm.checks`; off for a checkpoint that says
    nothing)."""
    path = Path(model_dir) / CHOICE_FILE
    if path.exists():
        try:
            return PARTS[json.loads(path.read_text())["verifier"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ChainstepError(f"{path} names no verifier ({', '.join(PARTS)}); delete it to read "
                                 "the PRM as trained") from None
    return {"learned": True, "checks": bool(model_summary(model_dir).get("prm", {}).get("checks", False))}


def record_choice(model_dir: str | Path, name: str, ranking: dict[str, float | None]) -> Path:
    """Record beside a PRM which of its parts (`PARTS`) score from now on, and the val ranking
    each part had."""
    if name not in PARTS:
        raise ChainstepError(f"unknown verifier {name!r}; choose from {', '.join(PARTS)}")
    return write_json(Path(model_dir) / CHOICE_FILE, {"verifier": name, "val_ranking_auroc": ranking})
