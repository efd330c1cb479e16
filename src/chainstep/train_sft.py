"""Supervised fine-tuning on step chains (CoS SFT) or on answers alone (the direct baseline).

Reads `sft.jsonl` / `direct.jsonl` rows (`response` holds the target text), trains with the
transformers `Trainer` (loss on response tokens only), checkpoints every `save_steps` and
resumes from the newest checkpoint when re-run after a kill. The result is a plain model
directory (LoRA adapters merged), loadable by `chainstep.models.load`.

    chainstep sft runs/x/models/init runs/x/data/sft.jsonl --out runs/x/models/sft
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import ProcessorMixin, TrainerCallback, set_seed

from .config import SFTConfig, TrainConfig
from .errors import ChainstepError
from .grading import grade_response
from .inputs import SFTCollator
from .layout import checkpoints_of, relative_path
from .models import load_processor
from .records import iter_jsonl, read_jsonl
from .sampling import Policy, SamplingParams
from .training import ResumableTrainer, fit, prepare_model, training_arguments

VAL_CURVE = "val_curve.jsonl"  # beside the trainer's checkpoints; a summary keeps the whole curve


def train_sft(model_dir: str | Path, data_path: str | Path, out_dir: str | Path,
              cfg: SFTConfig | None = None, val_records: list[dict] | None = None,
              style: str = "cos", batch_size: int = 128) -> Path:
    """Fine-tune the model in `model_dir` on `data_path`; returns the saved model directory.
    With `val_records` and `cfg.val_every`, the greedy val curve is recorded as training goes
    (graded in `style`, generated `batch_size` sequences at a time) and kept in the summary."""
    cfg = cfg or SFTConfig()
    rows = read_jsonl(data_path, required=("id", "image", "question", "response"))
    if not rows:
        raise ChainstepError(f"{data_path} holds no training rows")
    meta = {"data": relative_path(data_path, out_dir), "sft": asdict(cfg)}
    out_dir = Path(out_dir)
    curve = None
    if cfg.val_every and val_records:
        records = val_records[:cfg.val_questions] if cfg.val_questions else val_records
        curve = ValCurve(records, style, cfg.val_every, checkpoints_of(out_dir) / VAL_CURVE, batch_size,
                         load_processor(model_dir))
    return fit_rows(model_dir, rows, out_dir, cfg, meta, callbacks=[curve] if curve else [])


def fit_rows(model_dir: str | Path, rows: list[dict], out_dir: str | Path, cfg: TrainConfig,
             meta: dict, callbacks: list[TrainerCallback] = ()) -> Path:
    """SFT on in-memory rows (record fields + `response`): the one SFT loop, shared by `train_sft`
    and the RFT control."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    set_seed(cfg.seed)
    model, processor = prepare_model(model_dir, cfg)
    args = training_arguments(cfg, checkpoints_of(out_dir))
    trainer = ResumableTrainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks),
                               data_collator=SFTCollator(processor, cfg.max_length))
    fit(trainer, cfg, processor, model_dir, out_dir, meta)
    return out_dir


class ValCurve(TrainerCallback):
    """Greedy accuracy on val records every `every` optimizer steps and at the last one, appended
    to `path` as it is measured, so a killed run keeps its points and a resumed one adds the rest.
    The random state is put back after each evaluation: recording the curve leaves the training
    draws as they were."""

    def __init__(self, records: list[dict], style: str, every: int, path: Path, batch_size: int,
                 processor: ProcessorMixin):
        self.records, self.style, self.every, self.path = records, style, every, Path(path)
        self.batch_size, self.processor = batch_size, processor

    def points(self) -> list[dict]:
        if not self.path.exists():
            return []
        by_step = {p["step"]: p for p in iter_jsonl(self.path, required=("step", "accuracy"))}
        return [by_step[s] for s in sorted(by_step)]

    def summary(self) -> dict:
        """What the model's summary keeps (`fit` asks every callback that has this)."""
        return {"val_curve": self.points()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (step % self.every and step != state.max_steps) or not state.is_world_process_zero:
            return
        if any(p["step"] == step for p in self.points()):
            return
        rng = torch.get_rng_state()
        policy = Policy(model, self.processor, self.batch_size)
        gens = policy.generate(self.records, SamplingParams(max_tokens=256), progress=False)
        model.train()
        torch.set_rng_state(rng)
        right = sum(grade_response(g[0].text, r, self.style)["correct"] for r, g in zip(self.records, gens))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"step": step, "accuracy": right / len(self.records),
                                   "questions": len(self.records)}) + "\n")

