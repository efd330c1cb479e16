import json
import random
import re

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from chainstep import models
from chainstep.config import SFTConfig
from chainstep.inputs import SFTCollator
from chainstep.pretrain import (
    CAPTION_SUMS,
    PretrainConfig,
    SceneCollator,
    caption_row,
    draw,
    perception_parameters,
    pretrain,
    token_colours,
)
from chainstep.synthetic import COLOURS, FAMILIES, ORDER, SIZES, SuiteConfig, readings
from chainstep.training import prepare_model

SMALL = dict(images=256, batch_size=32, learning_rate=3e-3, warmup_steps=0, save_steps=4, held_out=64,
             captions=0)
READING = {**SMALL, "captions": 256, "caption_batch_size": 16, "caption_learning_rate": 3e-3}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAINSTEP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_readings_are_the_scene_values():
    suite = SuiteConfig()
    for family, make in FAMILIES.items():
        scene = make(random.Random(3), suite)
        facts = scene.facts
        truth = (facts.get("counts") or facts.get("bars") or facts.get("lengths")
                 or {o["colour"]: SIZES[o["size"]] for o in facts["objects"]})
        assert readings(scene.steps) == truth, family


def test_targets_follow_the_scene():
    suite = SuiteConfig()
    item = draw(5, suite, seed=0)
    again = draw(5, suite, seed=0)
    assert item["image"].tobytes() == again["image"].tobytes() and item["readings"] == again["readings"]
    assert draw(5, suite, seed=1)["image"].tobytes() != item["image"].tobytes()
    assert item["family"] == 5 % len(suite.families)
    # a red block over the top-left 2x2 cells of an 8x8 grid, the rest white
    image = Image.new("RGB", (96, 96), (255, 255, 255))
    image.paste(COLOURS["red"], (1, 1, 22, 22))
    image.paste(COLOURS["blue"], (60, 84, 72, 96))
    cells = token_colours(image, 8).view(8, 8)
    assert cells[:2, :2].eq(ORDER.index("red") + 1).all()
    assert cells[7, 5] == ORDER.index("blue") + 1
    assert cells.ne(0).sum() == 5


def test_caption_states_the_readings_then_sums_of_them():
    row = caption_row(1, SuiteConfig(), seed=0)  # bar_chart: four bars
    assert row["family"] == "bar_chart" and row["question"] == "Read the image."
    read = dict(re.findall(r"(\w+) bar: (\d+)\.", row["response"]))
    assert list(read) == ["Red", "Green", "Blue", "Yellow"]
    sums = re.findall(r"(\w+) (plus|minus) (\w+): (\d+) ([+-]) (\d+) = (\d+)\.", row["response"])
    assert len(sums) == CAPTION_SUMS
    for a, word, b, x, sign, y, result in sums:
        assert (x, y) == (read[a], read[b.capitalize()]) and (word == "plus") == (sign == "+")
        assert int(result) == (int(x) + int(y) if sign == "+" else int(x) - int(y)) >= 0
    assert caption_row(1, SuiteConfig(), seed=0) == {**row, "image": row["image"]}
    assert draw(1, SuiteConfig(), seed=0)["image"].tobytes() != row["image"].tobytes()
    sizes = caption_row(2, SuiteConfig(), seed=0)["response"]  # attribute_mc: sizes, nothing to add
    assert sizes.count("shape: ") == 3 and "=" not in sizes


def test_caption_sums_add_as_many_groups_as_the_suite_does():
    suite = SuiteConfig(operands=3)
    response = caption_row(1, suite, seed=0)["response"]  # bar_chart: four bars
    read = {k.lower(): int(v) for k, v in re.findall(r"(\w+) bar: (\d+)\.", response)}
    sums = re.findall(r"(\w+) plus (\w+) plus (\w+): (\d+) \+ (\d+) \+ (\d+) = (\d+)\.", response)
    differences = re.findall(r"\w+ minus \w+: \d+ - \d+ = \d+\.", response)
    assert sums and len(sums) + len(differences) == CAPTION_SUMS
    assert " plus " not in re.sub(r"(\w+ plus ){2}\w+:", "", response)  # no two-group sum left
    for *names, x, y, z, total in sums:
        assert [read[n.lower()] for n in names] == [int(x), int(y), int(z)]
        assert int(total) == int(x) + int(y) + int(z)


def test_pretrain_teaches_the_tower_and_freezes_it_for_sft(tiny_model_dir, tmp_path, cache):
    init = tiny_model_dir("llava")
    info = pretrain(init, tmp_path / "pre", cfg=PretrainConfig(**SMALL))
    assert info["cache"] == "miss" and info["loss_last"] < info["loss_first"]
    before, _ = models.load(init)
    after, _ = models.load(tmp_path / "pre")
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before.state_dict()[n])}
    assert changed and changed <= set(perception_parameters(after))
    assert any("multi_modal_projector" in n for n in changed)  # the projector learns too
    assert json.loads((tmp_path / "pre" / "chainstep.json").read_text())["vision_pretrained"]
    model, _ = prepare_model(tmp_path / "pre", SFTConfig())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all("vision_tower" in n for n in frozen)


def test_reading_trains_the_language_model_and_leaves_the_tower(tiny_model_dir, tmp_path, cache):
    init = tiny_model_dir("llava")
    pretrain(init, tmp_path / "seeing", cfg=PretrainConfig(**SMALL))
    info = pretrain(init, tmp_path / "reading", cfg=PretrainConfig(**READING))
    reading = info["reading"]
    assert reading["steps"] == 16 and reading["loss_last"] < reading["loss_first"]
    assert set(reading["held_out_captions_right"]) == set(SuiteConfig().families)
    seeing, _ = models.load(tmp_path / "seeing")
    after, _ = models.load(tmp_path / "reading")
    before = seeing.state_dict()
    changed = {n for n, p in after.named_parameters() if not torch.equal(p, before[n])}
    assert any("language_model" in n for n in changed)
    assert not any("vision_tower" in n for n in changed)  # phase 2 reads the tower phase 1 made
    again = pretrain(init, tmp_path / "again", cfg=PretrainConfig(**READING))
    assert again["cache"] == "hit"
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in ("reading", "again"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cache_hit_loads_the_same_tower(tiny_model_dir, tmp_path, cache):
    init = tiny_model_dir("llava")
    first = pretrain(init, tmp_path / "a", cfg=PretrainConfig(**SMALL))
    second = pretrain(init, tmp_path / "b", cfg=PretrainConfig(**SMALL))
    assert (first["cache"], second["cache"]) == ("miss", "hit")
    assert first["cache_key"] == second["cache_key"]
    a, b = (load_file(tmp_path / d / "model.safetensors") for d in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another config is another entry
    third = pretrain(init, tmp_path / "c", cfg=PretrainConfig(**{**SMALL, "learning_rate": 1e-3}))
    assert third["cache"] == "miss" and third["cache_key"] != first["cache_key"]
    assert len([p for p in (cache / "pretrain").iterdir() if p.is_dir()]) == 2  # entries, not locks


@pytest.mark.parametrize("collator", [SceneCollator, SFTCollator], ids=["seeing", "reading"])
def test_resume_after_a_kill_reaches_the_same_model(collator, tiny_model_dir, tmp_path, cache,
                                                     monkeypatch):
    init = tiny_model_dir("llava")
    cfg = PretrainConfig(**READING, cache=False)
    whole = pretrain(init, tmp_path / "whole", cfg=cfg)
    calls = {"n": 0}
    real = collator.__call__

    def dies_at_step_six(self, items):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(self, items)

    monkeypatch.setattr(collator, "__call__", dies_at_step_six)
    with pytest.raises(KeyboardInterrupt):
        pretrain(init, tmp_path / "resumed", cfg=cfg)
    left = tmp_path / "resumed-checkpoints" / ("reading" if collator is SFTCollator else "")
    assert (left / "checkpoint-4").exists()
    monkeypatch.setattr(collator, "__call__", real)
    resumed = pretrain(init, tmp_path / "resumed", cfg=cfg)
    assert resumed["cache_key"] == whole["cache_key"]
    assert not (tmp_path / "resumed-checkpoints").exists()
    a = load_file(tmp_path / "whole" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
