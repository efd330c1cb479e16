"""kill -9 a `chainstep run --quick` at random moments, resume it each time, and check that it
ends with what an uninterrupted run gives: the same stages, the same rows in every JSONL file
(no duplicates, no gaps, no changed text) and the same metrics.

    python bench/kill_resume.py --kills 20 --out /tmp/kill-resume

Each kill picks a stage in proportion to the time the reference run spent in it and a moment
within it, counted from when the restarted run reaches that stage (so restarts' loading does not
push every kill into the first stages). Prints one line per kill and a verdict; exits 1 on any
difference.
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
import threading
import time
from pathlib import Path

TIMING = re.compile(r"(seconds|runtime|per_second|per_s$|_s$|time)")


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


def stage_seconds(out: Path) -> list[tuple[str, float]]:
    """The reference run's stages in the order they ran, with how long each took."""
    markers = sorted((out / "stages").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return [(p.stem, float(json.loads(p.read_text()).get("seconds", 0.0))) for p in markers]


def draw_kills(reference: list[tuple[str, float]], count: int, rng: random.Random) -> list[tuple[int, float]]:
    """(stage index, seconds into that stage) for each kill: stages drawn in proportion to the
    time the reference spent in them; a stage drawn k times gets k moments within its first 1/k
    (each restart resumes it from a checkpoint, so later kills there have less of it left)."""
    weights = [max(seconds, 0.5) for _, seconds in reference]
    picks = sorted(rng.choices(range(len(reference)), weights=weights, k=count))
    return [(k, rng.uniform(0, weights[k] / picks.count(k))) for k in picks]


def stage_started(proc: subprocess.Popen, names: list[str], stage: int) -> threading.Event:
    """Set once the run prints the header of stage `stage` or a later one (or exits): the moment
    it is working in that stage, past its imports, model loading and skipped stages."""
    started = threading.Event()

    def watch():
        for line in proc.stderr:
            name = line.strip().strip("─").strip()
            if "─" in line and name in names and names.index(name) >= stage:
                started.set()
        started.set()

    threading.Thread(target=watch, daemon=True).start()
    return started


def killed_run(out: Path, kills_at: list[tuple[int, float]], names: list[str]) -> list[dict]:
    """For each kill: start (resuming), wait until the run works in its stage (or a later one),
    then the drawn seconds more, SIGKILL; then run to the end."""
    kills = []
    for stage, delay in kills_at:
        proc = subprocess.Popen(command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**environment(out), "COLUMNS": "80"})
        stage_started(proc, names, stage).wait()
        running = min(len(stages(out)), len(names) - 1)
        try:
            proc.wait(timeout=delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            killed = True
        kills.append({"stage": names[running], "after_s": round(delay, 1), "killed": killed,
                      "stages_done": len(stages(out))})
        what = "killed" if killed else "had finished"
        print(f"kill {len(kills):2d} in {names[running]:>12s} after {delay:5.1f} s: {what} with "
              f"{kills[-1]['stages_done']} stages done", flush=True)
        if not killed:
            break  # the run is complete: nothing left to kill
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
    timeline = stage_seconds(reference)
    kills = killed_run(killed, draw_kills(timeline, args.kills, random.Random(args.seed)),
                       [name for name, _ in timeline])
    problems = jsonl_differences(reference, killed)
    if stages(killed) != stages(reference):
        problems.append(f"stages differ: {sorted(set(stages(reference)) ^ set(stages(killed)))}")
    ref_metrics = without_timings(json.loads((reference / "metrics.json").read_text()))
    if without_timings(json.loads((killed / "metrics.json").read_text())) != ref_metrics:
        problems.append("metrics.json differs")
    done = sum(k["killed"] for k in kills)
    if done < args.kills:
        problems.append(f"only {done} of {args.kills} kills landed before the run completed")
    print(f"{done} kills of {len(kills)} landed in {len({k['stage'] for k in kills if k['killed']})} "
          f"different stages; {'identical to the uninterrupted run' if not problems else 'DIFFERENCES:'}")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
