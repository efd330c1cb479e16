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
This module scores; `prm_train` trains the heads on step labels, `prm_metrics` measures a
verifier, and `scoring` turns step scores into one chain score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from .config import check_head
from .errors import ChainstepError
from .inputs import collate, encode_prompt, extend_text
from .kvcache import sharing_refusal
from .layout import model_summary
from .models import load
from .scoring import ChainScore, StepScores, finished, regroup, score_joined
from .steps import (
    ANSWER_END,
    ANSWER_START,
    BAD_TAG,
    GOOD_TAG,
    STEP_END,
    STEP_TAG,
    THOUGHT_END,
    THOUGHT_START,
)

LIKELIHOOD_OFFSET = 2.0  # a step is more likely bad than good once its least likely token has p < e^-2


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


def batches(sizes: list[int], budget: int) -> list[slice]:
    """Consecutive slices of items whose sizes sum to at most `budget` (an item larger than the
    budget gets a slice of its own)."""
    out, start, total = [], 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > budget:
            out.append(slice(start, i))
            start, total = i, 0
        total += size
    return out + [slice(start, len(sizes))] if start < len(sizes) else out


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


class PRM:
    """Scores chains, complete or partial, under one chain-score rule (`scoring`); counts its
    chains scored and forward passes."""

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin, batch_size: int = 32,
                 scoring: ChainScore | None = None, head: str = "tag"):
        check_head(head)
        self.model, self.processor, self.batch_size = model.eval(), processor, batch_size
        self.scoring, self.head = scoring or ChainScore(), head
        self.label_ids, self.markers = tag_ids(processor)[1:], marker_ids(processor)
        self.chains_scored = self.forward_passes = self.malformed_chains = 0

    def _scores(self, values: list[float], kinds: list[str]) -> StepScores:
        self.malformed_chains += not tags_in_order(kinds)
        return step_scores(values, kinds)

    @classmethod
    def from_dir(cls, path: str | Path, device: str | None = None, batch_size: int = 32,
                 step_weight: float | None = None, aggregate: str | None = None,
                 head: str | None = None) -> PRM:
        """A trained PRM, read with the head and the chain-score rule it was trained with (its
        chainstep.json); `step_weight` / `aggregate` override the rule (recorded as such), `head`
        reads an untrained checkpoint with either head."""
        model, processor = load(path, device=device)
        meta = model_summary(path)
        scoring = ChainScore.trained(meta).override(step_weight, aggregate)
        return cls(model, processor, batch_size, scoring, head or meta.get("prm", {}).get("head", "tag"))

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
        """Chain scores of finished chains (no answer: a wrong answer)."""
        return [self.scoring(finished(s)) for s in self.score(records, responses)]

    @torch.inference_mode()
    def score_continuations(self, records: list[dict], prefixes: list[str],
                            continuations: list[list[str]]) -> list[list[StepScores]]:
        """Scores of prefix + each of its continuations (step search, a question's samples), the
        prompt and prefix encoded once per record and their KV cache shared by the continuations;
        the same numbers as `score` on the joined texts. A record's identical continuations are
        scored once: a trained policy repeats itself even at T = 1. Falls back to `score` where
        sharing is not supported."""
        distinct = [list(dict.fromkeys(group)) for group in continuations]
        if sharing_refusal(self.model.config) or any(p and not p.endswith(STEP_END) for p in prefixes):
            scored = score_joined(self.score, records, prefixes, distinct)
        else:
            scored = []
            for chunk in batches([len(group) for group in distinct], self.batch_size):
                scored += self._score_shared(records[chunk], prefixes[chunk], distinct[chunk])
            self.chains_scored += sum(map(len, distinct))
        return [[dict(zip(texts, scores))[c] for c in group]
                for group, texts, scores in zip(continuations, distinct, scored)]

    def _score_shared(self, records, prefixes, groups) -> list[list[StepScores]]:
        if not any(groups):
            return [[] for _ in groups]
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
        sizes = [len(group) for group in groups]
        owner = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor(sizes)).to(mask.device)
        cache = out.past_key_values
        cache.reorder_cache(owner)
        tagged = [tag_response_ids(self.processor, c) for group in groups for c in group]
        longest = max(max(len(t.ids) for t in tagged), 1)
        cand = torch.full((len(tagged), longest), tok.pad_token_id, dtype=torch.long)
        cand_mask = torch.zeros_like(cand)
        for i, t in enumerate(tagged):
            cand[i, :len(t.ids)], cand_mask[i, :len(t.ids)] = torch.tensor(t.ids, dtype=torch.long), 1
        cand, cand_mask = cand.to(mask.device), cand_mask.to(mask.device)
        start = mask.sum(-1)[owner][:, None]
        full_mask = torch.cat([mask[owner], cand_mask], 1)
        hidden = inner.model(input_ids=cand, attention_mask=full_mask,
                             position_ids=start + torch.arange(longest, device=mask.device),
                             past_key_values=cache, use_cache=True).last_hidden_state
        self.forward_passes += 2
        scores = []
        for i, (t, b) in enumerate(zip(tagged, owner.tolist())):
            values = prefix_steps[b] + self._row_good(hidden[i], cand[i], t.tags)
            scores.append(self._scores(values, ["step"] * len(prefix_steps[b]) + t.kinds))
        return regroup(scores, sizes)

    def _good(self, hidden: torch.Tensor, ids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """P(good) at the tags `where` marks in a batch's [B, L, H] hidden states, in row order."""
        logits = judge_logits(self.model, hidden, ids, where, self.label_ids, self.head, self.markers)
        return torch.softmax(logits.float(), -1)[:, 0]

    def _row_good(self, hidden: torch.Tensor, ids: torch.Tensor, tags: list[int]) -> list[float]:
        where = torch.zeros_like(ids, dtype=torch.bool)
        where[tags] = True
        return self._good(hidden[None], ids[None], where[None]).tolist()
