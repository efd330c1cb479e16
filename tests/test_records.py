import json

import pytest

from chainstep.errors import ChainstepError, RecordError
from chainstep.records import JsonlWriter, done_ids, load_image, load_tasks, prompt_text, read_jsonl


def test_bad_line_names_file_line_and_id(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(RecordError, match=r"x.jsonl:2: invalid JSON"):
        read_jsonl(path)
    path.write_text('{"id": "a", "question": "q"}\n{"id": "b"}\n')
    with pytest.raises(RecordError, match=r"x.jsonl:2 \(id b\): missing field"):
        read_jsonl(path, required=("id", "question"))


def test_truncated_last_line_is_dropped_and_repaired(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "val')
    with pytest.warns(UserWarning, match="truncated"):
        assert done_ids(path) == {"a", "b"}
    with JsonlWriter(path) as writer:
        writer.write({"id": "c"})
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]


def test_missing_file_and_image_errors(tmp_path):
    with pytest.raises(ChainstepError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ChainstepError, match="r1: image .* not found"):
        load_image({"id": "r1", "image": str(tmp_path / "missing.png")})
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ChainstepError, match="cannot read image"):
        load_image({"id": "r2", "image": str(tmp_path / "bad.png")})


def test_load_tasks_resolves_images_and_checks_options(tmp_path):
    record = {"id": "t", "image": "img/t.png", "question": "q", "options": None, "answer": "1",
              "source": "s", "meta": {}}
    (tmp_path / "t.jsonl").write_text(json.dumps(record) + "\n")
    assert load_tasks(tmp_path / "t.jsonl")[0]["image"] == str(tmp_path / "img/t.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({**record, "options": "A"}) + "\n")
    with pytest.raises(RecordError, match="options must be a list"):
        load_tasks(tmp_path / "t.jsonl")


def test_prompt_text_lists_options():
    assert prompt_text({"question": "Which?", "options": ["red", "blue"]}) == \
        "Which? Options: (A) red (B) blue"
    assert prompt_text({"question": "How many?", "options": None}) == "How many?"


def test_run_data_works_from_another_directory(tmp_path, monkeypatch):
    from chainstep.construct import construct
    from chainstep.synthetic import SuiteConfig, make_tasks
    from chainstep.teacher import ProgrammaticTeacher

    monkeypatch.chdir(tmp_path)
    make_tasks(SuiteConfig(train=3, val=1, test=1), "run/tasks")
    construct("run/tasks/train.jsonl", "run/data", ProgrammaticTeacher())
    stored = json.loads((tmp_path / "run/data/sft.jsonl").read_text().splitlines()[0])["image"]
    assert stored == "../tasks/images/count_sum-train-00000.png"  # relative to the file
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for name in ("sft.jsonl", "direct.jsonl"):
        for row in read_jsonl(tmp_path / "run/data" / name):
            assert load_image(row).size == (96, 96)
    moved = tmp_path / "moved"
    (tmp_path / "run").rename(moved)
    assert load_image(read_jsonl(moved / "data/sft.jsonl")[0]).size == (96, 96)


def test_files_written_relative_to_the_working_directory_still_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run/tasks").mkdir(parents=True)
    (tmp_path / "run/tasks/a.png").write_bytes(b"x")
    (tmp_path / "run/data").mkdir()
    (tmp_path / "run/data/sft.jsonl").write_text('{"id": "a", "image": "run/tasks/a.png"}\n')
    assert read_jsonl(tmp_path / "run/data/sft.jsonl")[0]["image"] == "run/tasks/a.png"


def test_an_atomic_write_cut_midway_leaves_the_old_file(tmp_path, monkeypatch):
    import os

    from chainstep.records import write_json

    path = write_json(tmp_path / "metrics.json", {"done": 1})

    def killed(fd):
        raise KeyboardInterrupt  # what a kill between write and rename looks like to the writer

    monkeypatch.setattr(os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"done": 2, "more": list(range(1000))})
    assert json.loads(path.read_text()) == {"done": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
