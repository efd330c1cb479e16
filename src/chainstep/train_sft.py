"""Supervised fine-tuning on step chains (CoS SFT) or on answers alone (the direct baseline).

Reads `sft.jsonl` / `direct.jsonl` rows (`response` holds the target text), trains with the
transformers `Trainer` (loss on response tokens only), checkpoints every `save_steps` and
resumes from the newest checkpoint when re-run after a kill. The result is a plain model
directory (LoRA adapters merged), loadable by `chainstep.models.load`.

    chainstep sft runs/x/models/init runs/x/data/sft.jsonl --out runs/x/models/sft
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from transformers import set_seed

from .config import SFTConfig, TrainConfig
from .errors import ChainstepError
from .inputs import SFTCollator
from .layout import relative_path
from .records import read_jsonl
from .training import ResumableTrainer, fit, prepare_model, training_arguments


def train_sft(model_dir: str | Path, data_path: str | Path, out_dir: str | Path,
              cfg: SFTConfig | None = None) -> Path:
    """Fine-tune the model in `model_dir` on `data_path`; returns the saved model directory."""
    cfg = cfg or SFTConfig()
    rows = read_jsonl(data_path, required=("id", "image", "question", "response"))
    if not rows:
        raise ChainstepError(f"{data_path} holds no training rows")
    meta = {"data": relative_path(data_path, out_dir), "sft": asdict(cfg)}
    return fit_rows(model_dir, rows, out_dir, cfg, meta)


def fit_rows(model_dir: str | Path, rows: list[dict], out_dir: str | Path, cfg: TrainConfig,
             meta: dict) -> Path:
    """SFT on in-memory rows (record fields + `response`): the one SFT loop, shared by `train_sft`
    and the RFT control."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    set_seed(cfg.seed)
    model, processor = prepare_model(model_dir, cfg)
    args = training_arguments(cfg, out_dir.with_name(out_dir.name + "-checkpoints"))
    trainer = ResumableTrainer(model=model, args=args, train_dataset=rows,
                               data_collator=SFTCollator(processor, cfg.max_length))
    fit(trainer, cfg, processor, model_dir, out_dir, meta)
    return out_dir
