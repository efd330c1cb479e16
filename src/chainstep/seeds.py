"""Several draws of one run: `chainstep run --seeds K` trains and samples every stage under K run
seeds (`RunConfig.seed`, into `OUT/seed-k/`) and summarises them in `OUT/seeds.json`.

One draw cannot tell an effect from the training draw: at this scale two samples of the same
SFT model moved policy-improvement rows by 3 points. The summary gives, for every result row, the
mean and spread (min, max, standard deviation) over seeds, and for every comparison a pooled
paired test: each (seed, question) is one pair, so the exact interval counts the discordant
questions of all seeds together, beside how many seeds agree on the sign.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import replace
from pathlib import Path

from .config import RunConfig
from .evaluate import paired_comparison
from .layout import RunLayout
from .records import read_jsonl, write_json


def seed_dirs(out: Path, seeds: int) -> list[Path]:
    return [Path(out) / f"seed-{k}" for k in range(seeds)]


def run_seeds(cfg: RunConfig, out: str | Path, seeds: int, run) -> dict:
    """`run(cfg, dir)` for seeds 0..K-1 (a finished seed resumes as done), then the summary."""
    dirs = seed_dirs(Path(out), seeds)
    for k, folder in enumerate(dirs):
        run(replace(cfg, seed=cfg.seed + k, seeds=1), folder)
    summary = summarize_seeds(dirs)
    write_json(Path(out) / "seeds.json", summary)
    return summary


def summarize_seeds(dirs: list[Path]) -> dict:
    """Mean and spread of each result row over the runs in `dirs`, and pooled paired tests."""
    metrics = [json.loads(RunLayout(d).metrics.read_text()) for d in dirs]
    rows: dict[tuple, list[float]] = {}
    for m in metrics:
        for row in m.get("results", []):
            key = (row["model"], row["strategy"], row["n"], row["split"])
            rows.setdefault(key, []).append(row["accuracy"])
    results = [{"model": k[0], "strategy": k[1], "n": k[2], "split": k[3], **spread(v)}
                for k, v in rows.items()]
    keys = {(c["a"], c["b"], c.get("split", "test")) for m in metrics for c in m.get("comparisons", [])}
    comparisons = [c for c in (pooled(dirs, metrics, *key) for key in sorted(keys)) if c]
    return {"seeds": len(dirs), "runs": [d.name for d in dirs], "results": results,
            "comparisons": comparisons}


def spread(values: list[float]) -> dict:
    return {"seeds": len(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "sd": statistics.stdev(values) if len(values) > 1 else 0.0}


def pooled(dirs: list[Path], metrics: list[dict], a: str, b: str, split: str) -> dict | None:
    """The comparison a - b over every seed's questions at once (greedy predictions of both models
    on `split`), with each seed's own difference beside it; None where a seed lacks the files."""
    pairs_a, pairs_b, per_seed = [], [], []
    for d, m in zip(dirs, metrics):
        paths = [RunLayout(d).predictions(name, split) for name in (a, b)]
        if not all(p.exists() for p in paths):
            return None
        rows_a, rows_b = ([{"id": f"{d.name}/{r['id']}", "correct": r["correct"]} for r in read_jsonl(p)]
                          for p in paths)
        pairs_a += rows_a
        pairs_b += rows_b
        seed_row = next((c for c in m.get("comparisons", []) if (c["a"], c["b"], c.get("split", "test"))
                         == (a, b, split)), None)
        per_seed.append(seed_row["diff"] if seed_row else None)
    diffs = [x for x in per_seed if x is not None]
    return {**paired_comparison(pairs_a, pairs_b, a, b), "split": split, "per_seed_diff": per_seed,
            "seeds_positive": sum(x > 0 for x in diffs), "seeds_negative": sum(x < 0 for x in diffs)}
