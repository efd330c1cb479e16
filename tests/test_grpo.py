"""GRPO rewards, step-level advantages, TRL's prompt encoding, and a real training step."""

import json

import pytest
import torch
from trl.data_utils import prepare_multimodal_messages

from chainstep.errors import ChainstepError
from chainstep.grpo import (
    FormatReward,
    GRPOConfig,
    OutcomeReward,
    PRMReward,
    prompt_dataset,
    step_advantages,
    train_grpo,
    variant,
)
from chainstep.inputs import encode_prompt
from chainstep.models import load
from chainstep.prm import PRM
from chainstep.scoring import ChainScore, StepScores
from chainstep.steps import Chain, Step, render


def _ids(tokenizer, text: str) -> list[int]:
    """A completion as TRL hands it over: the text, EOS, then padding-like junk after it."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] + ids[:3]


@pytest.fixture(scope="module")
def processor(sft_model_dir):
    return load(sft_model_dir)[1]


def test_outcome_and_format_rewards(processor, train_records):
    record = train_records[0]
    tok = processor.tokenizer
    right = render(Chain([Step("Read", "Value: 1", "ok")], record["answer"]))
    wrong = render(Chain([Step("Read", "Value: 1", "ok")], "no such answer"))
    completions = [_ids(tok, t) for t in (right, wrong, "not a chain")]
    kwargs = dict(prompts=[None] * 3, completions=[None] * 3, completion_ids=completions,
                  record_id=[record["id"]] * 3)
    by_id = {record["id"]: record}
    assert OutcomeReward("outcome", by_id, tok)(**kwargs) == [1.0, 0.0, 0.0]
    assert FormatReward("format", by_id, tok)(**kwargs) == [1.0, 1.0, 0.0]
    plain = f"Value: 1\nAnswer:\n<|answer_start|>{record['answer']}<|answer_end|>"
    kwargs["completion_ids"] = [_ids(tok, t) for t in (plain, right, "no answer")]
    assert OutcomeReward("outcome", by_id, tok, "cot")(**kwargs) == [1.0, 1.0, 0.0]  # the answer span counts
    assert OutcomeReward("outcome", by_id, tok)(**kwargs) == [0.0, 1.0, 0.0]  # a CoS policy must write steps


def test_a_policy_without_steps_has_no_prm_reward(sft_model_dir, train_records, tmp_path):
    with pytest.raises(ChainstepError, match="no step chain"):
        train_grpo(sft_model_dir, "checks", train_records[:2], tmp_path / "g", GRPOConfig(reward="prm"),
                   style="direct")


def test_prm_reward_is_the_chain_score_of_the_decoded_chain(sft_model_dir, processor, train_records):
    record = train_records[0]
    text = render(Chain([Step("Read", "Value: 1", "ok"), Step("Add", "1 + 1 = 2", "ok")], "2"))
    prm = PRM.from_dir(sft_model_dir, aggregate="min")
    reward = PRMReward("prm", {record["id"]: record}, processor.tokenizer, prm)
    got = reward(prompts=[None], completions=[None], completion_ids=[_ids(processor.tokenizer, text)],
                 record_id=[record["id"]])
    want = prm.score([record], [text])[0]
    assert len(reward.last[0].steps) == 2 and reward.last[0].answer is not None
    assert got[0] == pytest.approx(ChainScore(0.2, "min")(want), abs=1e-5)
    assert prm.scoring.source == "override"


def test_step_advantages_give_each_step_its_own_normalised_score():
    end = 9
    ids = torch.tensor([[1, 2, end, 3, end, 4, 5], [1, end, 6, 0, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]])
    scores = [StepScores([0.9, 0.1], 0.5), StepScores([0.3], None)]
    adv = step_advantages(scores, ids, mask, end, group=2)
    pooled = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.3])  # a chain without an answer tag reuses its last step
    mean, std = pooled.mean(), pooled.std(unbiased=False)
    norm = [(v - mean) / (std + 1e-4) for v in (0.9, 0.1, 0.5, 0.3)]
    want0 = [norm[0]] * 3 + [norm[1]] * 2 + [norm[2]] * 2  # a step owns its end marker
    assert torch.allclose(adv[0], torch.stack(want0))
    assert torch.allclose(adv[1, :3], torch.stack([norm[3]] * 3))
    assert adv[1, 3:].abs().sum() == 0  # padding gets no advantage
    assert adv[0, 0] > 0 > adv[0, 3]  # the good step is pushed up, the bad one down


def test_step_advantages_normalise_within_each_group_only():
    ids = torch.tensor([[1, 2]] * 4)
    mask = torch.ones_like(ids)
    scores = [StepScores([], 0.9), StepScores([], 0.1), StepScores([], 0.2), StepScores([], 0.2)]
    adv = step_advantages(scores, ids, mask, step_end_id=7, group=2)
    assert adv[0, 0] > 0 > adv[1, 0]
    assert adv[2:].abs().sum() == 0  # equal scores within a group carry no signal


def test_config_and_variants():
    assert variant(GRPOConfig(), "prm-step").advantages == "step"
    assert variant(GRPOConfig(), "outcome").reward == "outcome"
    with pytest.raises(ChainstepError, match="needs grpo.reward=prm"):
        GRPOConfig(reward="outcome", advantages="step")
    with pytest.raises(ChainstepError, match="multiple"):
        GRPOConfig(num_generations=3, per_device_train_batch_size=8)
    with pytest.raises(ChainstepError, match="grpo.runs"):
        GRPOConfig(runs=("judge",))


def test_trl_encodes_the_prompt_exactly_as_our_policy_does(processor, train_records):
    record = train_records[0]
    row = prompt_dataset([record])[0]
    messages = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    trl = processor.apply_chat_template(conversation=[messages], add_generation_prompt=True, tokenize=True,
                                        return_dict=True, return_tensors="pt")
    ours = encode_prompt(processor, record)
    assert trl["input_ids"][0].tolist() == ours["input_ids"].tolist()
    assert torch.equal(trl["pixel_values"], ours["pixel_values"])


@pytest.mark.parametrize("run", ["prm-step", "outcome"])
def test_one_grpo_step_trains_and_saves(run, sft_model_dir, train_records, tmp_path):
    cfg = variant(GRPOConfig(max_steps=1, num_generations=4, per_device_train_batch_size=8, max_tokens=48,
                             save_steps=100), run)
    out = train_grpo(sft_model_dir, sft_model_dir, train_records[:4], tmp_path / run, cfg, batch_size=16)
    meta = json.loads((out / "chainstep.json").read_text())
    assert meta["grpo"]["reward"] == cfg.reward and meta["grpo"]["advantages"] == cfg.advantages
    model, _ = load(out)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_step_advantages_reach_the_loss_and_move_the_weights(sft_model_dir, train_records, tmp_path,
                                                             monkeypatch):
    from chainstep.grpo import StepGRPOTrainer

    seen = []
    real = StepGRPOTrainer._compute_loss

    def spy(self, model, inputs):
        seen.append(inputs["advantages"].detach().clone())
        return real(self, model, inputs)

    monkeypatch.setattr(StepGRPOTrainer, "_compute_loss", spy)
    cfg = variant(GRPOConfig(max_steps=1, num_generations=4, per_device_train_batch_size=8, max_tokens=48,
                             save_steps=100, learning_rate=1e-2), "prm-step")
    out = train_grpo(sft_model_dir, sft_model_dir, train_records[:4], tmp_path / "step", cfg, batch_size=16)
    assert seen and all(a.dim() == 2 for a in seen)  # per token, not one per completion
    assert any(a.abs().sum() > 0 for a in seen)
    before, after = load(sft_model_dir)[0].state_dict(), load(out)[0].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
