"""The whole path for every supported architecture: "any local HF VLM" as a tested claim."""

import pytest
import torch

from chainstep import models
from chainstep.config import SFTConfig
from chainstep.evaluate import predict, summarize
from chainstep.inputs import collate, encode_example
from chainstep.records import read_jsonl
from chainstep.sampling import Policy, SamplingParams
from chainstep.train_sft import train_sft


@pytest.mark.parametrize("arch", sorted(models.ARCHITECTURES))
def test_build_add_tokens_sft_generate_evaluate(arch, tiny_model_dir, suite_dir, test_records,
                                                tmp_path):
    model, processor = models.load(tiny_model_dir(arch, step_tokens=False))
    assert len(models.add_step_tokens(model, processor)) == 17
    models.save(model, processor, tmp_path / "init", meta={"from_scratch": True})
    out = train_sft(tmp_path / "init", suite_dir / "data" / "sft.jsonl", tmp_path / "sft",
                    SFTConfig(max_steps=60, per_device_train_batch_size=8, learning_rate=3e-3,
                              warmup_steps=2, save_steps=100))
    policy = Policy.from_dir(out, batch_size=4)
    preds = predict(policy, test_records[:4], tmp_path / "preds.jsonl",
                    params=SamplingParams(max_tokens=8))
    row = summarize(preds, arch)
    assert row["num_questions"] == 4
    assert all(p["tokens"] <= 8 for p in preds)
    assert row["parse_failure_rate"] == 1.0  # 8 tokens cannot hold a chain: scored wrong
    # the trained model has learned the chains it was shown: teacher-forced, it predicts a training
    # chain's tokens (~40% after 60 steps) where the model it started from predicts none
    row = read_jsonl(suite_dir / "data" / "sft.jsonl")[0]
    before, after = (_teacher_forced_accuracy(d, row) for d in (tmp_path / "init", out))
    assert after > 0.3 and after > before + 0.3, (before, after)


def _teacher_forced_accuracy(model_dir, row) -> float:
    model, processor = models.load(model_dir)
    batch = collate([encode_example(processor, row, row["response"])], processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")[0, 1:]
    with torch.no_grad():
        predicted = model(**batch).logits[0, :-1].argmax(-1)
    scored = labels.ne(-100)
    return float((predicted[scored] == labels[scored]).float().mean())
