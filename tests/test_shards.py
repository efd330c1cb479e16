import json

import pytest
from typer.testing import CliRunner

from chainstep.cli import app
from chainstep.errors import ChainstepError
from chainstep.records import read_jsonl
from chainstep.shards import Shard, mark_done, merge

runner = CliRunner()


def test_shards_are_disjoint_cover_everything_and_stay_put():
    records = [{"id": f"r{i}"} for i in range(200)]
    parts = [Shard(i, 4).select(records) for i in range(4)]
    ids = [r["id"] for part in parts for r in part]
    assert sorted(ids) == sorted(r["id"] for r in records) and len(set(ids)) == 200
    assert all(30 <= len(part) <= 70 for part in parts)  # balanced
    more = records + [{"id": f"new{i}"} for i in range(50)]
    for i, part in enumerate(parts):  # adding records moves none of the old ones
        assert [r for r in Shard(i, 4).select(more) if not r["id"].startswith("new")] == part
    with pytest.raises(ChainstepError, match="write I/N"):
        Shard.parse("4/4")
    assert Shard.parse("1/3").path("data/samples.jsonl").name == "samples.shard-1-of-3.jsonl"


def test_merged_shards_equal_one_unsharded_run(sft_model_dir, suite_dir, tmp_path):
    tasks = suite_dir / "tasks" / "test.jsonl"
    base = ["eval", str(sft_model_dir), str(tasks), "--max-tokens", "24", "--name", "sft"]
    whole = runner.invoke(app, [*base, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    for i in (2, 0, 1):  # out of order
        done = runner.invoke(app, [*base, "--out", str(tmp_path / "sharded"), "--shard", f"{i}/3"])
        assert done.exit_code == 0, done.output
    merged = merge(tmp_path / "sharded" / "sft-test.jsonl", 3)
    assert merged["records"] == 10
    assert (tmp_path / "sharded" / "sft-test.jsonl").read_text() == \
        (tmp_path / "whole" / "sft-test.jsonl").read_text()
    # the merged file resumes like an unsharded one: eval again for the metrics, nothing regenerated
    again = runner.invoke(app, [*base, "--out", str(tmp_path / "sharded")])
    assert again.exit_code == 0, again.output
    [row] = json.loads((tmp_path / "sharded" / "metrics.json").read_text())["results"]
    assert row["num_questions"] == 10


def test_a_killed_shard_resumes_without_duplicates(sft_model_dir, suite_dir, tmp_path):
    args = ["sample", str(sft_model_dir), str(suite_dir / "tasks" / "train.jsonl"), "--out",
            str(tmp_path / "samples.jsonl"), "--n", "2", "--max-tokens", "16", "--shard", "0/2"]
    assert runner.invoke(app, args).exit_code == 0
    part = tmp_path / "samples.shard-0-of-2.jsonl"
    full = part.read_text().splitlines()
    part.write_text("\n".join(full[:3]) + "\n" + full[3][:10])  # killed mid-write
    (tmp_path / "samples.shard-0-of-2.done.json").unlink()
    with pytest.raises(ChainstepError, match=r"shard 0/2 .* is incomplete"):
        merge(tmp_path / "samples.jsonl", 2)
    assert runner.invoke(app, args).exit_code == 0
    ids = [r["id"] for r in read_jsonl(part)]
    assert len(ids) == len(set(ids)) == len(full)


def test_merge_refuses_missing_and_duplicated_shards(tmp_path):
    records = [{"id": f"q{i}"} for i in range(6)]
    path = tmp_path / "x.jsonl"
    for i in range(2):
        shard = Shard(i, 2)
        mine = shard.select(records)
        shard.path(path).write_text("".join(json.dumps({"id": r["id"]}) + "\n" for r in mine))
        mark_done(shard.path(path), shard, mine, records)
    with pytest.raises(ChainstepError, match="shard 0/3 .* is incomplete"):
        merge(path, 3)
    other = Shard(1, 2).path(path)
    other.write_text(other.read_text() + Shard(0, 2).path(path).read_text().splitlines()[0] + "\n")
    with pytest.raises(ChainstepError, match="belongs to no record of shard 1/2"):
        merge(path, 2)
