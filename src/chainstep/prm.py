"""The process reward model: a VLM that judges every step at the `ки` tag after it.

Two heads read the same tagged input (one encoder and one forward function for training and
scoring, so the tags trained on are the ones scored; one forward pass per chain):
- `tag` (the paper's): P(good) is the two-way softmax of the LM head's logits for
  {`к+и`, `к-и`} at the tag.
- `likelihood` (the default): P(good) = sigmoid(LIKELIHOOD_OFFSET + l), where l is the log
  probability, under the PRM's own language model, of the least likely token of the step's
  thought (the answer's tokens for the answer tag). A wrong count, copy, sum or letter is a
  token the verifier did not expect. A tag head has to learn an equality check from one bit
  per step and did not within 1,000 steps here (ranking AUROC 0.54); the likelihood head reuses
  what next-token training teaches: to copy and to add (docs/findings.md).
The tag head trains with BCE at every tag (hard 0/1 labels or soft Monte Carlo values). The
likelihood head trains with next-token loss on the chains labelled right in every step, plus
`label_weight` x BCE up to each chain's first error: a verifier that generates better than the
policy judges better, and BCE on the policy's labelled samples lowered its ranking here.

    chainstep prm train runs/x/models/sft runs/x/data/prm_labels.jsonl --out runs/x/models/prm
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from transformers import PreTrainedModel, ProcessorMixin, set_seed

from .errors import ChainstepError
from .inputs import collate, encode_prompt, extend_text
from .models import load
from .records import JsonlWriter, read_jsonl
from .sampling import SHARED_PREFIX_MODELS
from .steps import (
    ANSWER_END,
    ANSWER_START,
    BAD_TAG,
    GOOD_TAG,
    STEP_END,
    STEP_TAG,
    THOUGHT_END,
    THOUGHT_START,
    parse,
    parses,
)
from .train_sft import ResumableTrainer, SFTConfig, fit, prepare_model, training_arguments

AGGREGATES = ("mean", "min", "last", "prod")
HEADS = ("likelihood", "tag")
LIKELIHOOD_OFFSET = 2.0  # a step is more likely bad than good once its least likely token has p < e^-2
console = Console(stderr=True)


@dataclass
class PRMConfig(SFTConfig):
    """PRM training knobs (as SFT's) plus how chain scores are formed."""

    init: str = "policy"  # policy; larger: a bigger model of its own (pipeline); or a model dir
    size: str = "medium"  # the larger base's size (models.SIZES), with init=larger
    head: str = "likelihood"  # likelihood (of the step's tokens) or tag (the paper's two-token head)
    label_weight: float = 0.0  # likelihood head: weight of the BCE on labels beside next-token loss
    max_steps: int = 450
    learning_rate: float = 5e-4
    bf16: bool = True  # autocast: faster on this CPU
    soft_labels: bool = False  # train on MC values instead of 0/1 (others truncate these silently)
    merge: str = "union"  # label sources: union (every labelled chain) or agree (steps both agree on)
    step_weight: float = 0.2  # chain score = w * agg(steps) + (1 - w) * answer
    aggregate: str = "mean"  # mean, min, last or prod over step scores

    def __post_init__(self):
        super().__post_init__()
        check_scoring(self.step_weight, self.aggregate)
        if self.merge not in ("union", "agree"):
            raise ChainstepError(f"prm.merge={self.merge!r} must be union or agree")
        check_head(self.head)
        if self.label_weight < 0:
            raise ChainstepError(f"prm.label_weight={self.label_weight} must be >= 0")


def check_head(head: str) -> None:
    if head not in HEADS:
        raise ChainstepError(f"prm.head={head!r} must be one of {HEADS}")


def check_scoring(step_weight: float, aggregate: str) -> None:
    if not 0 <= step_weight <= 1:
        raise ChainstepError(f"step_weight={step_weight} must be in [0, 1]")
    if aggregate not in AGGREGATES:
        raise ChainstepError(f"aggregate={aggregate!r} must be one of {AGGREGATES}")


@dataclass
class StepScores:
    """P(good) per step tag, and for the answer tag (None for a partial chain)."""

    steps: list[float]
    answer: float | None


def chain_score(s: StepScores, step_weight: float = 0.2, aggregate: str = "mean") -> float:
    """w * agg(steps) + (1 - w) * answer; a partial chain is scored by its steps alone."""
    agg = _aggregate(s.steps, aggregate)
    if s.answer is None:
        return agg if agg is not None else 0.0
    if agg is None:
        return s.answer
    return step_weight * agg + (1 - step_weight) * s.answer


def _aggregate(values: list[float], how: str) -> float | None:
    if not values:
        return None
    if how == "mean":
        return sum(values) / len(values)
    if how == "min":
        return min(values)
    if how == "last":
        return values[-1]
    return math.prod(values)


def tag_ids(processor: ProcessorMixin) -> tuple[int, int, int]:
    """(step tag, good, bad) ids, looked up by string."""
    tok = processor.tokenizer
    ids = tuple(tok.convert_tokens_to_ids(t) for t in (STEP_TAG, GOOD_TAG, BAD_TAG))
    if any(i is None or i == tok.unk_token_id for i in ids):
        raise ChainstepError("the tokenizer lacks the PRM tags; run `chainstep add-tokens`")
    return ids


@dataclass
class TaggedResponse:
    """Response ids with a tag id put after every step end and answer end, and what each tag
    judges. Tags are placed by token id, never found by matching text: a `ки` the response
    spells itself (a Cyrillic word) is content, not a tag."""

    ids: list[int]
    tags: list[int]  # positions in `ids`
    kinds: list[str]  # "step" or "answer" per tag



def tag_response_ids(processor: ProcessorMixin, response: str) -> TaggedResponse:
    tok = processor.tokenizer
    tag = tag_ids(processor)[0]
    ends = {tok.convert_tokens_to_ids(STEP_END): "step", tok.convert_tokens_to_ids(ANSWER_END): "answer"}
    ids, tags, kinds = [], [], []
    for token in tok(response, add_special_tokens=False)["input_ids"]:
        ids.append(token)
        if token in ends:
            tags.append(len(ids))
            kinds.append(ends[token])
            ids.append(tag)
    return TaggedResponse(ids, tags, kinds)


def tag_count(response: str) -> int:
    """How many tags a response's structure calls for (step ends and answer ends are special
    tokens, so counting them in text counts them in ids)."""
    return response.count(STEP_END) + response.count(ANSWER_END)


def encode_prm_example(processor: ProcessorMixin, record: dict, response: str,
                       targets: list[float | None] | None = None,
                       next_token_labels: bool = False) -> dict[str, torch.Tensor]:
    """Prompt + tagged response; `prm_targets` holds a target at each response tag, -100 elsewhere.

    With `targets` (training) there must be exactly one per tag; without (scoring) they are 0.
    `next_token_labels` adds `labels`: the response's tokens, tags left out.
    """
    example = encode_prompt(processor, record)
    prompt_len = example["input_ids"].shape[0]
    tagged = tag_response_ids(processor, response)
    extend_text(example, torch.tensor(tagged.ids, dtype=example["input_ids"].dtype))
    if targets is None:
        targets = [0.0] * len(tagged.tags)
    if len(targets) != len(tagged.tags):
        raise ChainstepError(f"record {record.get('id')}: {len(targets)} labels for {len(tagged.tags)} "
                             "step tags in the response")
    values = torch.full(example["input_ids"].shape, -100.0)
    tags = [prompt_len + t for t in tagged.tags]
    values[tags] = torch.tensor(
        [-100.0 if t is None else float(t) for t in targets])
    example["prm_targets"] = values
    if next_token_labels:
        labels = example["input_ids"].clone()
        labels[:prompt_len] = -100
        labels[tags] = -100
        example["labels"] = labels
    return example


def tags_in_order(kinds: list[str]) -> bool:
    """Step tags, then at most one answer tag, last."""
    return "answer" not in kinds[:-1]


def step_scores(values: list[float], kinds: list[str]) -> StepScores:
    """Tag probabilities -> step and answer scores: the steps before the first answer tag, and
    that answer tag (None for a partial chain)."""
    cut = kinds.index("answer") if "answer" in kinds else len(kinds)
    return StepScores(values[:cut], values[cut] if cut < len(kinds) else None)


def hidden_states(model: PreTrainedModel, batch: dict) -> torch.Tensor:
    """The decoder's final (normed) hidden states, [B, L, H]."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model(**batch).last_hidden_state


def head_logits(model: PreTrainedModel, hidden: torch.Tensor, label_ids: tuple[int, int]) -> torch.Tensor:
    """The LM head's (good, bad) rows applied to [K, H] hidden states."""
    head = model.get_output_embeddings()
    logits = hidden @ head.weight[list(label_ids)].T
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[list(label_ids)]
    return logits


def marker_ids(processor: ProcessorMixin) -> tuple[int, int, int, int]:
    """(thought start, thought end, answer start, answer end): what bounds a judged span."""
    tok = processor.tokenizer
    return tuple(tok.convert_tokens_to_ids(t) for t in (THOUGHT_START, THOUGHT_END, ANSWER_START, ANSWER_END))


def judged_span(ids: list[int], tag: int, markers: tuple[int, int, int, int]) -> range:
    """Positions of what the tag at `tag` judges: the step's thought (or the answer) with its
    end marker; the token before the tag when the step has no such span."""
    thought_start, _, answer_start, answer_end = markers
    start_id = answer_start if ids[tag - 1] == answer_end else thought_start
    start = next((i for i in range(tag - 1, -1, -1) if ids[i] == start_id or ids[i] == ids[tag]), -1)
    if start < 0 or ids[start] == ids[tag]:
        return range(tag - 1, tag)
    end = next(i for i in range(start + 1, tag) if ids[i] in markers or i == tag - 1)
    return range(start + 1, end + 1)


def token_logprobs(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] log p(ids[:, j] | ids[:, :j]) from [B, L, H] hidden states (0 at j = 0)."""
    logits = model.get_output_embeddings()(hidden[:, :-1]).float()
    picked = logits.log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(picked, (1, 0))


def least_likely(logprobs: torch.Tensor, ids: list[int], tags: list[int],
                 markers: tuple[int, int, int, int]) -> torch.Tensor:
    """[K] log probability of the least likely token each tag judges, from one row's [L] log probs."""
    return torch.stack([logprobs[list(judged_span(ids, t, markers))].min() for t in tags])


def judge_logits(model: PreTrainedModel, hidden: torch.Tensor, ids: torch.Tensor, where: torch.Tensor,
                 label_ids: tuple[int, int], head: str, markers: tuple[int, int, int, int],
                 logprobs: torch.Tensor | None = None) -> torch.Tensor:
    """[K, 2] (good, bad) logits at the tags `where` marks in a batch ([B, L] ids, [B, L, H]
    hidden states), in row order; softmax[:, 0] is P(good)."""
    if head == "tag":
        return head_logits(model, hidden[where], label_ids)
    logprobs = token_logprobs(model, hidden, ids) if logprobs is None else logprobs
    rows = [least_likely(logprobs[b], ids[b].tolist(), where[b].nonzero().flatten().tolist(), markers)
            for b in range(ids.shape[0]) if where[b].any()]
    least = torch.cat(rows) if rows else hidden.new_zeros(0)
    return torch.stack([least + LIKELIHOOD_OFFSET, torch.zeros_like(least)], -1)


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
            right = all(y == 1 for y in row["labels"])
            targets = training_targets(row, self.soft, past_first_error=not self.lm)
            example = encode_prm_example(self.processor, row, row["response"], targets, self.lm)
            if self.lm and not right:
                example["labels"].fill_(-100)
            examples.append(example)
        return collate(examples, self.processor.tokenizer.pad_token_id)


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
    for sources in _by_sample(rows).values():
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
    model, processor = prepare_model(model_dir, cfg)
    args = training_arguments(cfg, out_dir.with_name(out_dir.name + "-checkpoints"),
                              label_names=["prm_targets"])
    likelihood = cfg.head == "likelihood"
    trainer = PRMTrainer(model=model, args=args, train_dataset=rows,
                         data_collator=_Collator(processor, cfg.soft_labels, lm=likelihood),
                         label_ids=tag_ids(processor)[1:], head=cfg.head, markers=marker_ids(processor),
                         label_weight=cfg.label_weight if likelihood else 1.0)
    fit(trainer, cfg, processor, model_dir, out_dir,
        {"role": "prm", "labels": str(labels_path), "chains": len(rows), "malformed_chains": len(malformed),
         "prm": asdict(cfg)})
    return out_dir


class PRM:
    """Scores chains, complete or partial; counts its chains scored and forward passes."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, batch_size: int = 32,
                 step_weight: float = 0.2, aggregate: str = "mean", head: str = "tag"):
        check_scoring(step_weight, aggregate)
        check_head(head)
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.step_weight, self.aggregate, self.head = step_weight, aggregate, head
        self.label_ids, self.markers = tag_ids(processor)[1:], marker_ids(processor)
        self.chains_scored = self.forward_passes = self.malformed_chains = 0

    def _scores(self, values: list[float], kinds: list[str]) -> StepScores:
        self.malformed_chains += not tags_in_order(kinds)
        return step_scores(values, kinds)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | None = None, **kwargs) -> PRM:
        """A trained PRM, read with the head it was trained with (saved in its chainstep.json)."""
        model, processor = load(path, device=device)
        meta = Path(path) / "chainstep.json"
        trained = json.loads(meta.read_text()).get("prm", {}) if meta.exists() else {}
        return cls(model, processor, **{"head": trained.get("head", "tag"), **kwargs})

    @torch.inference_mode()
    def score(self, records: list[dict], responses: list[str]) -> list[StepScores]:
        """Per-step and answer P(good) for each (record, response) pair."""
        out: list[StepScores] = []
        for start in range(0, len(records), self.batch_size):
            recs, texts = records[start:start + self.batch_size], responses[start:start + self.batch_size]
            examples = [encode_prm_example(self.processor, r, t) for r, t in zip(recs, texts)]
            batch = collate(examples, self.processor.tokenizer.pad_token_id).to(self.model.device)
            where = batch.pop("prm_targets").ge(0)
            probs = self._good(hidden_states(self.model, batch), batch["input_ids"], where)
            counts = where.sum(dim=1).tolist()
            for text, chunk in zip(texts, torch.split(probs, counts)):
                out.append(self._scores(chunk.tolist(), tag_response_ids(self.processor, text).kinds))
            self.forward_passes += 1
        self.chains_scored += len(records)
        return out

    def chain_scores(self, records: list[dict], responses: list[str]) -> list[float]:
        return [chain_score(s, self.step_weight, self.aggregate) for s in self.score(records, responses)]

    @torch.inference_mode()
    def score_continuations(self, records: list[dict], prefixes: list[str],
                            continuations: list[list[str]]) -> list[list[StepScores]]:
        """Scores of prefix + each of its continuations (step search), the prompt and prefix
        encoded once per record and their KV cache shared by the continuations; the same numbers
        as `score` on the joined texts. Falls back to `score` where sharing is not supported."""
        sizes = {len(group) for group in continuations}
        if self.model.config.model_type not in SHARED_PREFIX_MODELS or len(sizes) != 1 or \
                any(p and not p.endswith(STEP_END) for p in prefixes):
            return score_joined(self.score, records, prefixes, continuations)
        n = sizes.pop()
        per = max(1, self.batch_size // n)
        out: list[list[StepScores]] = []
        for start in range(0, len(records), per):
            chunk = slice(start, start + per)
            out += self._score_shared(records[chunk], prefixes[chunk], continuations[chunk], n)
        self.chains_scored += n * len(records)
        return out

    def _score_shared(self, records, prefixes, groups, n: int) -> list[list[StepScores]]:
        tok = self.processor.tokenizer
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        examples, prefix_tags = [], []
        for record, prefix in zip(records, prefixes):
            example = encode_prompt(self.processor, record)
            tagged = tag_response_ids(self.processor, prefix)
            prefix_tags.append([example["input_ids"].shape[0] + t for t in tagged.tags])
            extend_text(example, torch.tensor(tagged.ids, dtype=example["input_ids"].dtype))
            examples.append(example)
        batch = collate(examples, tok.pad_token_id, padding_side="left").to(self.model.device)
        mask = batch["attention_mask"]
        out = inner.model(**batch, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
        prefix_steps = []
        for b, (example, tags) in enumerate(zip(examples, prefix_tags)):
            shift = mask.shape[1] - example["input_ids"].shape[0]  # left padding
            where = [shift + t for t in tags]
            prefix_steps.append(self._row_good(out.last_hidden_state[b], batch["input_ids"][b], where))
        cache = out.past_key_values
        cache.batch_repeat_interleave(n)
        tagged = [tag_response_ids(self.processor, c) for group in groups for c in group]
        longest = max(max(len(t.ids) for t in tagged), 1)
        cand = torch.full((len(tagged), longest), tok.pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros_like(cand)
        for i, t in enumerate(tagged):
            cand[i, :len(t.ids)], cand_mask[i, :len(t.ids)] = torch.tensor(t.ids, dtype=torch.long), 1
        cand, cand_mask = cand.to(mask.device), cand_mask.to(mask.device)
        start = mask.sum(-1).repeat_interleave(n)[:, None]
        full_mask = torch.cat([mask.repeat_interleave(n, 0), cand_mask], 1)
        hidden = inner.model(input_ids=cand, attention_mask=full_mask,
                             position_ids=start + torch.arange(longest, device=mask.device),
                             past_key_values=cache, use_cache=True).last_hidden_state
        self.forward_passes += 2
        scores = []
        for i, t in enumerate(tagged):
            values = prefix_steps[i // n] + self._row_good(hidden[i], cand[i], t.tags)
            scores.append(self._scores(values, ["step"] * len(prefix_steps[i // n]) + t.kinds))
        return _regroup(scores, [n] * len(records))

    def _good(self, hidden: torch.Tensor, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """P(good) at the tags `where` marks in a batch's [B, L, H] hidden states, in row order."""
        logits = judge_logits(self.model, hidden, ids, where, self.label_ids, self.head, self.markers)
        return torch.softmax(logits.float(), -1)[:, 0]

    def _row_good(self, hidden: torch.Tensor, ids: torch.Tensor, tags: list[int]) -> list[float]:
        where = torch.zeros_like(ids, dtype=torch.bool)
        where[tags] = True
        return self._good(hidden[None], ids[None], where[None]).tolist()


def score_joined(score, records: list[dict], prefixes: list[str],
                 continuations: list[list[str]]) -> list[list[StepScores]]:
    """Continuation scores the plain way: `score` on every prefix + continuation, regrouped."""
    flat = score([r for r, g in zip(records, continuations) for _ in g],
                 [p + c for p, g in zip(prefixes, continuations) for c in g])
    return _regroup(flat, [len(g) for g in continuations])


def _regroup(flat: list, sizes: list[int]) -> list[list]:
    out, at = [], 0
    for size in sizes:
        out.append(flat[at:at + size])
        at += size
    return out


def auroc(scores: list[float], labels: list[int]) -> float | None:
    """Area under the ROC curve by the rank-sum statistic (ties count half)."""
    s, y = np.asarray(scores, dtype=float), np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    order = s.argsort(kind="mergesort")
    _, inverse, counts = np.unique(s[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def evaluate_prm(prm: PRM, rows: list[dict]) -> dict:
    """Step-level and selection-level quality on held-out labelled chains.

    `ranking_auroc` is what selection needs: for two chains of one question, one right and one
    wrong, how often the right one scores higher. Pooled step metrics mostly measure how hard
    each question is.
    """
    scores = prm.score(rows, [r["response"] for r in rows])
    families = {r["question_id"]: r.get("family") or r.get("meta", {}).get("family") or "all" for r in rows}
    step_p, step_y, first_hits, by_question, parsed = [], [], [], {}, {}
    for row, s in zip(rows, scores):
        labels = row["labels"][:len(s.steps)]
        pairs = [(p, y) for p, y in zip(s.steps, labels) if y is not None]
        step_p += [p for p, _ in pairs]
        step_y += [int(y) for _, y in pairs]
        if all(y is not None for y in labels):
            first_hits.append(_first_bad([p < 0.5 for p in s.steps]) == _first_bad([y == 0 for y in labels]))
        correct = row["labels"][-1] if s.answer is not None else None
        if correct is not None:
            score = chain_score(s, prm.step_weight, prm.aggregate)
            by_question.setdefault(row["question_id"], []).append((score, int(correct)))
            if parses(row["response"]):
                parsed.setdefault(row["question_id"], []).append((score, int(correct)))
    pred = [p >= 0.5 for p in step_p]
    good_rate = sum(step_y) / len(step_y) if step_y else 0.0
    tp = sum(not p and not y for p, y in zip(pred, step_y))
    fp = sum(not p and y for p, y in zip(pred, step_y))
    fn = sum(p and not y for p, y in zip(pred, step_y))
    return {
        "chains": len(rows), "steps": len(step_y),
        "step_accuracy": sum(p == bool(y) for p, y in zip(pred, step_y)) / len(step_y) if step_y else 0.0,
        "majority_baseline": max(good_rate, 1 - good_rate),
        "step_auroc": auroc(step_p, step_y),
        "bad_step_f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "first_error_accuracy": sum(first_hits) / len(first_hits) if first_hits else None,
        "ranking_auroc": ranking_auroc(by_question),
        "ranking_pairs": ranking_pairs(by_question),
        "ranking_auroc_parsed": ranking_auroc(parsed),  # what best-of-N and beam search rank
        "ranking_pairs_parsed": ranking_pairs(parsed),
        "per_family_ranking_auroc": {
            family: ranking_auroc({q: c for q, c in by_question.items() if families[q] == family})
            for family in sorted(set(families.values()))},
    }


def _first_bad(flags: list[bool]) -> int:
    return next((i for i, bad in enumerate(flags) if bad), -1)


def ranking_pairs(by_question: dict[str, list[tuple[float, int]]]) -> int:
    """How many (right, wrong) chain pairs within a question `ranking_auroc` averages over."""
    return sum(sum(c for _, c in chains) * sum(1 - c for _, c in chains) for chains in by_question.values())


def ranking_auroc(by_question: dict[str, list[tuple[float, int]]]) -> float | None:
    """P(score of a right chain > score of a wrong chain of the same question), ties half."""
    wins = total = 0.0
    for chains in by_question.values():
        right = [s for s, c in chains if c]
        wrong = [s for s, c in chains if not c]
        for a in right:
            for b in wrong:
                wins += 1.0 if a > b else 0.5 if a == b else 0.0
                total += 1
    return wins / total if total else None


def _by_sample(rows: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["sample_id"], {})[row["source"]] = row
    return out


def label_agreement(rows: list[dict]) -> float | None:
    """Fraction of step labels on which MC and the judge agree (chains labelled by both)."""
    same = [a == b for sources in _by_sample(rows).values() if {"mc", "judge"} <= sources.keys()
            for a, b in zip(sources["mc"]["labels"][:-1], sources["judge"]["labels"][:-1])
            if a is not None and b is not None]
    return sum(same) / len(same) if same else None


def write_traces(prm: PRM, rows: list[dict], path: str | Path, limit: int = 12) -> Path:
    """Chains labelled by both MC and the judge, with the PRM's score for every step: the
    report's step-trace viewer."""
    both = [s for s in _by_sample(rows).values() if {"mc", "judge"} <= s.keys()][:limit]
    scores = prm.score([s["judge"] for s in both], [s["judge"]["response"] for s in both])
    path = Path(path)
    path.unlink(missing_ok=True)
    with JsonlWriter(path) as writer:
        for sources, score in zip(both, scores):
            judge, mc = sources["judge"], sources["mc"]
            chain = parse(judge["response"])
            steps = [{"name": st.name, "thought": st.thought, "prm": p, "judge": rating, "mc": value}
                     for st, p, rating, value in
                     zip(chain.steps, score.steps, judge["ratings"], mc["values"])]
            writer.write({"id": judge["sample_id"], "question_id": judge["question_id"],
                          "image": judge["image"], "question": judge["question"],
                          "answer": judge["answer"], "predicted": chain.answer,
                          "correct": bool(judge["labels"][-1]), "answer_prm": score.answer, "steps": steps})
    return path
