"""Iterative DPO on PRM-scored pairs (the paper's policy-improvement stage).

Each round samples chains from the latest policy, scores them (PRM step+answer by default),
pairs the best and worst chains of a question when their score gap exceeds a threshold, and
trains with TRL's DPOTrainer (sigmoid loss plus an NLL term on the chosen chain). Every round
restarts both policy and reference from the SFT checkpoint; only the data comes from the
latest policy, so a bad round cannot compound.

    chainstep dpo run runs/x/models/sft runs/x/tasks/train.jsonl --prm runs/x/models/prm \\
        --out runs/x/dpo
    chainstep dpo train runs/x/models/sft pairs.jsonl runs/x/tasks/train.jsonl --out runs/x/models/dpo
    accelerate launch --multi_gpu --num_processes 2 -m chainstep dpo train ...   # DDP
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from transformers import ProcessorMixin, set_seed
from trl import DPOConfig as TRLDPOConfig
from trl import DPOTrainer

from .config import GROUND_TRUTH, DPOConfig
from .errors import ChainstepError
from .evaluate import sample_responses, sample_stats
from .inputs import collate, encode_example
from .judge import ProgrammaticJudge
from .layout import RunLayout, checkpoints_of, is_saved, relative_path
from .models import load
from .records import mean_of, read_jsonl, replace_jsonl, write_json
from .sampling import Policy, SamplingParams
from .scoring import ChainScore, finished, score_responses
from .steps import REASONING_START, STEP_END, parse
from .train_sft import fit_rows
from .training import ResumeWeights, fit, prepare_model, training_kwargs, weights_digest
from .verifier import Verifier, load_verifier

console = Console(stderr=True)


def sample_scores(rows: list[dict], records: list[dict], source: str, prm: Verifier | None) -> list[float]:
    """One score per sampled chain: the PRM chain score (its `scoring` rule), the PRM answer score
    alone, the ground-truth outcome (1 right, 0 wrong), or `verified`: 1 for a right answer reached by a
    chain the grader finds right in every step (the step-level ground truth; records without
    step facts fall back to the answer). Outcome counts a lucky guess as right: at T = 1 most
    right answers of the exact-value families come after a wrong step (docs/findings.md)."""
    if source == "outcome":
        return [float(r["correct"]) for r in rows]
    if source == "verified":
        return [float(r["correct"] and r.get("steps_right") is not False) for r in rows]
    if prm is None:
        raise ChainstepError(f"pair source {source!r} needs a PRM")
    by_id = {r["id"]: r for r in records}
    rule = _pair_rule(source, prm)
    scores = score_responses(prm, [by_id[r["question_id"]] for r in rows], [r["response"] for r in rows])
    return [rule(finished(s)) for s in scores]


def _pair_rule(source: str, prm: Verifier) -> ChainScore:
    """The verifier's rule (`prm`), or its answer tag alone (`prm_answer`)."""
    return prm.scoring if source == "prm" else prm.scoring.answer_only()


def build_pairs(rows: list[dict], scores: list[float], threshold: float,
                pairs_per_question: int = 1) -> list[dict]:
    """Per question, the i-th best well-formed chain against the i-th worst chain while their
    gap exceeds `threshold` (strictly) and they differ in text; ties keep sampling order. A
    chosen chain must parse: the NLL term on it would otherwise teach a broken format."""
    by_question: dict[str, list[tuple[float, dict]]] = {}
    for row, score in zip(rows, scores):
        by_question.setdefault(row["question_id"], []).append((score, row))
    pairs = []
    for qid, scored in by_question.items():
        ranked = sorted(range(len(scored)), key=lambda j: -scored[j][0])
        best = [j for j in ranked if scored[j][1].get("parsed", True)]
        for i in range(min(pairs_per_question, len(best))):
            top, bottom = best[i], ranked[-1 - i]
            if ranked.index(top) >= ranked.index(bottom):
                break
            (hi, chosen), (lo, rejected) = scored[top], scored[bottom]
            if hi - lo <= threshold or chosen["response"] == rejected["response"]:
                break
            pairs.append({"id": f"{qid}#p{i}", "question_id": qid, "chosen": chosen["response"],
                          "rejected": rejected["response"], "chosen_id": chosen["id"],
                          "rejected_id": rejected["id"], "chosen_score": hi, "rejected_score": lo,
                          "chosen_correct": chosen["correct"], "rejected_correct": rejected["correct"],
                          "chosen_steps_right": chosen.get("steps_right"),
                          "rejected_steps_right": rejected.get("steps_right"),
                          "chosen_tokens": chosen["tokens"], "rejected_tokens": rejected["tokens"]})
    return pairs


def pair_stats(pairs: list[dict], questions: int) -> dict:
    """What the log and report show about a round's pairs."""
    def mean(key):
        return mean_of(p.get(key) for p in pairs)

    return {"pairs": len(pairs), "questions": questions,
            "questions_with_pairs": len({p["question_id"] for p in pairs}),
            "mean_gap": (mean("chosen_score") - mean("rejected_score")) if pairs else None,
            "chosen_tokens": mean("chosen_tokens"), "rejected_tokens": mean("rejected_tokens"),
            "chosen_correct": mean("chosen_correct"), "rejected_correct": mean("rejected_correct"),
            "chosen_steps_right": mean("chosen_steps_right"),
            "rejected_steps_right": mean("rejected_steps_right")}


def pair_scoring(source: str, prm: Verifier | None) -> dict:
    """The rule a round ranked its chains by, for its stats."""
    if source in GROUND_TRUTH:
        return {"pair_source": source}
    return {"pair_source": source, **_pair_rule(source, prm).describe()}


def step_pairs(rows: list[dict], records: dict[str, dict], pairs_per_question: int = 2) -> list[dict]:
    """Step-level pairs: a wrong chain (a wrong answer, or a right one reached through a wrong
    step: the lucky guess outcome pairs reward), cut before its first wrong step (the answer,
    when every step is right), against a chain of the same question right in every step whose
    steps up to the cut say the same (name and thought; reflections may differ). The wrong
    chain's steps before the cut become part of the prompt (`prefix`); chosen is the right
    chain's text from that step on, rejected the wrong chain's. So the preference and its NLL
    term read only where the chains differ. Needs step facts (the synthetic suite)."""
    judge = ProgrammaticJudge()
    by_question: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("parsed"):
            by_question.setdefault(row["question_id"], []).append(row)
    pairs = []
    for qid, group in by_question.items():
        record = records[qid]
        if not record.get("meta", {}).get("steps"):
            continue
        right = [(r, parse(r["response"]).steps) for r in group if r["correct"] and r.get("steps_right")]
        found = 0
        for wrong in (r for r in group if not (r["correct"] and r.get("steps_right"))):
            chain = parse(wrong["response"])
            ratings = judge.rate(record, chain)
            first_bad = next((i for i, rating in enumerate(ratings) if rating == "bad"), len(chain.steps))
            match = next((r for r, steps in right if _shared_steps(steps, chain.steps) >= first_bad
                          and len(steps) >= first_bad), None)
            if match is None:
                continue
            cut = _step_boundary(wrong["response"], first_bad)
            chosen = match["response"][_step_boundary(match["response"], first_bad):]
            if chosen == wrong["response"][cut:]:
                continue
            pairs.append({"id": f"{qid}#s{found}", "question_id": qid, "prefix": wrong["response"][:cut],
                          "step": first_bad, "chosen": chosen, "rejected": wrong["response"][cut:],
                          "chosen_id": match["id"], "rejected_id": wrong["id"], "chosen_score": 1.0,
                          "rejected_score": 0.0, "chosen_correct": True, "rejected_correct": wrong["correct"],
                          "chosen_steps_right": True, "rejected_steps_right": wrong.get("steps_right"),
                          "chosen_tokens": match["tokens"], "rejected_tokens": wrong["tokens"]})
            found += 1
            if found == pairs_per_question:
                break
    return pairs


def _shared_steps(a, b) -> int:
    """How many leading steps two chains state alike (name and thought)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if (x.name, x.thought) != (y.name, y.thought)),
                min(len(a), len(b)))


def _step_boundary(text: str, steps: int) -> int:
    """Where the text of the first `steps` steps ends (after their step-end line)."""
    cut = text.index(REASONING_START) + len(REASONING_START) + 1
    for _ in range(steps):
        cut = text.index(STEP_END, cut) + len(STEP_END) + 1
    return cut


class PreferenceCollator:
    """[chosen..., rejected...] through the same encoder as SFT and generation, so the tokens
    DPO trains on are exactly those the policy produces; `completion_mask` marks the response,
    less the `prefix` the two sides share (step-level pairs), which reads as prompt."""

    def __init__(self, processor: ProcessorMixin, max_length: int | None = None):
        self.processor, self.max_length = processor, max_length
        self.examples_seen = 0

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        records = [json.loads(r["record"]) for r in rows]
        tok = self.processor.tokenizer
        examples = []
        for side in ("chosen", "rejected"):
            for record, row in zip(records, rows):
                prefix = row.get("prefix") or ""
                example = encode_example(self.processor, record, prefix + row[side], self.max_length)
                mask = example.pop("labels").ne(-100)
                if prefix:
                    start = int(mask.nonzero()[0])
                    mask[start:start + len(tok(prefix, add_special_tokens=False)["input_ids"])] = False
                example["completion_mask"] = mask.long()
                examples.append(example)
        batch = collate(examples, tok.pad_token_id)
        self.examples_seen += len(rows)
        return batch


class PreferenceTrainer(ResumeWeights, DPOTrainer):
    pass


def dpo_arguments(cfg: DPOConfig, checkpoints: Path) -> TRLDPOConfig:
    return TRLDPOConfig(**training_kwargs(cfg, checkpoints), beta=cfg.beta,
                        loss_type=["sigmoid", "sft"], loss_weights=[1.0, cfg.sft_weight],
                        max_length=None, gradient_checkpointing=False, precompute_ref_log_probs=False)


def train_dpo(model_dir: str | Path, pairs_path: str | Path, records: dict[str, dict],
              out_dir: str | Path, cfg: DPOConfig | None = None) -> Path:
    """DPO from `model_dir` (policy and reference both start there) on a pairs file."""
    cfg = cfg or DPOConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    set_seed(cfg.seed)
    pairs = read_pairs(pairs_path, records)
    rows = [{"image": records[p["question_id"]]["image"], "record": json.dumps(records[p["question_id"]]),
             "prefix": p.get("prefix", ""), "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    cfg = round_schedule(cfg, len(pairs))
    model, processor = prepare_model(model_dir, cfg)
    ref = None if cfg.lora else load(model_dir)[0]
    checkpoints = checkpoints_of(out_dir)
    collator = PreferenceCollator(processor, cfg.max_length)
    trainer = PreferenceTrainer(model=model, ref_model=ref, args=dpo_arguments(cfg, checkpoints),
                                data_collator=collator, train_dataset=Dataset.from_list(rows),
                                processing_class=processor)
    fit(trainer, cfg, processor, model_dir, out_dir,
        {"pairs": relative_path(pairs_path, out_dir), "num_pairs": len(pairs), "dpo": asdict(cfg),
         "world_size": trainer.args.world_size})
    _record_rank(checkpoints, trainer, collator)
    return out_dir


def round_schedule(cfg: DPOConfig, pairs: int) -> DPOConfig:
    """`epochs` passes over the pairs, at most `max_steps`; a short round still takes steps at a
    learning rate above 0 after its warm-up."""
    steps = math.ceil(cfg.epochs * pairs / (cfg.per_device_train_batch_size * _world_size()))
    steps = max(1, min(cfg.max_steps, steps))
    return replace(cfg, max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 2))


def read_pairs(pairs_path: str | Path, records: dict[str, dict]) -> list[dict]:
    pairs = read_jsonl(pairs_path, required=("id", "question_id", "chosen", "rejected"))
    if not pairs:
        raise ChainstepError(f"{pairs_path} holds no pairs; lower dpo.threshold or sample more chains")
    missing = [p["question_id"] for p in pairs if p["question_id"] not in records]
    if missing:
        raise ChainstepError(f"{pairs_path}: question {missing[0]} is not in the task records given")
    return pairs


def train_rft(model_dir: str | Path, pairs_path: str | Path, records: dict[str, dict],
              out_dir: str | Path, cfg: DPOConfig | None = None) -> Path:
    """The control a DPO model is read against: SFT continued from `model_dir` on the pairs'
    chosen chains alone (rejection-sampling fine-tuning), with the optimizer steps, batch,
    learning rate and schedule DPO takes on the same pairs. What DPO gains over this is what
    the preference signal adds beyond more training on right chains."""
    pairs = read_pairs(pairs_path, records)
    rows = [{**records[p["question_id"]], "id": p["id"], "response": p.get("prefix", "") + p["chosen"]}
            for p in pairs]
    cfg = round_schedule(cfg or DPOConfig(), len(pairs))
    return fit_rows(model_dir, rows, out_dir, cfg, {"pairs": relative_path(pairs_path, out_dir),
                                                    "num_pairs": len(pairs),
                                                    "control_for": "dpo", "dpo": asdict(cfg)})


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _record_rank(checkpoints: Path, trainer, collator: PreferenceCollator) -> None:
    """Each process notes the pairs it trained on and a digest of its weights: proof that every
    rank took part, and that their gradients were synchronised (the weights agree)."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    rank = trainer.args.process_index
    model = trainer.accelerator.unwrap_model(trainer.model)
    write_json(checkpoints / f"rank{rank}.json",
               {"rank": rank, "world_size": trainer.args.world_size, "pairs_seen": collator.examples_seen,
                "pid": os.getpid(), "weights_sha256": weights_digest(model)})


def dpo_round(policy_dir: Path, sft_dir: Path, prm: Verifier | None, records: list[dict], out: RunLayout,
              name: str, cfg: DPOConfig, batch_size: int = 64, samples_name: str | None = None) -> dict:
    """Sample from `policy_dir`, build pairs, train from `sft_dir` into the run's model `name`.
    Every file is resumable: samples by id, pairs rewritten whole, the trainer from checkpoints.
    Rounds given the same `samples_name` share one samples file (the pair-source ablation)."""
    samples_path = out.round_file(samples_name or name, "samples")
    pairs_path = out.round_file(name, "pairs")
    params = SamplingParams(n=cfg.samples, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                            seed=cfg.seed)
    samples = sample_responses(Policy.from_dir(policy_dir, batch_size=batch_size), records,
                               samples_path, params)
    rows = [row for r in records for row in samples[r["id"]]]
    if cfg.pairs == "step":
        pairs = step_pairs(rows, {r["id"]: r for r in records}, cfg.pairs_per_question)
    else:
        pairs = build_pairs(rows, sample_scores(rows, records, cfg.pair_source, prm),
                            cfg.threshold, cfg.pairs_per_question)
    replace_jsonl(pairs_path, pairs)
    stats = pair_stats(pairs, len(records))
    stats["sampled"] = sample_stats(rows)
    stats["scoring"] = pair_scoring(cfg.pair_source, prm)
    stats["policy"], stats["trained"] = policy_dir.name, len(pairs) >= max(1, cfg.min_pairs)
    if stats["trained"]:
        train_dpo(sft_dir, pairs_path, {r["id"]: r for r in records}, out.model(name), cfg)
    return stats


def iterative_dpo(sft_dir: str | Path, prm_dir, records: list[dict],
                  out: str | Path, cfg: DPOConfig | None = None, batch_size: int = 64) -> dict[str, dict]:
    """`cfg.rounds` rounds; round k samples from round k-1's model (the SFT model first) and
    writes `out/models/dpo-r{k}`; `prm_dir` is a verifier or what `load_verifier` reads. Finished
    rounds are skipped on a re-run. A round with fewer than `min_pairs` pairs over the threshold
    trains nothing (`trained: false`), so no comparison is made with it; the next samples from the
    same policy."""
    cfg = cfg or DPOConfig()
    sft_dir, out = Path(sft_dir), RunLayout(out)
    prm = _load_prm(prm_dir, cfg.pair_source, batch_size)
    policy, stats = sft_dir, {}
    for k in range(1, cfg.rounds + 1):
        name = f"dpo-r{k}"
        stats[name] = _round_once(policy, sft_dir, prm, records, out, name, cfg, batch_size)
        if stats[name]["trained"]:
            policy = out.model(name)
    return stats


def rft_control(sft_dir: str | Path, records: list[dict], out: str | Path, cfg: DPOConfig,
                rounds: dict[str, dict]) -> dict:
    """The RFT control of the last round that trained: SFT continued from `sft_dir` on that
    round's chosen chains, with its steps (`out/models/rft`). Skipped when it exists."""
    out = RunLayout(out)
    last = next((name for name in reversed(list(rounds)) if rounds[name]["trained"]), None)
    if last is None:
        return {"trained": False, "reason": "no DPO round trained"}
    target = out.model("rft")
    if not is_saved(target):
        train_rft(sft_dir, out.round_file(last, "pairs"), {r["id"]: r for r in records}, target, cfg)
    return {"trained": True, "chosen_of": last, "pairs": rounds[last]["pairs"]}


def continued_sft_control(sft_dir: str | Path, teacher_path: str | Path, records: list[dict],
                          out: str | Path, cfg: DPOConfig, rounds: dict[str, dict]) -> dict:
    """The compute-matched control of the last DPO round that trained (each round trains from
    `sft_dir`): SFT continued from `sft_dir` on the teacher's chains of the same questions, for
    that round's optimizer steps at its batch, learning rate and schedule
    (`out/models/sft-continued`). On a policy that has not converged, more training alone raises
    accuracy; what DPO gains over this is what its pairs add. Skipped when it exists."""
    out = RunLayout(out)
    last = next((name for name in reversed(list(rounds)) if rounds[name]["trained"]), None)
    if last is None:
        return {"trained": False, "reason": "no DPO round trained"}
    steps = round_schedule(cfg, rounds[last]["pairs"]).max_steps
    ids = {r["id"] for r in records}
    rows = [row for row in read_jsonl(teacher_path) if row["id"] in ids]
    if not rows:
        raise ChainstepError(f"{teacher_path} holds no teacher chain of the DPO questions")
    target = out.model("sft-continued")
    schedule = replace(cfg, max_steps=steps, warmup_steps=min(cfg.warmup_steps, steps // 2))
    if not is_saved(target):
        fit_rows(sft_dir, rows, target, schedule, {"data": relative_path(teacher_path, target),
                                                   "control_for": "dpo", "dpo": asdict(schedule)})
    return {"trained": True, "steps_of": last, "steps": steps, "rows": len(rows)}


def pair_source_ablation(sft_dir: str | Path, prm_dir: str | Path | None, records: list[dict],
                         out: str | Path, cfg: DPOConfig, batch_size: int = 64) -> dict[str, dict]:
    """Round 1 again with each source in `cfg.ablation`, on round 1's own samples, so the
    sources differ only in how pairs are picked: `out/models/dpo-r1-{source}`."""
    sft_dir, out = Path(sft_dir), RunLayout(out)
    scored = next((source for source in cfg.ablation if source not in GROUND_TRUTH), None)
    prm = _load_prm(prm_dir, scored, batch_size) if scored else None  # loaded once for all sources
    stats = {}
    for source in cfg.ablation:
        name = f"dpo-r1-{source}"
        scorer = None if source in GROUND_TRUTH else prm
        stats[name] = _round_once(sft_dir, sft_dir, scorer, records, out, name,
                                  replace(cfg, pair_source=source, pairs="chain"), batch_size,
                                  samples_name="dpo-r1")
    return stats


def _load_prm(prm, source: str, batch_size: int) -> Verifier | None:
    """The verifier a pair source needs: `prm` itself when it is one, else loaded from its spec."""
    if source in GROUND_TRUTH:
        return None
    if prm is None:
        raise ChainstepError(f"pair source {source!r} needs a PRM (--prm DIR)")
    return prm if hasattr(prm, "score") else load_verifier(prm, batch_size=batch_size)


def _round_once(policy, sft_dir, prm, records, out: RunLayout, name: str, cfg: DPOConfig, batch_size: int,
                samples_name: str | None = None) -> dict:
    marker = out.round_file(name, "stats")
    if marker.exists():
        stats = json.loads(marker.read_text())
    else:
        stats = dpo_round(policy, sft_dir, prm, records, out, name, cfg, batch_size, samples_name)
        write_json(marker, stats)
    if not stats["trained"]:
        console.print(f"[yellow]{name}: {stats['pairs']} pairs passed dpo.threshold={cfg.threshold}, fewer "
                      f"than dpo.min_pairs={cfg.min_pairs}: too little to change the model, nothing trained "
                      "and no comparison made (lower the threshold or sample more questions)[/yellow]")
    return stats
