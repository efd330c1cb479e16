"""How good a verifier is: step metrics against labels, ranking of right over wrong chains of
one question (what selection needs), MC/judge label agreement, and the report's step traces.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .checks import check_chain
from .records import JsonlWriter, by_sample, family_of
from .scoring import StepScores, score_responses
from .steps import FormatError, parse, parses
from .verifier import Verifier

TRACE_CHAINS = 12  # chains the report's step-trace viewer shows


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve by the rank-sum statistic (ties count half)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = s.argsort(kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate_prm(prm: Verifier, rows: list[dict], scores: list[StepScores] | None = None) -> dict:
    """Step-level and selection-level quality on held-out labelled chains (`scores`: what `prm`
    already gave them, so that verifiers sharing a base score each chain once).

    `ranking_auroc` is what selection needs: for two chains of one question, one right and one
    wrong, how often the right one scores higher. Pooled step metrics mostly measure how hard
    each question is.
    """
    if scores is None:
        scores = score_rows(prm, rows)
    families = {r["question_id"]: family_of(r) for r in rows}
    step_p, step_y, first_hits, by_question, parsed = [], [], [], {}, {}
    for row, s in zip(rows, scores):
        labels = row["labels"][:len(s.steps)]
        pairs = [(p, y) for p, y in zip(s.steps, labels) if y is not None]
        step_p += [p for p, _ in pairs]
        step_y += [int(y) for _, y in pairs]
        if all(y is not None for y in labels):
            first_hits.append(_first_bad([p < 0.5 for p in s.steps]) == _first_bad([y == 0 for y in labels]))
        correct = row["labels"][-1] if s.answer is not None else None
        if correct is not None:
            score = prm.scoring(s)
            by_question.setdefault(row["question_id"], []).append((score, int(correct)))
            if parses(row["response"]):
                parsed.setdefault(row["question_id"], []).append((score, int(correct)))
    pred = [p >= 0.5 for p in step_p]
    good_rate = sum(step_y) / len(step_y) if step_y else 0.0
    tp = sum(not p and not y for p, y in zip(pred, step_y))
    fp = sum(not p and y for p, y in zip(pred, step_y))
    fn = sum(p and not y for p, y in zip(pred, step_y))
    return {
        "chains": len(rows), "steps": len(step_y),
        "step_accuracy": sum(p == bool(y) for p, y in zip(pred, step_y)) / len(step_y) if step_y else 0.0,
        "majority_baseline": max(good_rate, 1 - good_rate),
        "step_auroc": auroc(step_p, step_y),
        "bad_step_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "first_error_accuracy": sum(first_hits) / len(first_hits) if first_hits else None,
        "ranking_auroc": ranking_auroc(by_question),
        "ranking_pairs": ranking_pairs(by_question),
        "ranking_auroc_parsed": ranking_auroc(parsed),  # what best-of-N and beam search rank
        "ranking_pairs_parsed": ranking_pairs(parsed),
        "per_family_ranking_auroc": {
            family: ranking_auroc({q: c for q, c in by_question.items() if families[q] == family})
            for family in sorted(set(families.values()))},
    }


def _first_bad(flags: list[bool]) -> int:
    return next((i for i, bad in enumerate(flags) if bad), -1)


def ranking_pairs(by_question: dict[str, list[tuple[float, int]]]) -> int:
    """How many (right, wrong) chain pairs within a question `ranking_auroc` averages over."""
    return sum(sum(c for _, c in chains) * sum(1 - c for _, c in chains) for chains in by_question.values())


def ranking_auroc(by_question: dict[str, list[tuple[float, int]]]) -> float | None:
    """P(score of a right chain > score of a wrong chain of the same question), ties half."""
    wins = total = 0.0
    for chains in by_question.values():
        right = [s for s, c in chains if c]
        wrong = [s for s, c in chains if not c]
        for a in right:
            for b in wrong:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                total += 1
    return wins / total if total else None


def label_agreement(rows: list[dict]) -> float | None:
    """Fraction of step labels on which MC and the judge agree (chains labelled by both)."""
    same = [a == b for sources in by_sample(rows).values() if {"mc", "judge"} <= sources.keys()
            for a, b in zip(sources["mc"]["labels"][:-1], sources["judge"]["labels"][:-1])
            if a is not None and b is not None]
    return sum(same) / len(same) if same else None


def score_rows(verifier: Verifier, rows: list[dict]) -> list[StepScores]:
    """`verifier`'s scores of labelled chains, in row order; the chains of one question are
    scored together, so a PRM encodes each question's prompt once."""
    return score_responses(verifier, rows, [row["response"] for row in rows],
                           key=lambda row: row["question_id"])


def write_traces(prm: Verifier, rows: list[dict], path: str | Path, limit: int = TRACE_CHAINS) -> Path:
    """Chains labelled by both MC and the judge, with the PRM's score for every step: the
    report's step-trace viewer."""
    both = [s for s in by_sample(rows).values() if {"mc", "judge"} <= s.keys()][:limit]
    scores = prm.score([s["judge"] for s in both], [s["judge"]["response"] for s in both])
    path = Path(path)
    path.unlink(missing_ok=True)
    with JsonlWriter(path) as writer:
        for sources, score in zip(both, scores):
            judge, mc = sources["judge"], sources["mc"]
            chain = parse(judge["response"])
            steps = [{"name": st.name, "thought": st.thought, "prm": p, "judge": rating, "mc": value}
                     for st, p, rating, value in
                     zip(chain.steps, score.steps, judge["ratings"], mc["values"])]
            writer.write({"id": judge["sample_id"], "question_id": judge["question_id"],
                          "image": judge["image"], "question": judge["question"],
                          "answer": judge["answer"], "predicted": chain.answer,
                          "correct": bool(judge["labels"][-1]), "answer_prm": score.answer, "steps": steps})
    return path


def check_quality(rows: list[dict]) -> dict:
    """The checks (`chainstep.checks`) against the programmatic judge, on judge-labelled chains:
    `false_fail` is the share of chains right in every step that a check fails, `false_pass` the
    share of wrong chains (a wrong answer or a wrong step) that pass every check, and
    `lucky_caught` the share of lucky guesses (right answer, wrong step) a check fails."""
    right, wrong, lucky = [], [], []
    for row in rows:
        try:
            chain = parse(row["response"])
        except FormatError:
            continue
        passed = check_chain(list(chain.steps), chain.answer, row.get("question", ""),
                             row.get("options")).passed
        every_step = all(y == 1 for y in row["labels"] if y is not None)
        (right if every_step else wrong).append(passed)
        if row["labels"][-1] == 1 and not every_step:
            lucky.append(passed)

    def share(flags: list[bool], value: bool) -> float | None:
        return sum(f == value for f in flags) / len(flags) if flags else None

    return {"chains_right": len(right), "chains_wrong": len(wrong), "lucky_guesses": len(lucky),
            "false_fail": share(right, False), "false_pass": share(wrong, True),
            "lucky_caught": share(lucky, False)}
