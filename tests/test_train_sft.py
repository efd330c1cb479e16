import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from chainstep import models
from chainstep.cli import app
from chainstep.config import SFTConfig
from chainstep.inputs import SFTCollator
from chainstep.records import read_jsonl
from chainstep.train_sft import train_sft
from chainstep.training import ResumableTrainer, training_arguments, vision_parameters


def test_labels_cover_the_response_only(tiny_model_dir, suite_dir):
    _, processor = models.load(tiny_model_dir("llava"))
    rows = read_jsonl(suite_dir / "data" / "sft.jsonl")[:3]
    batch = SFTCollator(processor)(rows)
    tok = processor.tokenizer
    for i, row in enumerate(rows):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert tok.decode(labelled) == row["response"] + tok.eos_token


def test_sft_lowers_loss_and_trains_every_parameter(tiny_model_dir, suite_dir, tmp_path):
    init = tiny_model_dir("llava")
    data = suite_dir / "data" / "sft.jsonl"
    cfg = SFTConfig(max_steps=12, per_device_train_batch_size=8, save_steps=100, warmup_steps=0)
    out = train_sft(init, data, tmp_path / "sft", cfg)
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["train_loss_last"] < meta["train_loss_first"] - 0.5
    before, _ = models.load(init)
    after, _ = models.load(out)
    unchanged = [n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
                 if torch.equal(a, b)]
    # built from scratch, the vision tower trains too; Llava reads the tower's last hidden
    # state before CLIP's post-layernorm, which so never gets a gradient
    assert unchanged == ["model.vision_tower.post_layernorm.weight",
                         "model.vision_tower.post_layernorm.bias"]


def test_val_curve_is_recorded_and_leaves_training_unchanged(tiny_model_dir, suite_dir, test_records,
                                                             tmp_path):
    init, data = tiny_model_dir("llava"), suite_dir / "data" / "sft.jsonl"
    cfg = SFTConfig(max_steps=5, per_device_train_batch_size=4, save_steps=100, warmup_steps=0,
                    val_every=2, val_questions=3)
    with_curve = train_sft(init, data, tmp_path / "curve", cfg, val_records=test_records, batch_size=8)
    plain = train_sft(init, data, tmp_path / "plain", SFTConfig(**{**cfg.__dict__, "val_every": 0}))
    curve = json.loads((with_curve / "chainstep.json").read_text())["val_curve"]
    assert [p["step"] for p in curve] == [2, 4, 5]
    assert all(p["questions"] == 3 and 0 <= p["accuracy"] <= 1 for p in curve)
    assert "val_curve" not in json.loads((plain / "chainstep.json").read_text())
    a, _ = models.load(with_curve)
    b, _ = models.load(plain)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(x, y), name


def test_the_sft_command_records_a_val_curve(tiny_model_dir, suite_dir, tmp_path):
    out, data = tmp_path / "sft", suite_dir / "data" / "sft.jsonl"
    settings = ["max_steps=2", "per_device_train_batch_size=4", "save_steps=100", "val_every=2",
                "val_questions=3"]
    result = CliRunner().invoke(app, ["sft", str(tiny_model_dir("llava")), str(data), "--out", str(out),
                                      "--val", str(suite_dir / "tasks" / "val.jsonl"),
                                      *[a for kv in settings for a in ("--set", kv)]])
    assert result.exit_code == 0, result.output
    curve = json.loads((out / "chainstep.json").read_text())["val_curve"]
    assert [(p["step"], p["questions"]) for p in curve] == [(2, 3)]


def test_vision_frozen_for_pretrained_checkpoints(tiny_model_dir, suite_dir, tmp_path):
    init = tmp_path / "pretrained"
    model, processor = models.load(tiny_model_dir("llava"))
    models.save(model, processor, init, meta={"from_scratch": False})
    out = train_sft(init, suite_dir / "data" / "sft.jsonl", tmp_path / "sft",
                    SFTConfig(max_steps=2, per_device_train_batch_size=4, save_steps=100))
    after, _ = models.load(out)
    assert vision_parameters(model)
    for a, b in zip(vision_parameters(model), vision_parameters(after)):
        assert torch.equal(a, b)
    assert not torch.equal(model.lm_head.weight, after.lm_head.weight)


def test_lora_trains_and_merges(tiny_model_dir, suite_dir, tmp_path):
    init = tiny_model_dir("llava")
    out = train_sft(init, suite_dir / "data" / "sft.jsonl", tmp_path / "lora",
                    SFTConfig(max_steps=3, per_device_train_batch_size=4, lora=True,
                              learning_rate=1e-2, save_steps=100))
    assert not (out / "adapter_config.json").exists()
    before, _ = models.load(init)
    after, _ = models.load(out)
    changed = {n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
               if not torch.equal(a, b)}
    assert changed and all("language_model" in n for n in changed)
    assert any("q_proj" in n for n in changed)


def test_resume_restores_the_checkpoint_weights(tiny_model_dir, suite_dir, tmp_path):
    """The Trainer's own loader skips Llava's legacy key names with a warning, so a resumed run
    would go on from the initial weights; ours must load exactly the checkpoint's."""
    cfg = SFTConfig(max_steps=3, per_device_train_batch_size=4, save_steps=3, learning_rate=1e-2)
    out = train_sft(tiny_model_dir("llava"), suite_dir / "data" / "sft.jsonl", tmp_path / "sft", cfg)
    model, _ = models.load(tiny_model_dir("llava"))
    trainer = ResumableTrainer(model=model, args=training_arguments(cfg, tmp_path / "unused"))
    trainer._load_from_checkpoint(str(tmp_path / "sft-checkpoints" / "checkpoint-3"))
    trained = models.load(out)[0].state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_resume_reaches_the_weights_of_an_uninterrupted_run(tiny_model_dir, suite_dir, tmp_path,
                                                            monkeypatch):
    cfg = SFTConfig(max_steps=6, per_device_train_batch_size=4, save_steps=3, learning_rate=1e-2,
                    warmup_steps=0)
    init, data = tiny_model_dir("llava"), suite_dir / "data" / "sft.jsonl"
    whole = train_sft(init, data, tmp_path / "whole", cfg)
    real = ResumableTrainer.training_step

    def dies_at_step_four(self, *args, **kwargs):
        if self.state.global_step == 4:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ResumableTrainer, "training_step", dies_at_step_four)
    with pytest.raises(KeyboardInterrupt):
        train_sft(init, data, tmp_path / "resumed", cfg)
    monkeypatch.setattr(ResumableTrainer, "training_step", real)
    resumed = train_sft(init, data, tmp_path / "resumed", cfg)
    assert json.loads((resumed / "chainstep.json").read_text())["resumed_from"].endswith("checkpoint-3")
    a, b = models.load(whole)[0].state_dict(), models.load(resumed)[0].state_dict()
    moved = models.load(init)[0].state_dict()
    assert any(not torch.equal(a[k], moved[k]) for k in a)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.slow
def test_resume_after_kill(tiny_model_dir, suite_dir, tmp_path):
    """kill -9 mid-training, re-run the same command: it resumes from the last checkpoint."""
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "chainstep", "sft", str(tiny_model_dir("llava")),
           str(suite_dir / "data" / "sft.jsonl"), "--out", str(out), "--set", "max_steps=400",
           "--set", "save_steps=2", "--set", "per_device_train_batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "sft-checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and not list(checkpoints.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.5)
    time.sleep(1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "chainstep.json").exists()
    # a kill during a save can leave a newer partial folder: resuming must skip it
    from chainstep.training import last_complete_checkpoint

    saved = last_complete_checkpoint(checkpoints)
    assert saved
    step = int(saved.rsplit("-", 1)[1])
    cmd[cmd.index("max_steps=400")] = f"max_steps={step + 2}"
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["resumed_from"] and meta["resumed_from"].endswith(f"checkpoint-{step}")
    models.load(out)


def test_partial_checkpoint_is_skipped(tmp_path):
    from chainstep.training import last_complete_checkpoint

    assert last_complete_checkpoint(tmp_path) is None
    for step, state in ((4, "{}"), (6, None), (8, "")):  # 8: killed while writing its state
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path).endswith("checkpoint-4")


def test_truncation_cuts_the_response_never_the_image_tokens(tiny_model_dir, suite_dir):
    from chainstep.errors import ChainstepError
    from chainstep.inputs import encode_example, encode_prompt

    _, processor = models.load(tiny_model_dir("llava_next"))
    row = read_jsonl(suite_dir / "data" / "sft.jsonl")[0]
    prompt = encode_prompt(processor, row)["input_ids"]
    example = encode_example(processor, row, row["response"], max_length=len(prompt) + 3)
    assert torch.equal(example["input_ids"][:len(prompt)], prompt)  # every image token kept
    assert int((example["labels"] != -100).sum()) == 3
    with pytest.raises(ChainstepError, match=r"prompt alone is \d+ tokens"):
        encode_example(processor, row, row["response"], max_length=len(prompt) - 5)
