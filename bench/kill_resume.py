"""kill -9 a `chainstep run --quick` at random moments, resume it each time, and check that it
ends with what an uninterrupted run gives: the same stages, the same rows in every JSONL file
(no duplicates, no gaps, no changed text) and the same metrics.

    python bench/kill_resume.py --kills 20 --out /tmp/kill-resume

The kill moments are drawn uniformly over the reference run's own duration, so they fall in
every stage; each restart is given its share of that time plus the start-up it spends loading.
Prints one line per kill (when, in which stage) and a verdict; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

TIMING = re.compile(r"(seconds|runtime|per_second|per_s$|_s$|time)")
STARTUP_S = 8.0  # python, torch and transformers imports before a restart does any work


def command(out: Path) -> list[str]:
    return [sys.executable, "-m", "chainstep", "run", "--quick", "--out", str(out)]


def environment(out: Path) -> dict:
    """Each run its own pretrain cache, so the killed run pretrains (and is killed there) too."""
    return {**os.environ, "CHAINSTEP_CACHE": str(out.parent / f"cache-{out.name}")}


def stages(out: Path) -> list[str]:
    return sorted(p.stem for p in (out / "stages").glob("*.json")) if (out / "stages").exists() else []


def reference_run(out: Path) -> float:
    if (out / "metrics.json").exists() and (out / "report.html").exists():
        return json.loads((out / "bench-seconds.json").read_text())["seconds"]
    start = time.perf_counter()
    subprocess.run(command(out), check=True, stdout=subprocess.DEVNULL, env=environment(out))
    seconds = time.perf_counter() - start
    (out / "bench-seconds.json").write_text(json.dumps({"seconds": seconds}))
    return seconds


def killed_run(out: Path, moments: list[float]) -> list[dict]:
    """Start, wait until the next kill moment (plus start-up), SIGKILL; then run to the end."""
    kills, previous = [], 0.0
    for moment in moments:
        proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True, env=environment(out))
        try:
            proc.wait(timeout=moment - previous + STARTUP_S)
            kills.append({"at_s": round(moment, 1), "killed": False, "stages_done": len(stages(out))})
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            kills.append({"at_s": round(moment, 1), "killed": True, "stages_done": len(stages(out))})
        previous = moment
        what = "killed" if kills[-1]["killed"] else "had finished"
        print(f"kill {len(kills):2d} at {moment:6.1f} s: {what} with {kills[-1]['stages_done']} stages done",
              flush=True)
    subprocess.run(command(out), check=True, stdout=subprocess.DEVNULL, env=environment(out))
    return kills


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def jsonl_differences(reference: Path, killed: Path) -> list[str]:
    problems = []
    for ref_file in sorted(reference.rglob("*.jsonl")):
        name = ref_file.relative_to(reference)
        if "checkpoints" in str(name):
            continue
        other = killed / name
        if not other.exists():
            problems.append(f"{name}: missing")
            continue
        ref_rows = [json.loads(line) for line in ref_file.read_text().splitlines() if line.strip()]
        rows = [json.loads(line) for line in other.read_text().splitlines() if line.strip()]
        ids = [r.get("id") for r in rows]
        if len(ids) != len(set(ids)):
            problems.append(f"{name}: {len(ids) - len(set(ids))} duplicate ids")
        by_id = {r.get("id"): without_timings(r) for r in rows}
        expected = {r.get("id"): without_timings(r) for r in ref_rows}
        if by_id != expected:
            changed = sum(by_id.get(i) != row for i, row in expected.items())
            problems.append(f"{name}: {changed} of {len(expected)} rows differ or are missing, "
                            f"{len(set(by_id) - set(expected))} extra")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("/tmp/kill-resume"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    reference, killed = args.out / "reference", args.out / "killed"
    seconds = reference_run(reference)
    print(f"uninterrupted run: {seconds:.0f} s, {len(stages(reference))} stages", flush=True)
    rng = random.Random(args.seed)
    moments = sorted(rng.uniform(0, seconds) for _ in range(args.kills))
    kills = killed_run(killed, moments)
    problems = jsonl_differences(reference, killed)
    if stages(killed) != stages(reference):
        problems.append(f"stages differ: {sorted(set(stages(reference)) ^ set(stages(killed)))}")
    ref_metrics = without_timings(json.loads((reference / "metrics.json").read_text()))
    if without_timings(json.loads((killed / "metrics.json").read_text())) != ref_metrics:
        problems.append("metrics.json differs")
    done = sum(k["killed"] for k in kills)
    print(f"{done} kills of {len(kills)} moments landed in {len({k['stages_done'] for k in kills})} "
          f"different stages; {'identical to the uninterrupted run' if not problems else 'DIFFERENCES:'}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
