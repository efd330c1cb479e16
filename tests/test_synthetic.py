import io
import random

import pytest
from PIL import Image

from chainstep.answers import normalize
from chainstep.errors import ChainstepError
from chainstep.records import read_jsonl
from chainstep.synthetic import (
    COLOURS,
    FAMILIES,
    IMAGE_SIZE,
    PATCH,
    SPLITS,
    UNIT,
    SuiteConfig,
    fingerprint,
    generate,
    make_tasks,
    readings,
    record_seed,
)


def _all(cfg, split):
    return list(generate(cfg, split))


def test_generation_is_deterministic():
    cfg = SuiteConfig(train=10, val=0, test=0)
    first, second = _all(cfg, "train"), _all(cfg, "train")
    assert [r for r, _ in first] == [r for r, _ in second]
    assert [png for _, png in first] == [png for _, png in second]


def test_different_seed_gives_different_images():
    a = _all(SuiteConfig(train=5, seed=0), "train")
    b = _all(SuiteConfig(train=5, seed=1), "train")
    assert [p for _, p in a] != [p for _, p in b]


def test_splits_never_share_a_seed():
    seeds = {s: {record_seed(0, s, f, i) for f in FAMILIES for i in range(1000)} for s in SPLITS}
    assert not seeds["train"] & seeds["val"]
    assert not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]


def test_written_splits_share_no_image_question(tmp_path):
    counts = make_tasks(SuiteConfig(train=200, val=50, test=50, max_objects=4, terms=2), tmp_path)
    prints = {}
    for split in SPLITS:
        records = read_jsonl(tmp_path / f"{split}.jsonl")
        assert len(records) == counts[split]["records"]
        prints[split] = {fingerprint(r, (tmp_path / r["image"]).read_bytes()) for r in records}
        assert len(prints[split]) == len(records)
    assert not prints["train"] & prints["test"]
    assert not prints["train"] & prints["val"]
    assert not prints["val"] & prints["test"]


def test_make_tasks_resumes_without_duplicates(tmp_path):
    cfg = SuiteConfig(train=10, val=5, test=5)
    make_tasks(cfg, tmp_path)
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])
    make_tasks(cfg, tmp_path)
    ids = [r["id"] for r in read_jsonl(tmp_path / "train.jsonl")]
    assert len(ids) == len(set(ids)) == 10


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("terms", [2, 3])
def test_family_steps_lead_to_the_answer(family, terms):
    cfg = SuiteConfig(terms=terms)
    for seed in range(30):
        scene = FAMILIES[family](random.Random(seed), cfg)
        assert 2 <= len(scene.steps) <= 5
        assert all(s["name"] and s["key"] and s["value"] for s in scene.steps)
        last = scene.steps[-1]["value"]
        if scene.options:
            assert scene.answer in "ABCD"
            assert len(scene.options) == len(set(scene.options))
            assert scene.answer in last or scene.options["ABCD".index(scene.answer)] in last
        else:
            assert last.endswith(f"= {scene.answer}")
            assert normalize(scene.answer) == scene.answer
        assert scene.image.size == (96, 96)


def test_both_numeric_and_letter_answers():
    records = [r for r, _ in _all(SuiteConfig(train=50), "train")]
    kinds = {r["meta"]["kind"] for r in records}
    assert kinds == {"numeric", "choice"}
    assert {r["meta"]["family"] for r in records} == set(FAMILIES)


def test_more_terms_means_more_steps():
    two = [len(r["meta"]["steps"]) for r, _ in _all(SuiteConfig(train=40, terms=2), "train")]
    three = [len(r["meta"]["steps"]) for r, _ in _all(SuiteConfig(train=40, terms=3), "train")]
    assert sum(three) > sum(two)


@pytest.mark.parametrize("family", ["count_sum", "bar_chart", "measure"])
def test_sums_add_as_many_groups_as_operands_says(family):
    for seed in range(40):
        two, three = (FAMILIES[family](random.Random(seed), SuiteConfig(operands=k)) for k in (2, 3))
        assert two.image.tobytes() == three.image.tobytes()  # the same scene, asked differently
        last = three.steps[-1]
        values = readings(three.steps)
        if last["name"] == "Subtract":
            assert (two.question, two.steps) == (three.question, three.steps)
            continue
        added = last["key"].lower().split(" plus ")
        assert len(added) == 3 and added == sorted(added, key=list(COLOURS).index)
        assert last["value"] == " + ".join(str(values[c]) for c in added) + f" = {three.answer}"
        assert f"{added[0]}, {added[1]} and {added[2]}" in three.question
        assert int(three.answer) == sum(values[c] for c in added)


def test_bad_config_is_rejected():
    with pytest.raises(ChainstepError, match="unknown task families"):
        SuiteConfig(families=("count_sum", "nope"))
    with pytest.raises(ChainstepError, match="terms"):
        SuiteConfig(terms=5)
    with pytest.raises(ChainstepError, match="operands=4 must be in 2..3"):
        SuiteConfig(terms=2, operands=4)


def _blocks_with(png: bytes, colour: str, span: int) -> int:
    """Blocks of span x span patches holding any pixel of the colour."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    side = PATCH * span
    return sum(
        any(image.getpixel((x, y)) == COLOURS[colour]
            for x in range(bx, bx + side) for y in range(by, by + side))
        for bx in range(0, IMAGE_SIZE, side) for by in range(0, IMAGE_SIZE, side))


@pytest.mark.parametrize("family", ["count_sum", "compare_mc"])
def test_each_counted_shape_fills_its_own_block(family):
    for record, png in _all(SuiteConfig(train=40, families=(family,)), "train"):
        for colour, count in record["meta"]["scene"]["counts"].items():
            assert _blocks_with(png, colour, UNIT) == count, record["id"]


def test_bar_and_line_units_are_read_in_blocks():
    for record, png in _all(SuiteConfig(train=20, families=("bar_chart", "measure")), "train"):
        scene = record["meta"]["scene"]
        values = scene.get("bars") or scene.get("lengths")
        for colour, value in values.items():  # a unit is UNIT patches: one patch row or column
            assert _blocks_with(png, colour, 1) == UNIT * value, record["id"]
