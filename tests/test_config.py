import pytest

from chainstep.config import QUICK, dump_config, load_config, parse_overrides
from chainstep.errors import ChainstepError


def test_defaults_quick_and_overrides():
    cfg = load_config()
    assert cfg.sft.max_steps > QUICK["sft.max_steps"]
    quick = load_config(quick=True, overrides=parse_overrides(["sft.learning_rate=0.01",
                                                                "suite.families=[count_sum]"]))
    assert quick.suite.train == QUICK["suite.train"]
    assert quick.sft.learning_rate == 0.01
    assert quick.suite.families == ("count_sum",)


def test_yaml_round_trip(tmp_path):
    cfg = load_config(overrides={"model.arch": "qwen2_vl", "eval.splits": ["val", "test"]})
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ChainstepError, match="did you mean 'sft.max_steps'"):
        load_config(overrides={"sft.max_step": 3})
    with pytest.raises(ChainstepError, match="must look like"):
        parse_overrides(["sft.max_steps"])
    with pytest.raises(ChainstepError, match="must be positive"):
        load_config(overrides={"sft.max_steps": 0})


def test_shipped_config_matches_defaults():
    from pathlib import Path

    shipped = Path(__file__).resolve().parents[1] / "configs"
    assert load_config(shipped / "tiny.yaml") == load_config()


def test_the_gpu_profile_loads_with_a_verifier_larger_than_the_policy():
    from pathlib import Path

    from chainstep.models import SIZES

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml")
    width = {name: s.hidden * s.layers for name, s in SIZES.items()}
    assert cfg.prm.init == "larger" and width[cfg.prm.size] > width[cfg.model.size] > width["tiny"]
    assert max(cfg.search.ns) == 64 and cfg.dpo.samples == 16 and cfg.sft.bf16 and cfg.dpo.bf16


def test_overriding_one_key_keeps_the_section_defaults():
    cfg = load_config(quick=True, overrides={"base_sft.learning_rate": 0.002})
    assert cfg.base_sft.learning_rate == 0.002 != cfg.sft.learning_rate
    assert cfg.base_sft.max_steps == load_config(quick=True).base_sft.max_steps != cfg.sft.max_steps


def test_overrides_are_typed_up_front():
    cfg = load_config(overrides=parse_overrides(["sft.learning_rate=2e-4", "eval.splits=test",
                                                 "sft.freeze_vision=null", "pretrain.cache=false"]))
    assert cfg.sft.learning_rate == 2e-4 and isinstance(cfg.sft.learning_rate, float)
    assert cfg.eval.splits == ("test",)
    assert cfg.sft.freeze_vision is None and cfg.pretrain.cache is False
    with pytest.raises(ChainstepError, match=r"'sft.max_steps': 'abc' is not a valid int"):
        load_config(overrides=parse_overrides(["sft.max_steps=abc"]))
    with pytest.raises(ChainstepError, match=r"'eval.splits'.*tuple\[str, \.\.\.\]"):
        load_config(overrides={"eval.splits": [1, 2]})
    with pytest.raises(ChainstepError, match="'sft' is a section"):
        load_config(overrides={"sft": 5})


def test_config_files_are_typed_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  learning_rate: 1e-3\n  max_steps: many\n")
    with pytest.raises(ChainstepError, match="'sft.max_steps': 'many'"):
        load_config(path)
    path.write_text("sft:\n  learning_rate: 1e-3\n")
    assert load_config(path).sft.learning_rate == 1e-3


@pytest.mark.parametrize("module", ["chainstep.config", "chainstep.grading", "chainstep.scoring"])
def test_reading_a_config_or_grading_loads_no_trainer(module):
    import subprocess
    import sys

    code = (f"import sys, {module}; print(sorted(m for m in ('torch', 'trl', 'transformers', 'peft') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


def test_config_imports_no_stage_module():
    """Reading a config must not load the teacher, the scorers, the drawing or the server."""
    import subprocess
    import sys

    code = "import sys, chainstep.config; print(sorted(m for m in sys.modules if m.startswith('chainstep.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "['chainstep.config', 'chainstep.errors', 'chainstep.scoring']"


def test_the_suite_families_config_knows_are_the_families_synthetic_draws():
    from chainstep.config import SUITE_FAMILIES
    from chainstep.synthetic import FAMILIES

    assert tuple(FAMILIES) == SUITE_FAMILIES


def test_run_seed_moves_every_training_and_sampling_seed_but_not_the_suite():
    from chainstep.config import RunConfig

    assert RunConfig().seeded() == RunConfig()
    base, other = RunConfig(), RunConfig(seed=1).seeded()
    for name in RunConfig.SEEDED:
        assert getattr(other, name).seed != getattr(base, name).seed, name
    assert (other.suite, other.model, other.pretrain) == (base.suite, base.model, base.pretrain)
    assert len({RunConfig(seed=s).seeded().sft.seed for s in range(3)}) == 3


def test_the_study_config_adds_seeds_controls_and_ablations_to_the_harder_suite():
    from pathlib import Path

    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg, hard = load_config(configs / "study.yaml"), load_config(configs / "hard.yaml")
    default = load_config()
    assert hard.suite.operands == 3 and default.suite.operands == 2
    assert hard.dpo.questions > default.dpo.questions and hard.grpo.questions > default.grpo.questions
    assert (cfg.suite, cfg.sft, cfg.dpo.questions, cfg.grpo.max_steps) == \
        (hard.suite, hard.sft, hard.dpo.questions, hard.grpo.max_steps)
    assert cfg.seeds == 3 and hard.seeds == default.seeds == 1
    assert "random" in cfg.grpo.runs and set(hard.grpo.runs) < set(cfg.grpo.runs)
    assert cfg.dpo.ablation and not hard.dpo.ablation
    assert cfg.search.final_beam and not hard.search.final_beam


def test_an_old_chain_score_key_names_where_the_rule_lives_and_how_to_override_it():
    for key in ("dpo.step_weight", "grpo.step_weight"):
        with pytest.raises(ChainstepError, match=r"prm\.step_weight.*--step-weight"):
            load_config(overrides={key: 0.5})
