"""Tasks + teacher -> SFT data, with a format filter that keeps its rejects and their reasons.

Reads `tasks/train.jsonl`, writes `sft.jsonl` (accepted chains) and `rejects.jsonl` (one reason
code each), and `direct.jsonl` (answer-only targets for the direct-answer baseline). Append-only
and keyed by id: a killed run resumes without duplicates.

    chainstep construct runs/x/tasks/train.jsonl --out runs/x/data
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.progress import track

from .answers import matches
from .records import JsonlWriter, done_ids, load_tasks
from .steps import ANSWER_END, ANSWER_START, Chain, FormatError, parse
from .teacher import Teacher


@dataclass
class FilterConfig:
    """Bounds a teacher chain must meet; 0 turns a bound off."""

    min_steps: int = 1
    max_steps: int = 8
    max_field_chars: int = 300


def check_chain(text: str, record: dict, cfg: FilterConfig) -> tuple[Chain | None, str | None]:
    """(chain, None) if the text passes, else (None, reason code)."""
    try:
        chain = parse(text)
    except FormatError as err:
        return None, f"format:{err.code}"
    if not matches(chain.answer, record):
        return None, "answer_mismatch"
    if len(chain.steps) < cfg.min_steps:
        return None, "too_few_steps"
    if cfg.max_steps and len(chain.steps) > cfg.max_steps:
        return None, "too_many_steps"
    fields = [f for s in chain.steps for f in (s.name, s.thought, s.reflection)]
    if cfg.max_field_chars and max(map(len, fields)) > cfg.max_field_chars:
        return None, "field_too_long"
    return chain, None


def direct_response(answer: str) -> str:
    """The direct-answer baseline's target: the answer alone, in the same answer markers."""
    return f"{ANSWER_START}{answer}{ANSWER_END}"


def example_row(record: dict, response: str) -> dict:
    return {"id": record["id"], "image": record["image"], "question": record["question"],
            "options": record["options"], "answer": record["answer"],
            "family": record.get("meta", {}).get("family", record.get("source")),
            "response": response}


def construct(tasks_path: str | Path, out_dir: str | Path, teacher: Teacher,
              cfg: FilterConfig | None = None) -> dict:
    """Run the teacher over every task not yet done; returns accepted/rejected counts."""
    cfg = cfg or FilterConfig()
    out_dir = Path(out_dir)
    records = load_tasks(tasks_path)
    sft_path, rejects_path, direct_path = (out_dir / n for n in
                                           ("sft.jsonl", "rejects.jsonl", "direct.jsonl"))
    finished = done_ids(sft_path) | done_ids(rejects_path)
    direct_done = done_ids(direct_path)
    reasons: Counter = Counter()
    with JsonlWriter(sft_path) as sft, JsonlWriter(rejects_path) as rejects, \
            JsonlWriter(direct_path) as direct:
        for record in track(records, description="teacher chains"):
            if record["id"] not in direct_done:
                direct.write(example_row(record, direct_response(record["answer"])))
            if record["id"] in finished:
                continue
            text = teacher.explain(record)
            chain, reason = check_chain(text, record, cfg)
            if chain is None:
                reasons[reason] += 1
                rejects.write({"id": record["id"], "reason": reason, "response": text})
            else:
                sft.write(example_row(record, text))
    stats = {"accepted": len(done_ids(sft_path)), "rejected": len(done_ids(rejects_path)),
             "rejected_now_by_reason": dict(reasons)}
    return stats
