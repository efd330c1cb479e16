"""The layout of a run directory: every path and file name a run writes, in one place, and the
lock a run holds on the directory while it writes there.

    runs/x/
      config.json, config.yaml   the resolved config (a resume must match it)
      tasks/{split}.jsonl        task records (images beside them)
      data/                      teacher data, sampled chains, step labels, DPO samples/pairs/stats
      models/{name}/             every model, with its chainstep.json summary
      eval/{model}-{split}.jsonl predictions; search samples; PRM traces
      stages/{stage}.json        a finished stage's marker and summary
      metrics.json, report.html  results

Paths recorded inside the run (model summaries, stage stats) are relative, so a run directory
moved or copied elsewhere still reports, evaluates and resumes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ChainstepError

MODEL_SUMMARY = "chainstep.json"  # beside a model's weights: how chainstep made it
METRICS = "metrics.json"  # every result row of a run, or of an `eval --out` folder
# Policy name (its models/ folder and metrics.json `model`) -> its style: the teacher data it trains on
# and how it answers.
POLICIES = {"sft": "cos", "base": "direct", "cot": "cot"}
# The reasoning-mode ablation (`grpo.reasoning_modes`): outcome GRPO run -> the policy it starts from.
MODE_RUNS = {"grpo-outcome-base": "base", "grpo-outcome-cot": "cot"}
# Stages that exist for the verifier: chains for its labels, the labels, its training, its metrics.
VERIFIER_STAGES = ("sample", "label", "prm", "prm_eval")
TEACHER_DATA = {"cos": "sft.jsonl", "cot": "cot.jsonl", "direct": "direct.jsonl", "rejects": "rejects.jsonl"}


class RunLayout:
    """Paths of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tasks, self.data = self.root / "tasks", self.root / "data"
        self.models, self.eval, self.stages = self.root / "models", self.root / "eval", self.root / "stages"
        self.metrics, self.report = self.root / METRICS, self.root / "report.html"
        self.config_json, self.config_yaml = self.root / "config.json", self.root / "config.yaml"
        self.lock_file = self.root / ".lock"
        self.traces = self.eval / "prm-traces.jsonl"

    def split(self, name: str) -> Path:
        return self.tasks / f"{name}.jsonl"

    def model(self, name: str) -> Path:
        return self.models / name

    def predictions(self, model: str, split: str) -> Path:
        return predictions_file(self.eval, model, split)

    def teacher_data(self, kind: str) -> Path:
        """The teacher's `cos` chains, the same chains as plain `cot` text, the `direct` answers
        built from the same questions, or the `rejects` the format filter turned away."""
        return self.data / TEACHER_DATA[kind]

    def samples(self, split: str) -> Path:
        """Policy chains sampled for the PRM's labels (train) and its evaluation (val)."""
        return self.data / f"samples-{split}.jsonl"

    def labels(self, split: str) -> Path:
        return self.data / ("prm_labels.jsonl" if split == "train" else f"prm_labels-{split}.jsonl")

    def round_file(self, name: str, kind: str) -> Path:
        """A DPO round's `samples` / `pairs` (JSONL) or `stats` (JSON)."""
        return self.data / f"{name}-{kind}.{'json' if kind == 'stats' else 'jsonl'}"

    def stage_marker(self, stage: str) -> Path:
        return self.stages / f"{stage}.json"

    def relative(self, path: str | Path) -> str:
        """`path` as recorded inside the run: relative to its root."""
        return relative_path(path, self.root)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory for one run: a second process that asks while it is held is refused
        at once, in one line naming the holder. The OS releases the lock when its holder dies, so
        a killed run leaves nothing to clean up."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.lock_file.read_text().strip() or "another process"
            os.close(fd)
            raise ChainstepError(f"{self.root} is in use by another run ({holder}); wait for it to "
                                 "finish or write elsewhere") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextmanager
def waiting_lock(path: str | Path) -> Iterator[None]:
    """Hold `path` exclusively, waiting (and saying so in one line) while another process holds
    it: for entries several runs fill, like the pretrain cache, where the second run should reuse
    the first one's result rather than be refused or write over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"chainstep: waiting for another process that holds {path}", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def run_root(path: str | Path) -> Path | None:
    """The run directory `path` lies in (itself or the nearest ancestor a run has locked and
    saved its config in), if any."""
    path = Path(path).resolve()
    return next((folder for folder in [path, *path.parents] if (folder / ".lock").exists()
                 and (folder / "config.yaml").exists()), None)


@contextmanager
def writing_into(path: str | Path) -> Iterator[None]:
    """Hold the lock of the run directory `path` lies in while writing there, as `chainstep run`
    does: a command that writes into a busy run is refused in one line naming the holder.
    Outside a run directory there is nothing to hold."""
    root = run_root(path)
    if root is None:
        yield
        return
    with RunLayout(root).lock():
        yield


def predictions_file(folder: str | Path, model: str, split: str) -> Path:
    """Greedy predictions, in a run's `eval/` or the folder `chainstep eval --out` names."""
    return Path(folder) / f"{model}-{split}.jsonl"


def samples_file(folder: str | Path, model: str, split: str, temperature: float | None = None) -> Path:
    """Search's sampled chains (with their verifier scores) for one model and split."""
    tail = "" if temperature is None else f"-t{temperature}"
    return Path(folder) / f"{model}-{split}-samples{tail}.jsonl"


def temperature_file(folder: str | Path, temperature: float) -> Path:
    """The val chains sampled at one temperature while search chooses its temperature."""
    return Path(folder) / f"val-samples-t{temperature}.jsonl"


def beam_file(folder: str | Path, model: str, split: str, n: int) -> Path:
    return Path(folder) / f"{model}-{split}-beam{n}.jsonl"


def rejects_of(path: str | Path) -> Path:
    """Where the rows a stage turned away from `path` are kept, with their reasons."""
    path = Path(path)
    return path.with_name(path.stem + "_rejects.jsonl")


def model_summary(model_dir: str | Path) -> dict:
    """What a model's `chainstep.json` says; {} for a model chainstep did not make. The one
    reader of the file (`models.save` is its one writer)."""
    path = Path(model_dir) / MODEL_SUMMARY
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ChainstepError(f"{path} is damaged (not JSON); delete {model_dir} to retrain it") from None


def is_saved(model_dir: str | Path) -> bool:
    """Whether a stage finished saving this model: its summary is written last."""
    return (Path(model_dir) / MODEL_SUMMARY).exists()


def checkpoints_of(model_dir: str | Path) -> Path:
    """Where a model's trainer keeps its resumable checkpoints: beside the model, not in it."""
    model_dir = Path(model_dir)
    return model_dir.with_name(model_dir.name + "-checkpoints")


def relative_path(path: str | Path, start: str | Path) -> str:
    """`path` relative to the directory `start`, as files that refer to each other record it."""
    return os.path.relpath(Path(path).resolve(), Path(start).resolve())
