import subprocess
import sys

import pytest
from typer.testing import CliRunner

from chainstep.cli import app
from chainstep.errors import ChainstepError
from chainstep.layout import RunLayout, relative_path

HOLD = "import sys, time; from chainstep.layout import RunLayout\nwith RunLayout(sys.argv[1]).lock():\n" \
       "    print('held', flush=True); time.sleep(60)"


def test_a_second_run_on_a_held_directory_refuses_in_one_line(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(app, ["run", "--quick", "--out", str(out)])
        assert result.exit_code == 1
        message = str(result.exception)
        assert "in use by another run" in message and f"pid {holder.pid}" in message and "\n" not in message
        assert not (out / "config.json").exists()  # refused before touching anything
    finally:
        holder.kill()
        holder.wait()
    with RunLayout(out).lock():  # the OS released the dead holder's lock
        with pytest.raises(ChainstepError, match="in use by another run"):
            with RunLayout(out).lock():
                pass


WRITING_COMMANDS = [
    ["construct", "{run}/tasks/train.jsonl", "--out", "{run}/data"],
    ["pretrain", "{run}/models/init", "--out", "{run}/models/pretrained2"],
    ["sft", "{run}/models/init", "{run}/data/sft.jsonl", "--out", "{run}/models/sft2"],
    ["eval", "{run}/models/sft", "{run}/tasks/test.jsonl", "--out", "{run}/eval"],
    ["sample", "{run}/models/sft", "{run}/tasks/train.jsonl", "--out", "{run}/data/s.jsonl"],
    ["label", "{run}/data/s.jsonl", "{run}/tasks/train.jsonl", "--out", "{run}/data/l.jsonl"],
    ["prm", "train", "{run}/models/sft", "{run}/data/prm_labels.jsonl", "--out", "{run}/models/prm2"],
    ["dpo", "run", "{run}/models/sft", "{run}/tasks/train.jsonl", "--out", "{run}"],
    ["dpo", "train", "{run}/models/sft", "{run}/data/p.jsonl", "{run}/tasks/train.jsonl", "--out",
     "{run}/models/d"],
    ["grpo", "{run}/models/sft", "{run}/tasks/train.jsonl", "--out", "{run}/models/g"],
    ["merge", "{run}/data/samples-train.jsonl", "--shards", "2"],
    ["report", "{run}"],
]


def test_the_busy_directory_test_covers_every_writing_command():
    from chainstep import cli

    locking = {fn.__name__ for fn in vars(cli).values() if hasattr(fn, "writes_into")}
    named = {"_".join(c[:2]) if c[0] in ("prm", "dpo") else c[0] for c in WRITING_COMMANDS}
    named = {"evaluate" if n == "eval" else n for n in named}
    assert locking and locking == named


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_every_writing_command_refuses_a_busy_run_directory(tmp_path, command):
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "config.yaml").write_text("{}")
    with RunLayout(out).lock():
        result = CliRunner().invoke(app, [part.format(run=out) for part in command])
    assert result.exit_code == 1
    message = str(result.exception)
    assert "in use by another run" in message and "\n" not in message


def test_writing_outside_a_run_directory_takes_no_lock(tmp_path):
    from chainstep.layout import run_root, writing_into

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("{}")
    with RunLayout(tmp_path / "run").lock():
        assert run_root(tmp_path / "run" / "eval" / "x.jsonl") == tmp_path / "run"
        assert run_root(tmp_path / "elsewhere") is None
        with writing_into(tmp_path / "elsewhere"):
            pass


def test_paths_are_recorded_relative_to_where_they_are_read(tmp_path):
    run = RunLayout(tmp_path / "run")
    assert run.relative(run.model("sft")) == "models/sft"
    assert relative_path(run.model("sft"), run.model("dpo-r1")) == "../sft"
    assert run.labels("train").name == "prm_labels.jsonl" and run.labels("val").name == "prm_labels-val.jsonl"
    assert run.round_file("dpo-r1", "stats").name == "dpo-r1-stats.json"
    assert run.predictions("sft", "val").name == "sft-val.jsonl"


def test_a_waiting_lock_waits_for_its_holder_then_goes_on(tmp_path):
    """The pretrain cache's lock: a second process waits for the first, it is not refused."""
    import threading
    import time

    from chainstep.layout import waiting_lock

    lock, got = tmp_path / "cache" / "entry.lock", threading.Event()

    def second():
        with waiting_lock(lock):
            got.set()

    with waiting_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        assert not got.is_set()  # held: the second holder waits
    thread.join(timeout=5)
    assert got.is_set()
