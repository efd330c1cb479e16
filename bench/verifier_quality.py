"""How good must the verifier be before PRM-guided search beats self-consistency?

    python bench/verifier_quality.py --run runs/default              # 40 val questions, N = 16
    python bench/verifier_quality.py --run runs/quick --n 4 --questions 8 --flips 0 0.3

Runs greedy decoding, self-consistency, best-of-N, PRM-weighted voting and step beam search on
the same questions with the run's trained PRM and with the programmatic judge as an oracle
verifier whose step verdicts are flipped with probability 0, 0.1, ... (`JudgeVerifier`). Each
verifier's step accuracy and within-question ranking AUROC on the run's held-out labelled
chains sit next to its search accuracies, with paired differences (beam − BoN, BoN − SC,
SC − greedy), so the PRM's numbers can be read against the quality search needs. Uses the val
split by default: an analysis, not a test-split result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chainstep.errors import ChainstepError
from chainstep.evaluate import paired_comparison, predict, sample_responses
from chainstep.judge import JudgeVerifier
from chainstep.prm import PRM
from chainstep.prm_metrics import evaluate_prm
from chainstep.records import load_tasks, read_jsonl
from chainstep.sampling import Policy, SamplingParams
from chainstep.search import beam_search, select


def search_rows(policy: Policy, verifier, records: list[dict], samples: dict[str, list[dict]],
                n: int, temperature: float) -> dict[str, list[dict]]:
    """Best-of-N and weighted vote over the shared samples, and a beam search of its own."""
    flat = [row for rec in records for row in samples[rec["id"]]]
    scores = verifier.score([rec for rec in records for _ in range(n)], [r["response"] for r in flat])
    chain = [verifier.scoring(s) for s in scores]
    out = {s: [select(s, samples[rec["id"]], chain[i * n:(i + 1) * n]) for i, rec in enumerate(records)]
           for s in ("bon", "weighted")}
    start = time.perf_counter()
    out["beam"], _ = beam_search(policy, verifier, records, n, temperature=temperature, seed=0)
    out["beam_s"] = time.perf_counter() - start
    return out


def accuracy(preds: list[dict]) -> float:
    return 100 * sum(p["correct"] for p in preds) / len(preds)


def paired(a: list[dict], b: list[dict]) -> str:
    c = paired_comparison(a, b, "a", "b")
    return f"{100 * c['diff']:+.1f} [{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/quick", help="run directory (models/sft, models/prm, data/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--flips", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    for need in ("models/sft", "models/prm", "data/prm_labels-val.jsonl", "metrics.json"):
        if not (run / need).exists():
            raise ChainstepError(f"{run / need} not found: finish `chainstep run --out {run}` first")
    metrics = json.loads((run / "metrics.json").read_text())
    temperature = metrics.get("search", {}).get("temperature", 1.0)
    policy = Policy.from_dir(run / "models" / "sft")
    records = load_tasks(run / "tasks" / f"{args.split}.jsonl")[:args.questions]
    val = {r["id"]: r for r in load_tasks(run / "tasks" / "val.jsonl")}
    labelled = [{**row, "id": row["question_id"], "meta": val[row["question_id"]]["meta"]}
                for row in read_jsonl(run / "data" / "prm_labels-val.jsonl") if row["source"] == "judge"]
    verifiers = {"trained PRM": PRM.from_dir(run / "models" / "prm")}
    verifiers |= {f"oracle, {100 * f:.0f}% flipped": JudgeVerifier(flip=f) for f in args.flips}
    with tempfile.TemporaryDirectory() as tmp:
        greedy = predict(policy, records, Path(tmp) / "greedy.jsonl", "cos", SamplingParams())
        samples = sample_responses(policy, records, Path(tmp) / "samples.jsonl",
                                   SamplingParams(n=args.n, temperature=temperature, seed=0))
    sc = [select("sc", samples[r["id"]]) for r in records]
    table = Table(title=f"{len(records)} {args.split} questions of {run}, N = {args.n}, "
                        f"T = {temperature}; greedy {accuracy(greedy):.1f}, SC {accuracy(sc):.1f} "
                        f"(SC − greedy {paired(sc, greedy)})")
    for col in ("verifier", "step acc", "ranking AUROC", "BoN", "weighted", "beam",
                "beam − BoN", "BoN − SC", "beam s"):
        table.add_column(col)
    for name, verifier in verifiers.items():
        quality = evaluate_prm(verifier, labelled)
        rows = search_rows(policy, verifier, records, samples, args.n, temperature)
        ranking = quality["ranking_auroc_parsed"]
        table.add_row(name, f"{quality['step_accuracy']:.3f}", "-" if ranking is None else f"{ranking:.3f}",
                      f"{accuracy(rows['bon']):.1f}", f"{accuracy(rows['weighted']):.1f}",
                      f"{accuracy(rows['beam']):.1f}", paired(rows["beam"], rows["bon"]),
                      paired(rows["bon"], sc), f"{rows['beam_s']:.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
