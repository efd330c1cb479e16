"""PRM scoring cost: one forward pass per chain vs one per step prefix.

    python bench/prm_scoring.py                       # a fresh tiny random Llava
    python bench/prm_scoring.py --model runs/default/models/prm

A chain of S steps carries S+1 tags; reading them all from one forward pass is what the PRM
does. The naive alternative (how step scores are often computed: score each prefix as its
own sequence) needs S+1 forwards over ever longer inputs. Prints a table per S and the ratio
naive / one-pass, measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chainstep import models
from chainstep.label import step_prefixes
from chainstep.prm import PRM
from chainstep.records import load_tasks
from chainstep.steps import Chain, render
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher


def _setup(model_dir: str | None, work: Path):
    make_tasks(SuiteConfig(train=200, val=0, test=64), work / "tasks")
    records = load_tasks(work / "tasks" / "test.jsonl")
    if model_dir:
        return (*models.load(model_dir), records)
    teacher = ProgrammaticTeacher()
    train = load_tasks(work / "tasks" / "train.jsonl")
    tok = models.train_tokenizer([r["question"] for r in train] + [teacher.explain(r) for r in train])
    return (*models.build_tiny("llava", tok), records)


def chains_of(records: list[dict], steps: int) -> list[str]:
    """Teacher chains stretched or cut to `steps` steps (their steps repeated in order)."""
    teacher = ProgrammaticTeacher()
    out = []
    for record in records:
        chain = teacher.chain(record)
        repeated = [chain.steps[i % len(chain.steps)] for i in range(steps)]
        out.append(render(Chain(tuple(repeated), chain.answer)))
    return out


def time_one_pass(prm: PRM, records, texts) -> float:
    start = time.perf_counter()
    prm.score(records, texts)
    return time.perf_counter() - start


def time_per_prefix(prm: PRM, records, texts) -> float:
    """Every step prefix scored as its own sequence, plus the whole chain for the answer."""
    recs = [r for r, t in zip(records, texts) for _ in range(len(step_prefixes(t)) + 1)]
    parts = [p for t in texts for p in (*step_prefixes(t), t)]
    start = time.perf_counter()
    prm.score(recs, parts)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="PRM directory (default: a fresh tiny Llava)")
    parser.add_argument("--steps", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"PRM scoring of 64 chains, batch {args.batch}, {args.threads} threads")
    for col in ("steps S", "one pass s", "per prefix s", "forwards (per prefix)", "ratio"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor, records = _setup(args.model, Path(tmp))
        prm = PRM(model, processor, batch_size=args.batch)
        time_one_pass(prm, records[:4], chains_of(records[:4], 2))  # warm-up
        ratios = []
        for s in args.steps:
            texts = chains_of(records, s)
            one, naive = time_one_pass(prm, records, texts), time_per_prefix(prm, records, texts)
            ratios.append(naive / one)
            table.add_row(str(s), f"{one:.2f}", f"{naive:.2f}", str(len(records) * (s + 1)),
                          f"{naive / one:.2f}x")
    Console().print(table)
    summary = ", ".join(f"S={s}: {r:.2f}x" for s, r in zip(args.steps, ratios))
    Console().print(f"per-prefix / one-pass time: {summary}")


if __name__ == "__main__":
    main()
