"""GRPO with a PRM reward (TRL's GRPOTrainer), an outcome-reward baseline, and step-level
advantages.

TRL gives one scalar per completion. With `advantages="step"` each step's tokens instead get
the group-normalised PRM score of that step (the answer's tokens the answer score), the process
supervision of the GRPO paper: a wrong step is pushed down even inside a chain that ended right.

    chainstep grpo runs/x/models/sft runs/x/tasks/train.jsonl --prm runs/x/models/prm \\
        --out runs/x/models/grpo-prm --set reward=prm
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, replace
from pathlib import Path

import torch
from datasets import Dataset
from transformers import set_seed
from trl import GRPOConfig as TRLGRPOConfig
from trl import GRPOTrainer

from .config import GRPOConfig, check_style
from .errors import ChainstepError
from .grading import grade_response
from .layout import checkpoints_of
from .records import load_image, prompt_text
from .sampling import decode_response, foreign_token_ids
from .scoring import StepScores, finished, score_responses
from .steps import STEP_END
from .training import ResumeWeights, fit, prepare_model, training_kwargs
from .verifier import Verifier, load_verifier


class Reward:
    """A GRPO reward function over TRL's keyword arguments; completions are decoded from their
    ids with the step markers kept (TRL's own text drops special tokens)."""

    def __init__(self, name: str, records: dict[str, dict], tokenizer, style: str = "cos"):
        self.__name__, self.records, self.tokenizer, self.style = name, records, tokenizer, style

    def __call__(self, prompts, completions, completion_ids, record_id, **kwargs) -> list[float]:
        texts = [decode_response(self.tokenizer, list(ids)) for ids in completion_ids]
        return self.rewards([self.records[i] for i in record_id], texts)

    def rewards(self, records: list[dict], texts: list[str]) -> list[float]:
        raise NotImplementedError


class RandomReward(Reward):
    """A reward that knows nothing: uniform in [0, 1], drawn from the chain's text and the step
    (the same completion gets the same draw on a resumed run). GRPO on it takes the same steps at
    the same learning rate: what it changes is what any update does, with no signal."""

    def __init__(self, name, records, tokenizer, seed: int = 0):
        super().__init__(name, records, tokenizer)
        self.seed, self.calls = seed, 0

    def rewards(self, records, texts):
        self.calls += 1
        keys = [f"{self.seed}:{self.calls}:{r['id']}:{i}:{t}" for i, (r, t) in enumerate(zip(records, texts))]
        return [int.from_bytes(hashlib.sha256(k.encode()).digest()[:8], "big") / 2 ** 64 for k in keys]


class OutcomeReward(Reward):
    def rewards(self, records, texts):
        return [float(grade_response(t, r, self.style)["correct"]) for r, t in zip(records, texts)]


class FormatReward(Reward):
    def rewards(self, records, texts):
        return [float(grade_response(t, r, self.style)["parsed"]) for r, t in zip(records, texts)]


class PRMReward(Reward):
    """The PRM chain score under its `scoring` rule; the step scores of the last batch are kept
    for step advantages."""

    def __init__(self, name, records, tokenizer, prm: Verifier):
        super().__init__(name, records, tokenizer)
        self.prm = prm
        self.last: list[StepScores] = []

    def rewards(self, records, texts):
        self.last = [finished(s) for s in score_responses(self.prm, records, texts)]
        return [self.prm.scoring(s) for s in self.last]


def step_advantages(scores: list[StepScores], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
                    step_end_id: int, group: int) -> torch.Tensor:
    """[B, T] advantages: a token's is the score of its own step (a step owns its end marker;
    what follows the last step is scored by the answer tag), minus the mean over every step of
    its group, over their std."""
    ends = completion_ids.eq(step_end_id).long()
    segment = (ends.cumsum(1) - ends).tolist()
    values = [s.steps + [s.answer if s.answer is not None else (s.steps[-1] if s.steps else 0.0)]
              for s in scores]
    out = torch.zeros(completion_ids.shape, dtype=torch.float32)
    for start in range(0, len(scores), group):
        pooled = torch.tensor([v for vals in values[start:start + group] for v in vals])
        mean, std = pooled.mean(), pooled.std(unbiased=False)
        for i in range(start, min(start + group, len(scores))):
            per = torch.tensor(values[i])
            index = torch.tensor(segment[i]).clamp(max=len(per) - 1)
            out[i] = (per[index] - mean) / (std + 1e-4)
    return out.to(completion_mask.device) * completion_mask


class StepGRPOTrainer(ResumeWeights, GRPOTrainer):
    """GRPOTrainer whose advantages become per-token when a PRM reward is given for it."""

    def __init__(self, *args, step_reward: PRMReward | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.step_reward = step_reward
        self.step_end_id = self.processing_class.tokenizer.convert_tokens_to_ids(STEP_END)
        if step_reward is not None and self.accelerator.num_processes > 1:
            raise ChainstepError("step-level advantages need whole groups in one process; run on one")

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.step_reward is not None:
            ids, mask = out["completion_ids"], out["completion_mask"]
            out["advantages"] = step_advantages(self.step_reward.last, ids, mask, self.step_end_id,
                                                self.num_generations)
        return out


def variant(cfg: GRPOConfig, run: str) -> GRPOConfig:
    """The config of one `grpo.runs` entry ("prm", "outcome", "prm-step")."""
    return replace(cfg, reward=run.removesuffix("-step"),
                   advantages="step" if run.endswith("-step") else "chain")


def prompt_dataset(records: list[dict]) -> Dataset:
    """Chat prompts with their image, as GRPOTrainer reads them; `record_id` reaches the rewards."""
    return Dataset.from_list([{"prompt": [{"role": "user", "content": prompt_text(r)}],
                               "image": load_image(r), "record_id": r["id"]} for r in records])


def grpo_arguments(cfg: GRPOConfig, checkpoints: Path, tokenizer, rewards: int) -> TRLGRPOConfig:
    suppress = foreign_token_ids(tokenizer)
    return TRLGRPOConfig(
        **training_kwargs(cfg, checkpoints), num_generations=cfg.num_generations,
        max_completion_length=cfg.max_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
        beta=cfg.beta, gradient_checkpointing=False, log_completions=False,
        reward_weights=[1.0] + [cfg.format_weight] * (rewards - 1),
        generation_kwargs={"suppress_tokens": suppress} if suppress else None)


def train_grpo(model_dir: str | Path, prm_dir, records: list[dict],
               out_dir: str | Path, cfg: GRPOConfig | None = None, batch_size: int = 64,
               style: str = "cos") -> Path:
    """GRPO from `model_dir` on `records`' prompts; returns the saved model directory. `prm_dir`:
    a verifier, or what `load_verifier` reads (a PRM directory, `checks`, `judge`). `style`: how
    the start model answers (`cos` chains; `cot` or `direct` policies of the reasoning-mode
    ablation, rewarded by their outcome only)."""
    cfg = cfg or GRPOConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not records:
        raise ChainstepError("GRPO needs at least one training question")
    check_style(style)
    if style != "cos" and cfg.reward == "prm":
        raise ChainstepError(f"a {style} policy writes no step chain for a PRM to score: "
                             "use grpo.reward=outcome")
    set_seed(cfg.seed)
    # a short run still takes steps at a learning rate above 0, after its warm-up
    cfg = replace(cfg, warmup_steps=min(cfg.warmup_steps, cfg.max_steps // 2))
    model, processor = prepare_model(model_dir, cfg)
    by_id, tok = {r["id"]: r for r in records}, processor.tokenizer
    if cfg.reward == "prm":
        if prm_dir is None:
            raise ChainstepError("grpo.reward=prm needs a PRM (--prm DIR)")
        verifier = prm_dir if hasattr(prm_dir, "score") else load_verifier(prm_dir, batch_size=batch_size)
        main = PRMReward("prm", by_id, tok, verifier)
        scoring = {"reward": "prm", **main.prm.scoring.describe()}
    elif cfg.reward == "random":
        main, scoring = RandomReward("random", by_id, tok, cfg.seed), {"reward": "random"}
    else:
        main, scoring = OutcomeReward("outcome", by_id, tok, style), {"reward": "outcome"}
    funcs = [main] + ([FormatReward("format", by_id, tok, style)] if cfg.format_weight else [])
    checkpoints = checkpoints_of(out_dir)
    trainer = StepGRPOTrainer(
        model=model, reward_funcs=funcs, args=grpo_arguments(cfg, checkpoints, tok, len(funcs)),
        train_dataset=prompt_dataset(records), processing_class=processor,
        step_reward=main if cfg.advantages == "step" else None)
    fit(trainer, cfg, processor, model_dir, out_dir,
        {"grpo": asdict(cfg), "questions": len(records), "scoring": scoring, "style": style})
    return out_dir
