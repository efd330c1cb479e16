"""Training plumbing the four trainers share (SFT, PRM, DPO, GRPO): the model prepared for
training (vision tower frozen where it already sees, LoRA where asked), the TrainingArguments
they have in common, resume from the last complete checkpoint, one progress line per stage, and
the saved model with its summary (`chainstep.json`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .config import TrainConfig
from .layout import model_summary, relative_path
from .models import load, save

console = Console(stderr=True)
VISION_PATTERNS = ("vision_tower", "vision_model", "visual.", "vision_encoder")
LORA_TARGETS = r".*(language_model|text_model).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def vision_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if any(v in n for v in VISION_PATTERNS)]


def _is_pretrained(model_dir: Path) -> bool:
    return not model_summary(model_dir).get("from_scratch")


def _sees(model_dir: Path) -> bool:
    """A vision tower that is already trained: a real checkpoint's, or one the pretrain stage made."""
    return _is_pretrained(model_dir) or bool(model_summary(model_dir).get("vision_pretrained"))


def _wrap_lora(model, cfg: TrainConfig):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))


def last_complete_checkpoint(folder: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (its trainer_state.json comes last,
    and a kill can land while it is being written); a kill during a save leaves a partial
    folder that resuming from would crash on."""
    done = [p for p in folder.glob("checkpoint-*") if _complete_state(p / "trainer_state.json")]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


def _complete_state(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


class ResumeWeights:
    """Trainer mixin that resumes weights through `from_pretrained`. `save_pretrained` writes some
    models (Llava, ...) under their legacy key names, which the Trainer's raw state-dict load skips
    with only a warning: the run would go on from the initial weights with the later optimizer state."""

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model or self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        dtype = next(model.parameters()).dtype
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=dtype, use_safetensors=True)
        model.load_state_dict(saved.state_dict())


class ResumableTrainer(ResumeWeights, Trainer):
    pass


def prepare_model(model_dir: Path, cfg: TrainConfig):
    """Load, freeze the vision tower where it is pretrained, wrap in LoRA if asked."""
    model, processor = load(model_dir)
    freeze = cfg.freeze_vision if cfg.freeze_vision is not None else _sees(model_dir)
    for p in vision_parameters(model) if freeze else []:
        p.requires_grad_(False)
    if cfg.lora:
        model = _wrap_lora(model, cfg)
    return model, processor


def training_arguments(cfg: TrainConfig, checkpoints: Path, **extra) -> TrainingArguments:
    return TrainingArguments(**training_kwargs(cfg, checkpoints), **extra)


def training_kwargs(cfg: TrainConfig, checkpoints: Path) -> dict:
    """The TrainingArguments every stage shares (TRL's configs extend them)."""
    return dict(
        output_dir=str(checkpoints), max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        logging_steps=max(1, cfg.max_steps // 20), report_to=[],
        seed=cfg.seed, bf16=cfg.bf16, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, activation_checkpointing=False,
        disable_tqdm=True,
    )


class RichProgress(TrainerCallback):
    """One progress line per training stage (steps, loss, time left) instead of the Trainer's
    tqdm bar and printed dicts; every log entry also goes to `log_path` as a JSON line."""

    def __init__(self, description: str, log_path: Path):
        self.description, self.log_path = description, Path(log_path)
        self.progress: Progress | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                                 console=Console(stderr=True))
        self.task = self.progress.add_task(self.description, total=state.max_steps,
                                           completed=state.global_step, loss="-")
        self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if self.progress and "loss" in logs:
            self.progress.update(self.task, loss=f"{float(logs['loss']):.4f}")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("a", encoding="utf-8") as file:
            file.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None


def quiet_progress(trainer: Trainer, description: str, log_path: Path) -> Trainer:
    """Swap the Trainer's printing for `RichProgress`."""
    for callback in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(callback)
    trainer.add_callback(RichProgress(description, log_path))
    return trainer


def weights_digest(model: torch.nn.Module, trainable_only: bool = False) -> str:
    digest = hashlib.sha256()
    for _, param in sorted(model.named_parameters()):
        if param.requires_grad or not trainable_only:
            digest.update(param.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def fit(trainer: ResumableTrainer, cfg: TrainConfig, processor, model_dir: Path, out_dir: Path,
        meta: dict) -> Path:
    """Train (resuming from the last complete checkpoint), merge LoRA, save with a summary.

    A run that leaves every weight as it found it (a learning rate of 0, a schedule that never
    leaves warm-up) is the no-op guard's case: it says so, and the summary records
    `weights_changed: false`, so no finding is drawn from a model that is its start model."""
    last = last_complete_checkpoint(Path(trainer.args.output_dir))
    start = weights_digest(trainer.model, trainable_only=True)  # frozen weights cannot move
    quiet_progress(trainer, out_dir.name, Path(trainer.args.output_dir) / "train_log.jsonl")
    result = trainer.train(resume_from_checkpoint=last)
    changed = last is not None or weights_digest(trainer.model, trainable_only=True) != start
    model = trainer.model.merge_and_unload() if cfg.lora else trainer.model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    for callback in trainer.callback_handler.callbacks:
        meta.update(callback.summary() if hasattr(callback, "summary") else {})
    if not trainer.is_world_process_zero():
        return out_dir
    if not changed:
        console.print(f"[yellow]{out_dir.name}: training left every weight unchanged (learning rate "
                      f"{cfg.learning_rate}); this model is its start model[/yellow]")
    return save(model, processor, out_dir, meta={
        "weights_changed": changed,
        "from_scratch": not _is_pretrained(model_dir), "vision_pretrained": _sees(model_dir),
        "trained_from": relative_path(model_dir, out_dir), **meta,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "resumed_from": relative_path(last, out_dir) if last else None,
    })
