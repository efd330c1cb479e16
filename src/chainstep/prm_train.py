"""Training the process reward model on step labels (`chainstep prm train`).

The tag head trains with BCE at every tag (hard 0/1 labels or soft Monte Carlo values). The
likelihood head trains with next-token loss on the chains labelled right in every step, plus
`label_weight` x BCE up to each chain's first error: a verifier that generates better than the
policy judges better, and BCE on the policy's labelled samples lowered its ranking here.

    chainstep prm train runs/x/models/sft runs/x/data/prm_labels.jsonl --out runs/x/models/prm
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from transformers import ProcessorMixin, set_seed

from .config import PRMConfig
from .errors import ChainstepError
from .inputs import collate
from .layout import checkpoints_of, relative_path
from .prm import (
    encode_prm_example,
    hidden_states,
    judge_logits,
    marker_ids,
    tag_ids,
    token_logprobs,
)
from .records import by_sample, read_jsonl
from .steps import tag_count
from .training import ResumableTrainer, fit, prepare_model, training_arguments

console = Console(stderr=True)


def prm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCE of P(good) = softmax(logits)[0] against targets in [0, 1] (soft targets kept soft)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(targets * logp[:, 0] + (1 - targets) * logp[:, 1]).mean()


class PRMTrainer(ResumableTrainer):
    def __init__(self, *args, label_ids: tuple[int, int], head: str = "tag",
                 markers: tuple[int, int, int, int] = (), label_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_ids, self.head, self.markers, self.label_weight = label_ids, head, markers, label_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs.pop("prm_targets")
        lm_labels = inputs.pop("labels", None)
        where, ids = targets.ge(0), inputs["input_ids"]
        hidden = hidden_states(model, inputs)
        logprobs = token_logprobs(model, hidden, ids) if self.head == "likelihood" else None
        logits = judge_logits(model, hidden, ids, where, self.label_ids, self.head, self.markers, logprobs)
        loss = self.label_weight * prm_loss(logits, targets[where])
        if lm_labels is not None and lm_labels.ge(0).any():  # labels are the ids where set
            loss = loss - logprobs[lm_labels.ge(0)].mean()
        return (loss, logits) if return_outputs else loss


class _Collator:
    """Tagged chains with their targets; with `lm` (the likelihood head) also next-token labels
    on the response of every chain labelled right throughout, tags left out."""

    def __init__(self, processor: ProcessorMixin, soft: bool, lm: bool = False):
        self.processor, self.soft, self.lm = processor, soft, lm

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        examples = []
        for row in rows:
            right = right_throughout(row)
            targets = training_targets(row, self.soft, past_first_error=not self.lm)
            example = encode_prm_example(self.processor, row, row["response"], targets, self.lm)
            if self.lm and not right:
                example["labels"].fill_(-100)
            examples.append(example)
        return collate(examples, self.processor.tokenizer.pad_token_id)


def right_throughout(row: dict) -> bool:
    return all(y == 1 for y in row["labels"])


def carries_gradient(row: dict, likelihood: bool, label_weight: float) -> bool:
    """Whether a chain can move the PRM: under the likelihood head with no BCE weight only the
    next-token loss on right chains does, and a batch that holds wrong chains pays their
    forward and backward passes for nothing (the default: 150 steps then see about twice the
    right chains)."""
    return not likelihood or label_weight > 0 or right_throughout(row)


def training_targets(row: dict, soft: bool, past_first_error: bool = True) -> list[float | None]:
    """Soft MC values where a row has them and `soft` is set; hard labels otherwise. Without
    `past_first_error` the tags after the first bad one are left out: the likelihood head judges
    a step given its prefix, and after the first error the prefix is already wrong."""
    targets = row["labels"]
    if soft and row.get("values") is not None:
        targets = [None if label is None else value for label, value in zip(row["labels"], row["values"])]
    if not past_first_error and 0 in row["labels"]:
        first = row["labels"].index(0)
        targets = list(targets[:first + 1]) + [None] * (len(targets) - first - 1)
    return targets


def merge_labels(rows: list[dict], how: str = "union") -> list[dict]:
    """`union`: every labelled chain; `agree`: chains labelled by both MC and the judge, with
    the steps they disagree on masked."""
    if how == "union":
        return rows
    merged = []
    for sources in by_sample(rows).values():
        if "mc" in sources and "judge" in sources:
            mc, judge = sources["mc"], sources["judge"]
            labels = [a if a == b else None for a, b in zip(mc["labels"], judge["labels"])]
            merged.append({**judge, "id": f"{judge['sample_id']}/agree", "source": "agree",
                           "labels": labels, "values": mc.get("values")})
        elif "perturb" in sources:
            merged.append(sources["perturb"])
    return merged


def train_prm(model_dir: str | Path, labels_path: str | Path, out_dir: str | Path,
              cfg: PRMConfig | None = None) -> Path:
    """Train a PRM from `model_dir` (an SFT'd policy, or any VLM with the step tokens)."""
    cfg = cfg or PRMConfig()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    set_seed(cfg.seed)
    rows = merge_labels(read_jsonl(labels_path, required=("id", "image", "question", "response",
                                                          "labels", "source")), cfg.merge)
    rows = [r for r in rows if any(label is not None for label in r["labels"])]
    malformed = [r["id"] for r in rows if len(r["labels"]) != tag_count(r["response"])]
    rows = [r for r in rows if len(r["labels"]) == tag_count(r["response"])]
    if malformed:
        console.print(f"[yellow]prm: {len(malformed)} chains whose labels do not match their step "
                      f"tags left out (first: {malformed[0]})[/yellow]")
    if not rows:
        raise ChainstepError(f"{labels_path} holds no labelled chains (merge={cfg.merge})")
    likelihood = cfg.head == "likelihood"
    carried = [r for r in rows if carries_gradient(r, likelihood, cfg.label_weight)]
    if not carried:
        raise ChainstepError(f"{labels_path} holds no chains to train on (merge={cfg.merge}, "
                             f"head={cfg.head}, label_weight={cfg.label_weight}: right chains needed)")
    model, processor = prepare_model(model_dir, cfg)
    args = training_arguments(cfg, checkpoints_of(out_dir),
                              label_names=["prm_targets"])
    trainer = PRMTrainer(model=model, args=args, train_dataset=carried,
                         data_collator=_Collator(processor, cfg.soft_labels, lm=likelihood),
                         label_ids=tag_ids(processor)[1:], head=cfg.head, markers=marker_ids(processor),
                         label_weight=cfg.label_weight if likelihood else 1.0)
    fit(trainer, cfg, processor, model_dir, out_dir,
        {"role": "prm", "labels": relative_path(labels_path, out_dir), "chains": len(carried),
         "labelled_chains": len(rows), "malformed_chains": len(malformed), "prm": asdict(cfg)})
    return out_dir
