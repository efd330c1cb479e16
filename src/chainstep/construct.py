"""Tasks + teacher -> SFT data, with a format filter that keeps its rejects and their reasons.

Reads `tasks/train.jsonl`, writes `sft.jsonl` (accepted chains) and `rejects.jsonl` (one reason
code each), `direct.jsonl` (answer-only targets for the direct-answer baseline) and `cot.jsonl`
(the accepted chains as plain text, for the reasoning-mode ablation). Append-only and keyed by
id: a killed run resumes without duplicates.

    chainstep construct runs/x/tasks/train.jsonl --out runs/x/data
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rich.progress import track

from .client import RemoteError
from .config import FilterConfig
from .grading import matches
from .layout import TEACHER_DATA
from .records import JsonlWriter, done_ids, iter_jsonl, load_tasks, replace_jsonl
from .shards import Shard, mark_done
from .steps import ANSWER_END, ANSWER_LINE, ANSWER_START, Chain, FormatError, parse
from .teacher import Teacher


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


def plain_response(chain: Chain) -> str:
    """The same chain as free-text reasoning: its thoughts, one per line, then the answer. The
    reasoning-mode ablation's middle row (the paper's "direct prompt" reasoning): what the CoS
    chain says, without its steps, names and reflections."""
    thoughts = "\n".join(step.thought for step in chain.steps)
    return f"{thoughts}\n{ANSWER_LINE}\n{ANSWER_START}{chain.answer}{ANSWER_END}"


def example_row(record: dict, response: str) -> dict:
    return {"id": record["id"], "image": record["image"], "question": record["question"],
            "options": record["options"], "answer": record["answer"],
            "family": record.get("meta", {}).get("family", record.get("source")),
            "response": response}


OUTPUTS = tuple(TEACHER_DATA[kind] for kind in ("cos", "rejects", "direct", "cot"))


def construct(tasks: str | Path | list[dict], out_dir: str | Path, teacher: Teacher,
              cfg: FilterConfig | None = None, concurrency: int = 1,
              retry_remote: bool = False, shard: Shard | None = None) -> dict:
    """Run the teacher over every task not yet done, `concurrency` requests in flight; returns
    accepted/rejected counts (and the teacher's token usage). A request that fails for good is
    rejected as `remote:<why>`; `retry_remote` asks again for those records on a later run.
    With `shard`, only its records, into its own files (`sft.shard-I-of-N.jsonl`, ...)."""
    cfg = cfg or FilterConfig()
    out_dir = Path(out_dir)
    every = load_tasks(tasks) if isinstance(tasks, (str, Path)) else tasks
    records = shard.select(every) if shard else every
    paths = [shard.path(out_dir / n) if shard else out_dir / n for n in OUTPUTS]
    sft_path, rejects_path, direct_path, cot_path = paths
    if retry_remote:
        _drop_remote_rejects(rejects_path)
    finished = done_ids(sft_path) | done_ids(rejects_path)
    direct_done = done_ids(direct_path)
    todo = [r for r in records if r["id"] not in finished]
    reasons: Counter = Counter()
    with JsonlWriter(sft_path) as sft, JsonlWriter(rejects_path) as rejects, \
            JsonlWriter(direct_path) as direct:
        direct.write_all(example_row(r, direct_response(r["answer"])) for r in records
                         if r["id"] not in direct_done)
        for record, text, reason in track(_explain_all(teacher, todo, concurrency), total=len(todo),
                                          description="teacher chains"):
            if reason is None:
                _, reason = check_chain(text, record, cfg)
            if reason is None:
                sft.write(example_row(record, text))
            else:
                reasons[reason] += 1
                rejects.write({"id": record["id"], "reason": reason, "response": text})
    write_plain(sft_path, cot_path)
    rejected = {r["id"]: r["reason"] for r in iter_jsonl(rejects_path)}
    stats = {"accepted": len(done_ids(sft_path)), "rejected": len(rejected),
             "rejected_by_reason": dict(Counter(rejected.values())), "rejected_now_by_reason": dict(reasons)}
    if getattr(teacher, "usage", None) is not None:
        stats["tokens"] = dict(teacher.usage)
    if shard and not any(str(r).startswith("remote:") for r in rejected.values()):
        for path in paths:
            mark_done(path, shard, records, every)
    return stats


def write_plain(sft_path: Path, cot_path: Path) -> None:
    """Plain-text twins of the accepted chains not yet written (after a kill, the rest; for a run
    constructed before `cot.jsonl` existed, all of them)."""
    done = done_ids(cot_path)
    with JsonlWriter(cot_path) as cot:
        cot.write_all({**row, "response": plain_response(parse(row["response"]))}
                      for row in iter_jsonl(sft_path) if row["id"] not in done)


def _explain_all(teacher: Teacher, records: list[dict], concurrency: int):
    """(record, text, reason) as each request finishes; reason is `remote:<why>` on failure."""
    def explain(record: dict) -> tuple[dict, str, str | None]:
        try:
            return record, teacher.explain(record), None
        except RemoteError as err:
            return record, "", f"remote:{err.reason}"

    if concurrency <= 1:
        yield from map(explain, records)
        return
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(explain, r) for r in records]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def _drop_remote_rejects(path: Path) -> None:
    """Rewrite rejects.jsonl without `remote:` rejects (atomically), so those records run again."""
    if not path.exists():
        return
    kept = [r for r in iter_jsonl(path) if not str(r.get("reason", "")).startswith("remote:")]
    replace_jsonl(path, kept)
