"""Step labels for PRM training: Monte Carlo rollouts, a judge, and perturbed teacher chains.

- **Monte Carlo** (Math-Shepherd): k rollouts from the policy continue the chain after each
  step; the step's value is the fraction that reach the right answer. `rule=hard` calls a step
  good if any rollout is right, `soft` if the fraction reaches `threshold`. The value is kept
  beside the label so a PRM can train on it.
- **Judge**: every step rated good / neutral / bad; `neutral` maps to good, bad or no label.
- **Perturbed teacher chains** (`perturb.py`): a right chain with one error put in and
  everything after it recomputed, beside its clean twin; free labels the policy never sees,
  which give the verifier an advantage over the policy it checks.
The tag after the answer is labelled by answer correctness in every source.

    chainstep label runs/x/data/samples.jsonl runs/x/tasks/train.jsonl runs/x/models/sft \
        --out runs/x/data/prm_labels.jsonl
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rich.progress import track

from .client import RemoteError
from .config import LabelConfig
from .construct import example_row
from .errors import ChainstepError
from .grading import grade_response, matches
from .judge import Judge, JudgeError, ProgrammaticJudge
from .layout import rejects_of
from .perturb import clean_labels, perturb
from .records import JsonlWriter, done_ids
from .sampling import Policy, SamplingParams, seeded_chunks
from .scoring import regroup
from .steps import STEP_END, Chain, FormatError, leading_steps, parse, render, tag_count
from .teacher import ProgrammaticTeacher


def mc_labels(values: list[float], rule: str = "hard", threshold: float = 0.5) -> list[int]:
    """0/1 labels from MC values (fractions of rollouts that reached the right answer)."""
    return [int(v > 0) if rule == "hard" else int(v >= threshold) for v in values]


def judge_labels(ratings: list[str], neutral: str = "bad") -> list[int | None]:
    mapping = {"good": 1, "bad": 0, "neutral": {"good": 1, "bad": 0, "drop": None}[neutral]}
    return [mapping[r] for r in ratings]


def step_prefixes(response: str) -> list[str]:
    """The response cut after each step end: what rollouts continue from."""
    prefixes, start = [], 0
    while (end := response.find(STEP_END, start)) >= 0:
        start = end + len(STEP_END)
        prefixes.append(response[:start])
    return prefixes


def monte_carlo(policy: Policy, items: list[tuple[dict, str]], k: int,
                params: SamplingParams) -> list[list[float]]:
    """Per chain, the fraction of k rollouts after each step that reach the right answer, graded
    as evaluation grades: the whole chain (prefix + rollout) must parse.

    All prefixes of all chains go through one generate call, longest prefix first: rollouts
    from the same depth need similar lengths, so a batch does not wait on one long straggler.
    """
    flat = [(record, prefix) for record, response in items for prefix in step_prefixes(response)]
    order = sorted(range(len(flat)), key=lambda i: -len(flat[i][1]))
    gens = policy.generate([flat[i][0] for i in order], SamplingParams(
        n=k, temperature=params.temperature, max_tokens=params.max_tokens, seed=params.seed),
        prefixes=[flat[i][1] for i in order], progress=False)
    values = [0.0] * len(flat)
    for i, group in zip(order, gens):
        record, prefix = flat[i]
        values[i] = sum(grade_response(prefix + g.text, record)["correct"] for g in group) / k
    return regroup(values, [len(step_prefixes(response)) for _, response in items])


def _row(record: dict, sample_id: str, source: str, response: str, labels: list, **extra) -> dict:
    return {**example_row(record, response), "id": f"{sample_id}/{source}", "sample_id": sample_id,
            "question_id": record["id"], "source": source, "labels": labels, **extra}


def label(samples: list[dict], records: list[dict], out_path: str | Path, cfg: LabelConfig,
          policy: Policy | None = None, judge: Judge | None = None,
          perturb_records: list[dict] | None = None) -> dict:
    """Write label rows for `samples` (graded responses) into `out_path`; resumable by id.
    Perturbed chains come from `perturb_records` (default: `records`)."""
    if cfg.mc and policy is None:
        raise ChainstepError("Monte Carlo labels need the policy (label.mc=true)")
    out_path = Path(out_path)
    by_id = {r["id"]: r for r in records}
    done = done_ids(out_path)
    judge = judge or ProgrammaticJudge()
    chains = [s for s in samples if s["parsed"]]
    stats: Counter = Counter()
    rejects = rejects_of(out_path)
    with JsonlWriter(out_path) as writer, JsonlWriter(rejects) as rejected:
        if cfg.judge:
            todo = [s for s in samples if f"{s['id']}/judge" not in done]
            _judge_rows(todo, by_id, judge, cfg, writer, rejected, stats)
        if cfg.perturbed:
            _perturbed_rows(records if perturb_records is None else perturb_records, cfg, done, writer, stats)
        if cfg.mc:
            stats["mc_skipped_unparsed"] = len(samples) - len(chains)
            picked = chains[:cfg.mc_chains] if cfg.mc_chains else chains
            _mc_rows(picked, done, by_id, policy, cfg, writer, stats)
    return dict(stats)


def judged_labels(record: dict, response: str, judge: Judge, neutral: str) -> tuple[list, list[str]]:
    """Labels for every tag of a response. The well-formed leading steps get the judge's
    ratings; every tag from the first malformed step on is bad, and so is the answer of a chain
    that does not parse: the PRM must learn that broken format loses."""
    try:
        chain = parse(response)
        ratings = judge.rate(record, chain)
        return judge_labels(ratings, neutral) + [int(matches(chain.answer, record))], ratings
    except FormatError:
        pass
    steps = leading_steps(response)
    ratings = judge.rate(record, Chain(tuple(steps), "?")) if steps else []
    tags = tag_count(response)
    ratings += ["malformed"] * (response.count(STEP_END) - len(steps))
    return judge_labels(ratings[:len(steps)], neutral) + [0] * (tags - len(steps)), ratings


def _judge_rows(todo, by_id, judge, cfg, writer, rejected, stats) -> None:
    def rate(sample):
        try:
            return judged_labels(by_id[sample["question_id"]], sample["response"], judge, cfg.neutral), None
        except (JudgeError, RemoteError) as err:
            return None, getattr(err, "reason", "unreadable_reply") + f": {err}"[:200]

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        for sample, (result, error) in track(zip(todo, pool.map(rate, todo)), total=len(todo),
                                             description="judge labels"):
            if error:
                rejected.write({"id": f"{sample['id']}/judge", "reason": error})
                stats["judge_failed"] += 1
                continue
            labels, ratings = result
            writer.write(_row(by_id[sample["question_id"]], sample["id"], "judge", sample["response"],
                              labels, ratings=ratings))
            stats["judge" if sample["parsed"] else "judge_malformed"] += 1


def _perturbed_rows(records, cfg, done, writer, stats) -> None:
    """Per question and j < `perturbed`: a teacher chain with one error and its clean twin."""
    for record in records:
        if not record.get("meta", {}).get("steps"):
            continue
        for j in range(cfg.perturbed):
            chain = ProgrammaticTeacher(cfg.seed + j).chain(record)
            wrong = perturb(record, chain, random.Random(f"{cfg.seed}:{record['id']}:{j}"))
            for sample_id, made, labels, kind in (
                    (f"{record['id']}~p{j}", wrong.chain, wrong.labels, wrong.kind),
                    (f"{record['id']}~c{j}", chain, clean_labels(chain), "none")):
                if f"{sample_id}/perturb" not in done:
                    writer.write(_row(record, sample_id, "perturb", render(made), labels, error=kind))
                    stats["perturb"] += 1


def _mc_rows(picked, done, by_id, policy, cfg, writer, stats) -> None:
    chunks = list(seeded_chunks(picked, cfg.seed, key=lambda s: s["id"],
                                pending=lambda s: f"{s['id']}/mc" not in done))
    for chunk, seed in track(chunks, description="MC rollouts"):
        params = SamplingParams(temperature=cfg.temperature, max_tokens=cfg.max_tokens, seed=seed)
        items = [(by_id[s["question_id"]], s["response"]) for s in chunk]
        for (record, response), sample, values in zip(items, chunk,
                                                      monte_carlo(policy, items, cfg.rollouts, params)):
            if f"{sample['id']}/mc" in done:
                continue
            correct = int(grade_response(response, record)["correct"])  # graded here, as rollouts are
            labels = mc_labels(values, cfg.rule, cfg.threshold) + [correct]
            writer.write(_row(record, sample["id"], "mc", response, labels, values=values + [float(correct)]))
            stats["mc"] += 1

