"""The whole path for every supported architecture: "any local HF VLM" as a tested claim."""

import pytest

from chainstep import models
from chainstep.evaluate import predict, summarize
from chainstep.sampling import Policy, SamplingParams
from chainstep.train_sft import SFTConfig, train_sft


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_build_add_tokens_sft_generate_evaluate(arch, tiny_model_dir, suite_dir, test_records,
                                                tmp_path):
    model, processor = models.load(tiny_model_dir(arch, step_tokens=False))
    assert len(models.add_step_tokens(model, processor)) == 17
    models.save(model, processor, tmp_path / "init", meta={"from_scratch": True})
    out = train_sft(tmp_path / "init", suite_dir / "data" / "sft.jsonl", tmp_path / "sft",
                    SFTConfig(max_steps=3, per_device_train_batch_size=4, save_steps=100))
    policy = Policy.from_dir(out, batch_size=4)
    preds = predict(policy, test_records[:4], tmp_path / "preds.jsonl",
                    params=SamplingParams(max_tokens=8))
    row = summarize(preds, arch)
    assert row["num_questions"] == 4
    assert all(p["tokens"] <= 8 for p in preds)
    assert row["parse_failure_rate"] == 1.0  # 8 tokens cannot hold a chain: scored wrong
    assert row["accuracy"] == 0.0
