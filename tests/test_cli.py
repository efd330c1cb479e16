import pytest
from typer.testing import CliRunner

from chainstep.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["tasks"], ["tasks", "make"], ["tasks", "show"],
                                     ["build-model"], ["add-tokens"], ["construct"], ["sft"],
                                     ["eval"], ["report"], ["sample"], ["label"], ["prm"],
                                     ["prm", "train"], ["prm", "eval"], ["serve"], ["export"],
                                     ["pretrain"], ["dpo"], ["dpo", "run"], ["dpo", "train"], ["grpo"]])
def test_help_everywhere(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def _options(command) -> list:
    import typer.main

    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    return [p for p in group.params if p.param_type_name == "option"]


@pytest.mark.parametrize("command", [["build-model"], ["construct"], ["eval"], ["sample"], ["serve"],
                                     ["pretrain"], ["sft"], ["label"], ["grpo"], ["dpo", "run"]])
def test_every_option_says_what_it_does(command):
    undocumented = [p.name for p in _options(command) if not p.help]
    assert undocumented == []


def test_one_line_errors_for_common_mistakes(tmp_path):
    import subprocess
    import sys

    def fails(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "chainstep", *args], capture_output=True, text=True)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        return " ".join(result.stderr.split())

    assert "has no metrics.json" in fails("report", str(tmp_path))
    assert "write FIELD=COLUMN pairs" in fails("construct", str(tmp_path / "x.json"), "--columns", "question")
    assert "'sft.max_steps': 'abc' is not a valid int" in fails("run", "--set", "sft.max_steps=abc")
    assert "reads the 'sft' section" in fails("sft", "m", "d", "--out", "o", "--set", "dpo.beta=0.1")
    for command in (["eval", "m", "t"], ["sft", "m", "d", "--out", "o"]):
        assert "style 'plain': choose one of cos, cot, direct" in fails(*command, "--style", "plain")
    searched = fails("eval", "m", "t", "--style", "cot", "--strategy", "bon", "--n", "4", "--prm", "judge")
    assert "a cot policy is evaluated with greedy" in searched


def test_stage_commands_take_section_keys_with_or_without_the_prefix():
    from chainstep.config import SFTConfig, section_config

    assert section_config(SFTConfig, ["sft.max_steps=5"], "sft").max_steps == 5
    assert section_config(SFTConfig, ["max_steps=7", "learning_rate=2e-4"], "sft").learning_rate == 2e-4


def test_tasks_make_and_show(tmp_path):
    result = runner.invoke(app, ["tasks", "make", "--out", str(tmp_path), "--train", "5",
                                 "--val", "0", "--test", "5"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "images" / "count_sum-test-00000.png").exists()
    result = runner.invoke(app, ["tasks", "show", "count_sum-test-00000", "--tasks", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "<|reasoning_start|>" in result.output and "count_sum" in result.output


def test_user_errors_have_no_traceback(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "chainstep", "tasks", "make", "--out",
                             str(tmp_path), "--terms", "7"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "error:" in result.stderr and "terms=7 must be 2 or 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_strategies_need_what_they_use(sft_model_dir, suite_dir, tmp_path):
    tasks = suite_dir / "tasks" / "test.jsonl"
    result = runner.invoke(app, ["eval", str(sft_model_dir), str(tasks), "--out", str(tmp_path),
                                 "--strategy", "bon", "--n", "2"])
    assert result.exit_code == 1 and "needs a PRM (--prm DIR)" in str(result.exception)
    result = runner.invoke(app, ["label", str(tmp_path / "s.jsonl"), str(tasks), "--out",
                                 str(tmp_path / "l.jsonl")])
    assert result.exit_code == 1 and "need --policy" in str(result.exception)


def test_eval_with_the_oracle_judge_as_verifier(sft_model_dir, suite_dir, tmp_path):
    import json

    tasks = suite_dir / "tasks" / "test.jsonl"
    base = ["eval", str(sft_model_dir), str(tasks), "--out", str(tmp_path), "--strategy", "beam",
            "--n", "2", "--max-tokens", "160", "--limit", "4"]
    result = runner.invoke(app, [*base, "--prm", "judge:0.1"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "metrics.json").read_text())["results"][0]
    assert (row["strategy"], row["num_questions"], row["prm_forward_passes"]) == ("beam", 4, 0)
    assert row["prm_chains"] >= 8
    result = runner.invoke(app, [*base, "--prm", "judge:lots"])
    assert result.exit_code == 1 and "judge:FLIP" in str(result.exception)


def test_eval_with_a_prm_writes_a_search_row(sft_model_dir, suite_dir, tmp_path):
    import json

    tasks = suite_dir / "tasks" / "test.jsonl"
    result = runner.invoke(app, ["eval", str(sft_model_dir), str(tasks), "--out", str(tmp_path),
                                 "--strategy", "weighted", "--n", "2", "--prm", str(sft_model_dir),
                                 "--max-tokens", "160", "--name", "m"])
    assert result.exit_code == 0, result.output
    row = json.loads((tmp_path / "metrics.json").read_text())["results"][0]
    assert (row["model"], row["strategy"], row["n"], row["num_questions"]) == ("m", "weighted", 2, 10)
    assert row["prm_chains"] == 20 and row["tokens_generated"] > 0


def test_sampling_commands_pass_their_batch_size(tmp_path, monkeypatch):
    """Sampled draws depend on the batch: `dpo run` and `grpo` must sample at the one asked for,
    as `chainstep run` does at eval.batch_size."""
    import json

    import chainstep.dpo
    import chainstep.grpo

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "q1", "image": "", "question": "?", "options": None, "answer": "1",
                                 "source": "synthetic", "meta": {}}) + "\n")
    seen = {}
    monkeypatch.setattr(chainstep.dpo, "iterative_dpo",
                        lambda *args: seen.setdefault("dpo", args[-1]) and {})
    monkeypatch.setattr(chainstep.grpo, "train_grpo",
                        lambda *args, style: seen.setdefault("grpo", args[-1]))
    for command in (["dpo", "run", "m", str(tasks), "--out", str(tmp_path / "d")],
                    ["grpo", "m", str(tasks), "--out", str(tmp_path / "g"), "--set", "reward=outcome"]):
        result = runner.invoke(app, [*command, "--batch-size", "128"])
        assert result.exit_code == 0, result.output
    assert seen == {"dpo": 128, "grpo": 128}
