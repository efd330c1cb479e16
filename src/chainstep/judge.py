"""Judges rate every step of a chain Good / Neutral / Bad (the paper's LLM-as-judge labels).

Two backends behind one protocol, `rate(record, chain) -> list[str]`:
- `ProgrammaticJudge` checks each step's claim against the scene facts the synthetic suite keeps
  in `meta`. A step is good when its value is true; neutral when it is false only because it
  carries an earlier mistake forward correctly (right arithmetic on wrong readings); bad otherwise.
- `HTTPJudge` asks any OpenAI-compatible chat model, with the prompt kept in a template file.

`JudgeVerifier` puts a judge behind the PRM's scoring interface, so search can run with an
oracle (or a deliberately noisy oracle) verifier and show what a better PRM would buy.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

from .checks import evaluate
from .client import ChatClient, user_message
from .errors import ChainstepError
from .records import load_image
from .scoring import ChainScore, StepScores, score_joined
from .steps import ANSWER_END, Chain, leading_steps, parses

RATINGS = ("good", "neutral", "bad")
RATING_SCORE = {"good": 1.0, "neutral": 0.5, "bad": 0.0}
TEMPLATE = Path(__file__).parent / "templates" / "judge_prompt.txt"
_ARITH = re.compile(r"^(-?\d+(?:\s*[-+*x]\s*-?\d+)+)\s*=\s*(-?\d+)$")
_OPTION = re.compile(r"^(\w+), option ([A-Z])$")
_RATING_LINE = re.compile(r"step\s*(\d+)\s*[:.-]\s*(good|neutral|bad)", re.IGNORECASE)


class Judge(Protocol):
    def rate(self, record: dict, chain: Chain) -> list[str]:
        """One of RATINGS per step of `chain`."""
        ...


class JudgeError(ChainstepError):
    """The judge's reply could not be read; the chain goes unlabelled by this judge."""


def _claim(thought: str) -> tuple[str, str] | None:
    """("red shapes", "3") from "Red shapes: 3." or "From the image, red shapes: 3"."""
    text = thought.strip().rstrip(".").strip()
    if text.lower().startswith("from the image,"):
        text = text[len("from the image,"):].strip()
    if ": " not in text:
        return None
    key, value = text.split(": ", 1)
    return " ".join(key.lower().split()), " ".join(value.split())


def _carries_forward(value: str, claimed: list[str], options: list[str] | None) -> bool:
    """Is a wrong value still the right operation on what the chain claimed before?"""
    arith = _ARITH.match(value)
    if arith:
        left, result = arith.groups()
        operands = re.findall(r"\d+", left)
        return evaluate(left.replace("x", "*")) == int(result) and all(x in claimed for x in operands)
    option = _OPTION.match(value)
    if option and options:
        colour, letter = option.groups()
        return colour in options and "ABCD"[options.index(colour)] == letter
    return False


class ProgrammaticJudge:
    """Exact step labels for the synthetic suite, from the facts in `record['meta']['steps']`."""

    name = "programmatic"

    def rate(self, record: dict, chain: Chain) -> list[str]:
        facts = record.get("meta", {}).get("steps")
        if not facts:
            raise ChainstepError(f"record {record['id']}: no step facts in meta; the programmatic "
                                 "judge only serves the synthetic suite (use an HTTP judge)")
        truth = {" ".join(f["key"].lower().split()): " ".join(f["value"].split()) for f in facts}
        seen: set[str] = set()
        claimed: list[str] = []
        ratings: list[str] = []
        for step in chain.steps:
            claim = _claim(step.thought)
            if claim is None or claim[0] not in truth or claim[0] in seen:
                ratings.append("bad")
                continue
            key, value = claim
            seen.add(key)
            if value.lower() == truth[key].lower():
                ratings.append("good")
            elif "bad" in ratings and _carries_forward(value, claimed, record.get("options")):
                ratings.append("neutral")
            else:
                ratings.append("bad")
            claimed.append(value.split(" = ")[-1])
        return ratings


class HTTPJudge:
    """A chat model behind an OpenAI-compatible endpoint, prompted with `template`."""

    name = "http"

    def __init__(self, client: ChatClient, template: str | Path = TEMPLATE):
        self.client = client
        self.template = Path(template).read_text(encoding="utf-8")
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0}

    def prompt(self, record: dict, chain: Chain) -> str:
        steps = "\n".join(f"Step {i}: [{s.name}] {s.thought} ({s.reflection})"
                          for i, s in enumerate(chain.steps, start=1))
        return self.template.format(question=record["question"], answer=record["answer"], steps=steps)

    def rate(self, record: dict, chain: Chain) -> list[str]:
        message = user_message(self.prompt(record, chain), load_image(record))
        reply = self.client.complete([message])
        self.usage["prompt_tokens"] += reply.prompt_tokens
        self.usage["completion_tokens"] += reply.completion_tokens
        return parse_ratings(reply.text, len(chain.steps))


def parse_ratings(text: str, num_steps: int) -> list[str]:
    """`Step K: Good` lines -> ratings in step order; every step must be rated exactly once."""
    found: dict[int, str] = {}
    for number, rating in _RATING_LINE.findall(text):
        found.setdefault(int(number), rating.lower())
    if sorted(found) != list(range(1, num_steps + 1)):
        raise JudgeError(f"judge rated steps {sorted(found)}, expected 1..{num_steps}: {text[:120]!r}")
    return [found[i] for i in range(1, num_steps + 1)]


class JudgeVerifier:
    """A judge with the PRM's scoring interface (`score`, `score_continuations`, `scoring`,
    `forward_passes`): with the programmatic judge, an oracle PRM for the synthetic
    suite, the ceiling of PRM-guided search. `flip` turns each step rating into its opposite with
    that probability (deterministic per question and step prefix, so best-of-N and beam search
    see the same noisy verdicts): a verifier of known step accuracy, to measure how good a PRM
    must be before search gains. The answer tag gets the steps' mean, as the judge has no
    separate view of it; a chain that breaks the grammar gets 0 there."""

    def __init__(self, judge: Judge | None = None, flip: float = 0.0, seed: int = 0,
                 scoring: ChainScore | None = None):
        if not 0 <= flip <= 1:
            raise ChainstepError(f"flip={flip} must be in [0, 1]")
        self.judge, self.flip, self.seed = judge or ProgrammaticJudge(), flip, seed
        self.scoring = scoring or ChainScore()
        self.chains_scored = self.forward_passes = 0

    def score(self, records: list[dict], responses: list[str]) -> list[StepScores]:
        self.chains_scored += len(records)
        return [self._score(record, text) for record, text in zip(records, responses)]

    def score_continuations(self, records: list[dict], prefixes: list[str],
                            continuations: list[list[str]]) -> list[list[StepScores]]:
        return score_joined(self.score, records, prefixes, continuations)

    def _score(self, record: dict, text: str) -> StepScores:
        steps = leading_steps(text)
        ratings = self.judge.rate(record, Chain(tuple(steps), "")) if steps else []
        values = [self._noisy(RATING_SCORE[r], record, steps[:i + 1]) for i, r in enumerate(ratings)]
        if ANSWER_END not in text:
            return StepScores(values, None)
        return StepScores(values, sum(values) / len(values) if values and parses(text) else 0.0)

    def _noisy(self, value: float, record: dict, prefix: list) -> float:
        if not self.flip:
            return value
        key = "|".join([str(self.seed), record["id"], *(f"{s.name}/{s.thought}" for s in prefix)])
        draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64
        return 1.0 - value if draw < self.flip else value
