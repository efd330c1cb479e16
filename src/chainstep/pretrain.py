"""Pretraining: the tiny VLM learns to see, then to read and add, before CoS SFT.

Every policy in the paper starts from a pretrained VLM; a tiny model built from config starts
from random weights, and learning to see inside the SFT budget left its chains guessing at
the values they read (README). This stage is the analogue of a real VLM's pretraining, on
freshly drawn suite images (never a task image), in two phases:

1. *Seeing.* The vision tower and projector alone train with dense targets read off the scene:
   every reading a chain makes (the count, height, length or size of each colour group, as a
   10-way class), the family, and the colour under every image token.
2. *Reading.* With the tower frozen, the language model (and projector) learns to say what the
   tower sees and to add it up: prompt "Read the image.", target the reading facts a chain
   would state, then sums and differences of them ("Red bar: 6. Green bar: 1. ... Red plus
   green: 6 + 1 = 7."). This is what a real VLM's language model brings to instruction tuning
   and a tiny random one lacks: without it, SFT's chains failed mostly at the sum (4 + 4 = 10),
   and whether the table was learned by SFT's last step depended on the seed (val 85.6 / 78.6 /
   65.8 under three seeds; docs/findings.md).

CoS SFT and the direct baseline both start from this base with the tower frozen. It costs about
6 minutes on 2 CPU cores. The result is cached per machine under `$CHAINSTEP_CACHE` (default
`~/.cache/chainstep`), keyed by the starting weights, this config and the suite's difficulty,
like downloaded weights: a second run loads it in a second. Skipped for a local pretrained
checkpoint (`model.path`), which can already see and read.

    chainstep pretrain runs/x/models/init --out runs/x/models/pretrained
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Trainer, TrainingArguments, set_seed

from .config import PretrainConfig, SuiteConfig, TrainConfig
from .errors import ChainstepError
from .inputs import SFTCollator
from .layout import checkpoints_of, model_summary, relative_path, waiting_lock
from .models import load, save
from .records import write_json
from .synthetic import COLOURS, FAMILIES, ORDER, Scene, add_step, is_reading, readings, subtract_step, summed
from .training import (
    VISION_PATTERNS,
    ResumableTrainer,
    last_complete_checkpoint,
    quiet_progress,
    training_arguments,
)

VERSION = 2  # bump when the targets or heads change, so old cache entries are not reused
PROJECTOR_PATTERNS = ("multi_modal_projector", "connector", "mlp1", "merger")
READING_CLASSES = 10  # a reading is 0 (colour absent) .. 9
HELD_OUT_SEED = 7_777  # held-out images come from another seed stream than training images
READ_PROMPT = "Read the image."
CAPTION_SUMS = 3  # sums and differences of the readings a caption ends with
WEIGHTS = "weights.safetensors"  # a cache entry's trained weights


def cache_root() -> Path:
    return Path(os.environ.get("CHAINSTEP_CACHE", Path.home() / ".cache" / "chainstep"))


def perception_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The vision tower and the projector that maps its features into the language model."""
    return {n: p for n, p in model.named_parameters()
            if any(v in n for v in VISION_PATTERNS + PROJECTOR_PATTERNS)}


def trained_parameters(model: nn.Module, cfg: PretrainConfig) -> dict[str, nn.Parameter]:
    """What this stage changes: the perception alone, or the whole model when it also reads."""
    return dict(model.named_parameters()) if cfg.captions else perception_parameters(model)


def cache_key(model: nn.Module, cfg: PretrainConfig, suite: SuiteConfig) -> str:
    """Same starting weights + same training + same images = same result."""
    digest = hashlib.sha256()
    for name, param in sorted(trained_parameters(model, cfg).items()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().float().numpy().tobytes())
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("cache", "save_steps", "held_out")}
    digest.update(json.dumps({"version": VERSION, "pretrain": settings, "families": list(suite.families),
                              "max_objects": suite.max_objects, "terms": suite.terms,
                              "operands": suite.operands},
                             sort_keys=True).encode())
    return digest.hexdigest()[:16]


def scene(index: int, suite: SuiteConfig, stream: str) -> tuple[str, Scene]:
    """Scene `index` of a named stream of fresh scenes, the families in turn, with its family."""
    family = suite.families[index % len(suite.families)]
    return family, FAMILIES[family](random.Random(f"{stream}:{index}"), suite)


def draw(index: int, suite: SuiteConfig, seed: int) -> dict:
    """One fresh scene: the image and its dense targets."""
    family, drawn = scene(index, suite, f"pretrain:{seed}")
    values = readings(drawn.steps)
    return {"image": drawn.image, "family": suite.families.index(family),
            "readings": [min(values.get(c, 0), READING_CLASSES - 1) for c in ORDER]}


def caption(steps: list[dict], rng: random.Random, sums: int = CAPTION_SUMS, operands: int = 2) -> str:
    """What the language model learns to say about an image, in a chain's words: every reading
    ("Red bar: 6."), then `sums` sums (of `operands` readings) and differences of them ("Red plus
    green: 6 + 1 = 7."), the arithmetic a pretrained language model brings and a tiny random one
    lacks."""
    read = [fact for fact in steps if is_reading(fact)]
    values = {fact["key"].split(" ")[0].lower(): int(fact["value"])
              for fact in read if fact["value"].isdigit()}
    names = list(values)
    lines = [f"{fact['key']}: {fact['value']}." for fact in read]
    for _ in range(sums if len(values) > 1 else 0):
        a, b = sorted(rng.sample(names, 2), key=names.index)
        if values[a] != values[b] and rng.random() < 0.5:  # the larger first, as the chains write it
            step, _ = subtract_step(*sorted((a, b), key=lambda c: -values[c]), values)
        else:
            step, _ = add_step(summed(rng, names, [a, b], min(operands, len(names))), values)
        lines.append(f"{step['key']}: {step['value']}.")
    return " ".join(lines)


def caption_row(index: int, suite: SuiteConfig, seed: int) -> dict:
    """One fresh scene as an SFT row: the reading prompt and its caption."""
    family, drawn = scene(index, suite, f"caption:{seed}")
    return {"id": f"caption-{seed}-{index}", "image": drawn.image, "question": READ_PROMPT,
            "options": None, "family": family,
            "response": caption(drawn.steps, random.Random(f"caption-sums:{seed}:{index}"),
                                operands=suite.operands)}


def token_colours(image, grid: int) -> torch.Tensor:
    """The colour class (0 = none, 1.. = ORDER) filling most of each of grid x grid cells."""
    pixels = np.asarray(image, dtype=np.int16)
    palette = np.array([COLOURS[c] for c in ORDER], dtype=np.int16)
    distance = np.abs(pixels[:, :, None, :] - palette[None, None]).sum(-1)
    labels = np.where(distance.min(-1) < 60, distance.argmin(-1) + 1, 0)
    cell = pixels.shape[0] // grid
    cells = labels[:grid * cell, :grid * cell].reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3)
    cells = cells.reshape(grid * grid, cell * cell)
    counts = np.stack([(cells == k).sum(-1) for k in range(len(ORDER) + 1)], -1)
    counts[:, 0] = np.where(counts[:, 1:].max(-1) * 4 >= cell * cell, 0, cell * cell)
    return torch.from_numpy(counts.argmax(-1))


class SceneImages(torch.utils.data.Dataset):
    """`size` drawn scenes, item `i` a pure function of (seed, i): a resumed run sees the same data."""

    def __init__(self, suite: SuiteConfig, size: int, seed: int, make=draw):
        self.suite, self.size, self.seed, self.make = suite, size, seed, make

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return self.make(index, self.suite, self.seed)


class SceneCollator:
    def __init__(self, processor, grid: int):
        self.image_processor, self.grid = processor.image_processor, grid

    def __call__(self, items: list[dict]) -> dict:
        batch = dict(self.image_processor([i["image"] for i in items], return_tensors="pt"))
        batch["family"] = torch.tensor([i["family"] for i in items])
        batch["readings"] = torch.tensor([i["readings"] for i in items])
        batch["token_colours"] = torch.stack([token_colours(i["image"], self.grid) for i in items])
        return batch


def image_features(model: nn.Module, vision_inputs: dict) -> torch.Tensor:
    """[images, tokens, hidden]: what the language model receives for each image."""
    out = model.get_image_features(**vision_inputs)
    features = getattr(out, "pooler_output", out)
    if isinstance(features, (list, tuple)):
        return torch.stack(list(features))
    return features.reshape(len(vision_inputs["pixel_values"]), -1, features.shape[-1])


class PerceptionHeads(nn.Module):
    """Reading, family and per-token colour heads on the VLM's image features."""

    def __init__(self, model: nn.Module, hidden: int, families: int):
        super().__init__()
        self.model = model
        self.pool = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU())
        self.reading = nn.Linear(hidden, families * len(ORDER) * READING_CLASSES)
        self.family = nn.Linear(hidden, families)
        self.token = nn.Linear(hidden, len(ORDER) + 1)
        self.families = families

    def forward(self, family, readings, token_colours, **vision_inputs):
        features = image_features(self.model, vision_inputs)
        pooled = self.pool(features.mean(dim=1))
        logits = self.reading(pooled).view(-1, self.families, len(ORDER), READING_CLASSES)
        logits = logits[torch.arange(len(family)), family]
        token_logits = self.token(features)
        loss = (nn.functional.cross_entropy(logits.flatten(0, 1), readings.flatten())
                + nn.functional.cross_entropy(self.family(pooled), family)
                + nn.functional.cross_entropy(token_logits.flatten(0, 1), token_colours.flatten()))
        return {"loss": loss, "reading_logits": logits, "token_logits": token_logits}


def _token_layout(model: nn.Module, processor, suite: SuiteConfig) -> tuple[int, int]:
    """(grid side, hidden size) of the image features the language model receives."""
    probe = draw(0, suite, 0)["image"]
    with torch.no_grad():
        tokens = image_features(model, dict(processor.image_processor([probe], return_tensors="pt")))
    grid = int(round(tokens.shape[1] ** 0.5))
    if grid * grid != tokens.shape[1]:
        raise ChainstepError(f"pretraining needs a square grid of image tokens; this model gives "
                             f"{tokens.shape[1]} per image")
    return grid, tokens.shape[-1]


def _trainer(heads: PerceptionHeads, processor, grid: int, suite: SuiteConfig, cfg: PretrainConfig,
             checkpoints: Path) -> Trainer:
    args = TrainingArguments(
        output_dir=str(checkpoints), max_steps=cfg.max_steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=cfg.warmup_steps,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        logging_steps=max(1, cfg.max_steps // 10), report_to=[], seed=cfg.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0, remove_unused_columns=False,
        disable_tqdm=True)
    trainer = Trainer(model=heads, args=args, train_dataset=SceneImages(suite, cfg.images, cfg.seed),
                      data_collator=SceneCollator(processor, grid))
    return quiet_progress(trainer, "pretrain", checkpoints.with_name(checkpoints.name + "-log.jsonl"))


@torch.no_grad()
def reading_accuracy(heads: PerceptionHeads, processor, grid: int, suite: SuiteConfig,
                     count: int) -> dict[str, float]:
    """Share of held-out images whose every reading is right, per family."""
    heads.eval()
    collate = SceneCollator(processor, grid)
    right: dict[str, list[bool]] = {f: [] for f in suite.families}
    for start in range(0, count, 128):
        items = [draw(i, suite, HELD_OUT_SEED) for i in range(start, min(count, start + 128))]
        batch = {k: v.to(heads.family.weight.device) for k, v in collate(items).items()}
        predicted = heads(**batch)["reading_logits"].argmax(-1)
        for family, ok in zip(batch["family"].tolist(), (predicted == batch["readings"]).all(-1).tolist()):
            right[suite.families[family]].append(ok)
    return {f: round(sum(v) / len(v), 4) for f, v in right.items() if v}


def pretrain(model_dir: str | Path, out_dir: str | Path, suite: SuiteConfig | None = None,
             cfg: PretrainConfig | None = None) -> dict:
    """Pretrain (or load from the cache) the model in `model_dir` to see and to read; save the
    whole model to `out_dir`, its vision marked pretrained so SFT freezes it."""
    suite, cfg = suite or SuiteConfig(), cfg or PretrainConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, processor = load(model_dir, device="cpu")  # the Trainer moves it where it trains
    if not perception_parameters(model):
        raise ChainstepError(f"{model_dir}: found no vision tower or projector to pretrain")
    key = cache_key(model, cfg, suite)
    entry = cache_root() / "pretrain" / key
    with waiting_lock(entry.with_name(entry.name + ".lock")):  # two runs pretrain one model once
        hit = cfg.cache and (entry / "meta.json").exists()
        if hit:
            model.load_state_dict(load_file(entry / WEIGHTS), strict=False)
            info = json.loads((entry / "meta.json").read_text())
        else:
            checkpoints = checkpoints_of(out_dir)
            info = _train(model, processor, suite, cfg, checkpoints)
            if cfg.captions:
                info["reading"] = _train_reading(model, processor, suite, cfg, checkpoints)
            shutil.rmtree(checkpoints, ignore_errors=True)
            _store(entry, trained_parameters(model, cfg), info)
    meta = {**model_summary(model_dir), "vision_pretrained": True, "pretrain": asdict(cfg), "cache_key": key,
            "pretrained_from": relative_path(model_dir, out_dir), **info}
    save(model, processor, out_dir, meta=meta)
    return {"cache": "hit" if hit else "miss", "cache_key": key, **info}


def _train(model, processor, suite: SuiteConfig, cfg: PretrainConfig, checkpoints: Path) -> dict:
    """Phase 1, seeing: the tower and projector alone, on the perception heads."""
    set_seed(cfg.seed)
    for name, param in model.named_parameters():
        param.requires_grad_(any(v in name for v in VISION_PATTERNS + PROJECTOR_PATTERNS))
    grid, hidden = _token_layout(model, processor, suite)
    heads = PerceptionHeads(model, hidden, len(suite.families))
    trainer = _trainer(heads, processor, grid, suite, cfg, checkpoints)
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(checkpoints))
    accuracy = reading_accuracy(heads, processor, grid, suite, cfg.held_out) if cfg.held_out else {}
    return {**_phase_summary(model, trainer, result, cfg.batch_size), "held_out_readings_right": accuracy}


def _phase_summary(model: nn.Module, trainer: Trainer, result, batch_size: int) -> dict:
    """Unfreeze the whole model again and say what the phase did."""
    for param in model.parameters():
        param.requires_grad_(True)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    steps = trainer.args.max_steps
    return {"steps": steps, "images": steps * batch_size,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "train_runtime_s": result.metrics.get("train_runtime")}


def _train_reading(model, processor, suite: SuiteConfig, cfg: PretrainConfig, checkpoints: Path) -> dict:
    """Phase 2, reading: the language model and projector learn to state what the frozen tower
    sees, with SFT's loss (on the caption tokens only); its checkpoints go under phase 1's."""
    for name, param in model.named_parameters():
        param.requires_grad_(not any(v in name for v in VISION_PATTERNS))
    train = TrainConfig(max_steps=cfg.caption_steps, per_device_train_batch_size=cfg.caption_batch_size,
                        learning_rate=cfg.caption_learning_rate, warmup_steps=cfg.warmup_steps,
                        save_steps=cfg.save_steps, seed=cfg.seed)
    trainer = ResumableTrainer(model=model, args=training_arguments(train, checkpoints / "reading"),
                               train_dataset=SceneImages(suite, cfg.captions, cfg.seed, caption_row),
                               data_collator=SFTCollator(processor, train.max_length))
    log = checkpoints.with_name(checkpoints.name + "-reading-log.jsonl")
    quiet_progress(trainer, "pretrain reading", log)
    result = trainer.train(resume_from_checkpoint=last_complete_checkpoint(Path(trainer.args.output_dir)))
    accuracy = caption_accuracy(model, processor, suite, cfg.held_out) if cfg.held_out else {}
    return {**_phase_summary(model, trainer, result, cfg.caption_batch_size),
            "held_out_captions_right": accuracy}


@torch.no_grad()
def caption_accuracy(model: nn.Module, processor, suite: SuiteConfig, count: int) -> dict[str, float]:
    """Share of held-out images whose caption numbers (readings, operands, results) the language
    model all predicts, teacher-forced, per family. Which pairs a caption adds is drawn at random,
    so only its numbers are to be predicted."""
    model.eval()
    collate, tok = SFTCollator(processor), processor.tokenizer
    device = next(model.parameters()).device
    numbers = [i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()]
    number_ids = torch.tensor(numbers, device=device)
    right: dict[str, list[bool]] = {f: [] for f in suite.families}
    for start in range(0, count, 64):
        rows = [caption_row(i, suite, HELD_OUT_SEED) for i in range(start, min(count, start + 64))]
        batch = {k: v.to(device) for k, v in collate(rows).items()}
        labels = batch.pop("labels")[:, 1:]
        predicted = model(**batch).logits[:, :-1].argmax(-1)
        ok = ((predicted == labels) | ~torch.isin(labels, number_ids)).all(-1)
        for row, read in zip(rows, ok.tolist()):
            right[row["family"]].append(read)
    model.train()
    return {f: round(sum(v) / len(v), 4) for f, v in right.items() if v}


def _store(entry: Path, params: dict[str, nn.Parameter], info: dict) -> None:
    """Write the cache entry atomically: a kill mid-write leaves no entry, not a broken one."""
    partial = entry.with_name(entry.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in params.items()}, partial / WEIGHTS)
    write_json(partial / "meta.json", info)
    shutil.rmtree(entry, ignore_errors=True)
    partial.rename(entry)
