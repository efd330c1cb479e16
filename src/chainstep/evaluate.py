"""Evaluation: predictions, accuracy with 95% intervals, and paired model comparisons.

Unparseable outputs are scored wrong and counted in `parse_failure_rate` (the upstream code
silently dropped them). On tasks that keep their step facts (the synthetic suite) the
programmatic judge also checks every step: `right_chain_rate` is the share of answers whose
whole chain is right, which tells reasoning from lucky guesses. Every accuracy carries a Wilson
95% interval, and two models are compared on the same questions (paired difference with its
interval, exact McNemar p-value): a few hundred questions cannot resolve a 3-point gap, and the
report says so.

    chainstep eval runs/x/models/sft runs/x/tasks/test.jsonl --out runs/x/eval
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from .config import check_style
from .errors import ChainstepError
from .grading import grade_response
from .records import JsonlWriter, family_of, iter_jsonl, mean_of, settings_path, write_json
from .sampling import Generation, Policy, SamplingParams, seeded_chunks

Z95 = 1.959963984540054


def response_row(record: dict, gen: Generation, style: str = "cos", row_id: str | None = None,
                 extractor=None) -> dict:
    """One graded response, as predictions and samples files hold it."""
    return {"id": row_id or record["id"], "question_id": record["id"], "family": family_of(record),
            "answer": record["answer"], "response": gen.text, "tokens": gen.num_tokens,
            "finish_reason": gen.finish_reason, "grammar_interventions": gen.grammar_interventions,
            "grammar_error": gen.grammar_error,
            **grade_response(gen.text, record, style, extractor)}


def sample_stats(rows: list[dict]) -> dict:
    """What a stage reports about the chains it sampled: how many, how many right and parsed,
    and on how many the step grammar had to act."""
    def mean(values) -> float | None:
        value = mean_of(values)
        return None if value is None else round(value, 4)

    return {"chains": len(rows), "correct": mean(r["correct"] for r in rows),
            "parsed": mean(r["parsed"] for r in rows),
            "grammar_acted": mean(r.get("grammar_interventions", 0) > 0 for r in rows),
            "grammar_errors": mean(r.get("grammar_error", False) for r in rows),
            "tokens": mean(r["tokens"] for r in rows),
            "steps": mean(r["steps"] for r in rows)}


def generation_settings(policy: Policy, params: SamplingParams, style: str, extractor=None) -> dict:
    """What a predictions file's rows depend on: the model (its weights' fingerprint), the
    decoding settings, the grading style and answer extraction."""
    return {"model": getattr(policy, "fingerprint", None), "params": asdict(params), "style": style,
            "extraction": f"llm:{getattr(extractor.client, 'model', '?')}" if extractor else "rules"}


def resumable_rows(out_path: Path, settings: dict) -> dict[str, dict]:
    """Rows already in `out_path`, by id, if they were made with `settings`; a file made with
    other settings is refused rather than mixed into the new results. The settings live beside
    the file (`NAME.settings.json`)."""
    beside = settings_path(out_path)
    settings = json.loads(json.dumps(settings))
    if out_path.exists() and out_path.stat().st_size:
        saved = json.loads(beside.read_text()) if beside.exists() else None
        if saved != settings:
            changed = sorted(k for k in settings if saved is None or saved.get(k) != settings[k])
            raise ChainstepError(
                f"{out_path} holds rows made with other settings ({', '.join(changed)} differ"
                f"{'; no ' + beside.name if saved is None else ''}); write to another --out or "
                "delete the file to start again")
        return {p["id"]: p for p in iter_jsonl(out_path)}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(beside, settings)
    return {}


def predict(policy: Policy, records: list[dict], out_path: str | Path, style: str = "cos",
            params: SamplingParams | None = None, extractor=None) -> list[dict]:
    """Greedy (by default) predictions, appended to `out_path` and resumed by id."""
    check_style(style)
    out_path = Path(out_path)
    params = params or SamplingParams()
    done = resumable_rows(out_path, generation_settings(policy, params, style, extractor))
    todo = [r for r in records if r["id"] not in done]
    with JsonlWriter(out_path) as writer:
        for start in range(0, len(todo), 256):
            chunk = todo[start:start + 256]
            for record, gens in zip(chunk, policy.generate(chunk, params)):
                row = response_row(record, gens[0], style, extractor=extractor)
                writer.write(row)
                done[row["id"]] = row
    return [done[r["id"]] for r in records]


def sample_responses(policy: Policy, records: list[dict], out_path: str | Path,
                     params: SamplingParams, style: str = "cos",
                     extractor=None) -> dict[str, list[dict]]:
    """`params.n` graded samples per record (ids `QID#j`), appended and resumed by id;
    returns question id -> its samples in order."""
    out_path = Path(out_path)
    done = resumable_rows(out_path, generation_settings(policy, params, style, extractor))
    ids = {r["id"]: [f"{r['id']}#{j}" for j in range(params.n)] for r in records}
    with JsonlWriter(out_path) as writer:
        for chunk, seed in seeded_chunks(records, params.seed, key=lambda r: r["id"],
                                         pending=lambda r: any(i not in done for i in ids[r["id"]])):
            for record, gens in zip(chunk, policy.generate(chunk, replace(params, seed=seed))):
                for row_id, gen in zip(ids[record["id"]], gens):
                    if row_id not in done:
                        done[row_id] = response_row(record, gen, style, row_id, extractor)
                        writer.write(done[row_id])
    return {qid: [done[i] for i in row_ids] for qid, row_ids in ids.items()}


def wilson(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval: sane at 0% and 100%, unlike the normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if correct == 0 else max(0.0, centre - half)  # exact at the ends, not 1e-18 off
    return low, 1.0 if correct == n else min(1.0, centre + half)


def summarize(predictions: list[dict], model: str, strategy: str = "greedy", n: int = 1,
              split: str = "test") -> dict:
    """One `results` row of metrics.json."""
    by_family: dict[str, list[bool]] = defaultdict(list)
    for p in predictions:
        by_family[p["family"]].append(bool(p["correct"]))
    total = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    low, high = wilson(correct, total)
    parsed = [p for p in predictions if p["parsed"]]
    with_steps = [p["steps"] for p in parsed if p.get("steps") is not None]
    checked = [p["steps_right"] for p in predictions if p.get("steps_right") is not None]
    return {
        "model": model, "strategy": strategy, "n": n, "split": split,
        "accuracy": correct / total if total else 0.0, "ci_low": low, "ci_high": high,
        "num_questions": total,
        "per_family": {f: sum(v) / len(v) for f, v in sorted(by_family.items())},
        "per_family_ci": {f: list(wilson(sum(v), len(v))) for f, v in sorted(by_family.items())},
        "parse_failure_rate": 1 - len(parsed) / total if total else 0.0,
        "avg_steps": sum(with_steps) / len(with_steps) if with_steps else 0.0,
        "avg_tokens": sum(p["tokens"] for p in predictions) / total if total else 0.0,
        "right_chain_rate": sum(checked) / len(checked) if checked else None,
    }


def mcnemar_p(only_a: int, only_b: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs."""
    k, n = min(only_a, only_b), only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * _binomial_cdf(k, n, 0.5))


def _binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space: a pooled comparison over seeds has
    thousands of discordant pairs, and their binomial coefficients overflow a float."""
    if p <= 0.0 or p >= 1.0:
        return float(p <= 0.0 or k >= n)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
            + i * math.log(p) + (n - i) * math.log1p(-p) for i in range(k + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """Exact interval for a binomial proportion (bisection on the binomial tails)."""
    def solve(tail) -> float:
        low, high = 0.0, 1.0
        for _ in range(60):
            mid = (low + high) / 2
            low, high = (mid, high) if tail(mid) else (low, mid)
        return (low + high) / 2
    lower = 0.0 if k == 0 else solve(lambda p: 1 - _binomial_cdf(k - 1, n, p) < alpha / 2)
    upper = 1.0 if k == n else solve(lambda p: _binomial_cdf(k, n, p) > alpha / 2)
    return lower, upper


def paired_comparison(a: list[dict], b: list[dict], name_a: str, name_b: str) -> dict:
    """Accuracy of `a` minus `b` on the questions both answered, with an exact 95% interval.

    Only the discordant questions carry information: given m of them, `only_a` is binomial with
    share pi, and the difference is (m / n)(2 pi - 1). The interval maps pi's Clopper-Pearson
    interval through that line, so it excludes 0 exactly when the exact McNemar p is below 0.05,
    and `significant` says the same as both.
    """
    b_by_id = {p["id"]: p["correct"] for p in b}
    pairs = [(bool(p["correct"]), bool(b_by_id[p["id"]])) for p in a if p["id"] in b_by_id]
    n = len(pairs)
    only_a = sum(x and not y for x, y in pairs)
    only_b = sum(y and not x for x, y in pairs)
    discordant = only_a + only_b
    diff = (only_a - only_b) / n if n else 0.0
    low = high = 0.0
    if discordant:
        share_low, share_high = clopper_pearson(only_a, discordant)
        low, high = ((discordant / n) * (2 * s - 1) for s in (share_low, share_high))
    p_value = mcnemar_p(only_a, only_b)
    return {"a": name_a, "b": name_b, "n": n, "diff": diff, "ci_low": low, "ci_high": high,
            "only_a_correct": only_a, "only_b_correct": only_b, "p_value": p_value,
            "significant": p_value < 0.05, "detectable": detectable_difference(n, discordant)}


def detectable_difference(n: int, discordant: int, z_alpha: float = Z95,
                          z_power: float = 0.8416) -> float | None:
    """The smallest accuracy difference this paired test finds 80% of the time at 5% (McNemar's
    normal approximation, n = (z_a + z_b)^2 d / delta^2, d the share of discordant questions seen,
    at least one): what a non-significant comparison can rule out, and what it cannot."""
    if not n:
        return None
    share = max(discordant, 1) / n
    return min(1.0, (z_alpha + z_power) * math.sqrt(share / n))


def update_metrics(path: str | Path, results: list[dict] = (),
                   comparisons: list[dict] = (), **sections) -> dict:
    """Merge rows into metrics.json, replacing rows with the same key; other keyword arguments
    replace whole top-level sections (`prm`, `search`, ...)."""
    path = Path(path)
    metrics = json.loads(path.read_text()) if path.exists() else {}
    def merge(old: list[dict], new, key) -> list[dict]:
        kept = {key(r): r for r in old}
        kept.update({key(r): r for r in new})
        return list(kept.values())
    metrics["results"] = merge(metrics.get("results", []), results,
                               lambda r: (r["model"], r["strategy"], r["n"], r["split"]))
    metrics["comparisons"] = merge(metrics.get("comparisons", []), comparisons,
                                   lambda r: (r["a"], r["b"], r.get("split", "test")))
    metrics.update(sections)
    write_json(path, metrics)
    return metrics
