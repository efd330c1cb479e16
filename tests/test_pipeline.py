"""`chainstep run --quick` end to end, in process, as the README runs it."""

import json

import pytest
from typer.testing import CliRunner

from chainstep.cli import app
from chainstep.records import read_jsonl


@pytest.mark.slow
def test_quick_run_end_to_end_and_rerun_skips(tmp_path):
    out = tmp_path / "quick"
    rule = ["--set", "prm.aggregate=min", "--set", "prm.step_weight=0.4"]  # reaches every consumer
    study = ["--set", "dpo.rounds=3", "--set", "grpo.runs=[prm,outcome,prm-step]",  # study.yaml's rows
             "--set", "search.final_beam=true", "--set", "grpo.reasoning_modes=true"]
    result = CliRunner().invoke(app, ["run", "--quick", "--out", str(out), *rule, *study])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    rows = {(r["model"], r["split"]): r for r in metrics["results"] if r["split"] == "test"}
    improved = {"dpo-r1", "dpo-r2", "dpo-r3", "rft", "sft-continued", "dpo-r1-outcome", "dpo-r1-prm_answer",
                "grpo-prm", "grpo-outcome", "grpo-prm-step", "grpo-outcome-base", "grpo-outcome-cot"}
    trained = {m for m in improved if (out / "models" / m / "model.safetensors").exists()}
    assert {"dpo-r1", "rft", "sft-continued", "grpo-prm", "grpo-outcome", "grpo-outcome-base",
            "grpo-outcome-cot"} <= trained
    assert metrics["dpo"]["control"]["trained"]  # the RFT control of the last round that trained
    assert metrics["dpo"]["continued_sft"]["trained"]  # and the continued-SFT control of its steps
    left_out = set(metrics["left_out"])  # trained, but the no-op guard saw no weight change
    for name in left_out:
        assert not json.loads((out / "models" / name / "chainstep.json").read_text())["weights_changed"]
    assert set(rows) == {(m, "test") for m in {"sft", "base", "cot"} | (trained - left_out)}
    for row in rows.values():
        assert 0 <= row["ci_low"] <= row["accuracy"] <= row["ci_high"] <= 1
        assert row["num_questions"] == 30
    assert rows[("sft", "test")]["parse_failure_rate"] < 0.5
    assert rows[("sft", "test")]["avg_steps"] > 1
    assert metrics["comparisons"][0]["a"] == "sft"
    searched = {(r["strategy"], r["n"]) for r in metrics["results"]
                if r["split"] == "test[:6]" and r["model"] == "sft"}
    chosen = metrics["prm"]["verifier"]  # the best val ranking of the PRM, the checks and both
    assert json.loads((out / "models" / "prm" / "verifier.json").read_text())["verifier"] == chosen
    learned = ["learned"] if chosen == "learned PRM with checks" else []  # its control, same pass
    controls = {(f"{s}[{c}]", 4) for s in ("bon", "weighted") for c in ("checks", "judge", *learned)}
    assert searched == {(s, n) for s in ("pass", "sc", "bon", "weighted") for n in (1, 4)} | {
        ("beam", 2), ("greedy", 1)} | controls
    assert {(r["model"], r["strategy"]) for r in metrics["results"] if r["model"].startswith("dpo-r3")
            and r["split"] == "test[:6]"} == {("dpo-r3", "beam")}
    assert [s["pairs"] > 0 for s in metrics["dpo"]["rounds"].values()] == [True] * 3
    assert set(metrics["dpo"]["ablation"]) == {"dpo-r1-outcome"}
    claims = {(c["a"], c["b"]) for c in metrics["comparisons"]}
    wanted = {("dpo-r1", "sft"), ("grpo-prm", "grpo-outcome"), ("grpo-prm", "grpo-prm-step"),
              ("grpo-outcome-base", "base"), ("grpo-outcome-cot", "cot"), ("cot", "base"), ("sft", "cot")}
    assert {c for c in wanted if not set(c) & left_out} <= claims
    assert 0 <= metrics["prm"]["step_accuracy"] <= 1 and metrics["prm"]["chains"] > 0
    assert metrics["search"]["temperature"] == 1.0
    assert len(metrics["search"]["step_weight_ablation"]) == 6
    scoring = {"step_weight": 0.4, "aggregate": "min", "source": "verifier"}
    assert metrics["search"]["scoring"] == scoring
    assert all(s["scoring"] == {"pair_source": "prm", **scoring} for s in metrics["dpo"]["rounds"].values())
    assert metrics["dpo"]["ablation"]["dpo-r1-outcome"]["scoring"] == {"pair_source": "outcome"}
    grpo = {run: json.loads((out / "models" / f"grpo-{run}" / "chainstep.json").read_text())["scoring"]
            for run in ("prm", "prm-step", "outcome")}
    prm_reward = {"reward": "prm", **scoring}
    assert grpo == {"prm": prm_reward, "prm-step": prm_reward, "outcome": {"reward": "outcome"}}
    styles = {name: json.loads((out / "models" / name / "chainstep.json").read_text())["style"]
              for name in ("grpo-outcome", "grpo-outcome-base", "grpo-outcome-cot")}
    assert styles == {"grpo-outcome": "cos", "grpo-outcome-base": "direct", "grpo-outcome-cot": "cot"}
    assert read_jsonl(out / "data" / "cot.jsonl")[0]["response"].count("<|reasoning") == 0
    html = (out / "report.html").read_text()
    assert "Table 1" in html and "sft" in html and "base" in html
    assert "Process reward model" in html and "accuracy against N" in html
    assert "Iterative DPO" in html and "reasoning length per round" in html
    assert "Reasoning modes" in html and "plain reasoning" in html
    assert (out / "models" / "sft" / "model.safetensors").exists()
    assert (out / "config.yaml").exists()

    again = CliRunner().invoke(app, ["run", "--quick", "--out", str(out), *rule, *study])
    assert again.exit_code == 0, again.output
    assert again.output.count("done, skipping") == 17

    changed = CliRunner().invoke(app, ["run", "--quick", "--out", str(out), *rule, *study,
                                       "--set", "sft.max_steps=3"])
    assert changed.exit_code != 0


    moved = tmp_path / "elsewhere" / "quick"  # a run directory moved: reports, evaluates, resumes
    moved.parent.mkdir()
    out.rename(moved)
    meta = json.loads((moved / "models" / "dpo-r1" / "chainstep.json").read_text())
    assert meta["trained_from"] == "../sft" and meta["pairs"] == "../../data/dpo-r1-pairs.jsonl"
    resumed = CliRunner().invoke(app, ["run", "--quick", "--out", str(moved), *rule, *study])
    assert resumed.exit_code == 0 and resumed.output.count("done, skipping") == 17, resumed.output
    assert CliRunner().invoke(app, ["report", str(moved)]).exit_code == 0
    evaluated = CliRunner().invoke(app, ["eval", str(moved / "models" / "sft"),
                                         str(moved / "tasks" / "test.jsonl"), "--out", str(moved / "eval")])
    assert evaluated.exit_code == 0, evaluated.output  # the run's own predictions, reused


@pytest.mark.slow
def test_a_run_killed_mid_training_resumes_and_finishes(tmp_path):
    """kill -9 during CoS SFT, run the same command again: it resumes from the checkpoint and
    ends with every result row."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "quick"
    cmd = [sys.executable, "-m", "chainstep", "run", "--quick", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / "models" / "sft-checkpoints").glob(
            "checkpoint-*/trainer_state.json")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stages" / "sft.json").exists()  # killed inside the SFT stage
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_from = json.loads((out / "models" / "sft" / "chainstep.json").read_text())["resumed_from"]
    assert resumed_from.startswith("../sft-checkpoints/checkpoint-")  # relative to the model
    metrics = json.loads((out / "metrics.json").read_text())
    models = {r["model"] for r in metrics["results"] if r["split"] == "test"} | set(metrics["left_out"])
    assert {"sft", "base", "sft-continued", "grpo-prm", "grpo-outcome"} <= models
    assert len(list((out / "stages").glob("*.json"))) == 17


def test_a_larger_verifier_base_must_be_larger_and_built_for_tiny_models(tmp_path):
    from dataclasses import replace

    from chainstep.config import load_config
    from chainstep.errors import ChainstepError
    from chainstep.pipeline import Run, _larger_base

    cfg = load_config(None, quick=True)
    with pytest.raises(ChainstepError, match="prm.size=tiny must be a model size larger"):
        _larger_base(Run(replace(cfg, prm=replace(cfg.prm, size="tiny")), tmp_path))
    with pytest.raises(ChainstepError, match="model.path set"):
        _larger_base(Run(replace(cfg, model=replace(cfg.model, path="some/dir")), tmp_path))
