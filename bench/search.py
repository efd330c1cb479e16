"""Step beam search vs best-of-N at equal N, on the same questions, in one run.

    python bench/search.py --run runs/quick           # needs models/sft and models/prm
    python bench/search.py --run runs/default --n 16 --questions 50

Best-of-N samples N whole chains per question and scores them once; beam search samples N
candidate steps per question at every step and scores each partial chain. Both batch all
questions together. Goal: beam / BoN wall time <= 1.3.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chainstep.errors import ChainstepError
from chainstep.prm import PRM
from chainstep.records import load_tasks
from chainstep.sampling import Policy
from chainstep.search import beam_search, search_predictions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/quick", help="run directory with models/sft and models/prm")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    if not (run / "models" / "prm").exists():
        raise ChainstepError(f"{run}/models/prm not found: run `chainstep run --quick` first")
    policy = Policy.from_dir(run / "models" / "sft", batch_size=args.batch)
    prm = PRM.from_dir(run / "models" / "prm", batch_size=args.batch)
    records = load_tasks(run / "tasks" / "test.jsonl")[:args.questions]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        bon, bon_compute = search_predictions("bon", policy, records, args.n, Path(tmp), "bench", "test",
                                              prm, args.temperature)
        bon_s = time.perf_counter() - start
    start = time.perf_counter()
    beam, beam_compute = beam_search(policy, prm, records, args.n, temperature=args.temperature)
    beam_s = time.perf_counter() - start
    table = Table(title=f"N={args.n}, {len(records)} questions, T={args.temperature}, {args.threads} threads")
    for col in ("strategy", "wall s", "tokens generated", "PRM chains", "accuracy"):
        table.add_column(col)
    for name, preds, compute, secs in (("best-of-N", bon, bon_compute, bon_s),
                                       ("step beam search", beam, beam_compute, beam_s)):
        acc = sum(p["correct"] for p in preds) / len(preds)
        table.add_row(name, f"{secs:.1f}", str(compute["tokens_generated"]), str(compute["prm_chains"]),
                      f"{100 * acc:.1f}")
    Console().print(table)
    Console().print(f"beam / best-of-N wall time: {beam_s / bon_s:.2f}x (goal <= 1.3)")


if __name__ == "__main__":
    main()
