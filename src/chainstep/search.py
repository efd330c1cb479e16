"""Decoding strategies: greedy, self-consistency, best-of-N, PRM-weighted vote, step beam search.

SC, BoN and the weighted vote choose among N sampled chains per question (`pass` is the
oracle: any of the N right); beam search builds one chain a step at a time: N candidate next
steps per question (generation stops at `<|reasoning_step_end|>` by token id), the PRM scores
each partial chain, the best `keep` continue, until an answer ends the chain. Beams of all
questions go through each generate / score call together. Every strategy reports its compute:
tokens generated and chains scored by the PRM.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from .answers import normalize
from .config import DEFAULT_SEARCH_TEMPERATURE, STRATEGIES, SearchConfig, check_strategy, check_style
from .errors import ChainstepError
from .evaluate import predict, response_row, sample_responses, summarize, update_metrics
from .judge import JudgeVerifier
from .layout import METRICS, beam_file, predictions_file, samples_file, temperature_file
from .records import replace_jsonl
from .sampling import Generation, Policy, SamplingParams, derived_seed
from .scoring import finished, score_samples
from .steps import ANSWER_END, STEP_END, leading_steps, parses
from .verifier import CheckedVerifier, Verifier


def _answer_key(row: dict) -> str | None:
    return normalize(row["predicted"]) if row["parsed"] else None


def majority_vote(rows: list[dict]) -> dict:
    """The first row carrying the most common parsed answer (the first row if none parse)."""
    counts = defaultdict(int)
    for row in rows:
        if (key := _answer_key(row)) is not None:
            counts[key] += 1
    if not counts:
        return rows[0]
    best = max(counts.values())
    return next(r for r in rows if counts.get(_answer_key(r), 0) == best)


def best_of_n(rows: list[dict], scores: list[float]) -> dict:
    """The best-scored chain that parses: the step grammar is an exact, free verifier (a chain
    that does not parse is scored wrong), so the PRM only ranks what passes it."""
    return rows[max(range(len(rows)), key=lambda i: (rows[i]["parsed"], scores[i]))]


def weighted_vote(rows: list[dict], scores: list[float]) -> dict:
    """The answer with the largest summed PRM score; its best-scored row."""
    mass = defaultdict(float)
    for row, score in zip(rows, scores):
        if (key := _answer_key(row)) is not None:
            mass[key] += score
    if not mass:
        return best_of_n(rows, scores)
    winner = max(mass, key=mass.get)
    picked = [i for i, r in enumerate(rows) if _answer_key(r) == winner]
    return rows[max(picked, key=lambda i: scores[i])]


def select(strategy: str, rows: list[dict], scores: list[float] | None = None) -> dict:
    """One prediction from N graded samples; `tokens` becomes the compute of all N."""
    if strategy == "pass":
        right = [r for r in rows if r["correct"]]
        chosen = right[0] if right else rows[0]
    elif strategy == "sc":
        chosen = majority_vote(rows)
    elif strategy in ("bon", "weighted"):
        if scores is None:
            raise ChainstepError(f"{strategy} needs PRM scores")
        chosen = (best_of_n if strategy == "bon" else weighted_vote)(rows, scores)
    else:
        raise ChainstepError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    return {**chosen, "id": chosen["question_id"], "tokens": sum(r["tokens"] for r in rows),
            "prm_chains": len(rows) if strategy in ("bon", "weighted") else 0}


def beam_search(policy: Policy, prm: Verifier, records: list[dict], n: int, keep: int = 1,
                temperature: float = DEFAULT_SEARCH_TEMPERATURE, step_tokens: int = 96, max_steps: int = 10,
                seed: int | None = None, extractor=None) -> tuple[list[dict], dict]:
    """Step-level beam search; returns graded rows (one per record) and its compute."""
    if n < keep:
        raise ChainstepError(f"beam search needs n >= keep (n={n}, keep={keep})")
    start, calls_before = time.time(), prm.forward_passes
    params = SamplingParams(n=max(1, n // keep), temperature=temperature, max_tokens=step_tokens,
                            stop_at_step=True, seed=seed)
    beams = {r["id"]: [""] for r in records}
    ended: dict[str, list[tuple[float, str]]] = defaultdict(list)
    tokens, chains = defaultdict(int), defaultdict(int)
    by_id = {r["id"]: r for r in records}
    verifier_s = 0.0
    for depth in range(max_steps + 1):
        active = [(qid, prefix) for qid, prefixes in beams.items() for prefix in prefixes]
        if not active:
            break
        last = depth == max_steps  # the final round must end the chain
        depth_params = replace(_final(params) if last else params, seed=derived_seed(seed, depth))
        gens = policy.generate([by_id[q] for q, _ in active], depth_params,
                               prefixes=[p for _, p in active], progress=False)
        candidates = [(qid, prefix + g.text, _done(g) or last)
                      for (qid, prefix), group in zip(active, gens) for g in group]
        for (qid, _), group in zip(active, gens):
            tokens[qid] += sum(g.num_tokens for g in group)
        scoring_start = time.time()
        step_scores = prm.score_continuations([by_id[q] for q, _ in active], [p for _, p in active],
                                              [[g.text for g in group] for group in gens])
        done = [d for _, _, d in candidates]
        scores = [prm.scoring(finished(s) if d else s)
                  for d, s in zip(done, (s for group in step_scores for s in group))]
        verifier_s += time.time() - scoring_start
        grouped = defaultdict(list)
        for (qid, text, done), score in zip(candidates, scores):
            grouped[qid].append((score, text, done))
            chains[qid] += 1
        for qid, options in grouped.items():
            ranked = sorted(options, key=lambda o: (well_formed(o[1], o[2]), o[0]), reverse=True)
            best = ranked[:keep - len(ended[qid])]
            ended[qid] += [(s, t) for s, t, done in best if done]
            beams[qid] = [t for _, t, done in best if not done]
    rows = []
    for record in records:
        score, text = max(ended[record["id"]], default=(0.0, ""))
        row = response_row(record, Generation(text, tokens[record["id"]], "stop"), extractor=extractor)
        rows.append({**row, "prm_chains": chains[record["id"]], "prm_score": score})
    compute = {"tokens_generated": sum(tokens.values()), "prm_chains": sum(chains.values()),
               "prm_forward_passes": prm.forward_passes - calls_before,
               "wall_s": round(time.time() - start, 2), "verifier_s": round(verifier_s, 2)}
    return rows, compute


def well_formed(text: str, done: bool) -> bool:
    """Does a (partial) chain keep the step grammar? Beam search keeps broken candidates only
    when no candidate of a question is well formed, as best-of-N does."""
    if done:
        return parses(text)
    return len(leading_steps(text)) == text.count(STEP_END)


def _done(gen: Generation) -> bool:
    return gen.finish_reason != "step" or ANSWER_END in gen.text


def _final(params: SamplingParams) -> SamplingParams:
    return SamplingParams(n=params.n, temperature=params.temperature, max_tokens=params.max_tokens * 4,
                          seed=params.seed)


def _sample_and_score(policy: Policy, prm: Verifier | None, records: list[dict], path, n: int,
                      temperature: float, max_tokens: int, seed: int, extractor=None):
    """N graded samples per record (resumable file) and their PRM scores (None without a PRM),
    with wall times; a PRM encodes each prompt once for its N samples. Also the learned PRM's own
    scores of the same chains when the verifier is that PRM under the checks (the control
    "learned alone"), from the same forward pass; else None."""
    start = time.time()
    samples = sample_responses(policy, records, path, SamplingParams(
        n=n, temperature=temperature, max_tokens=max_tokens, seed=seed), extractor=extractor)
    sample_s = time.time() - start
    rows = [r for rec in records for r in samples[rec["id"]]]
    start = time.time()
    recs, texts = [rec for rec in records for _ in range(n)], [r["response"] for r in rows]
    groups = [[r["response"] for r in samples[rec["id"]]] for rec in records]
    learned = None
    if isinstance(prm, CheckedVerifier) and prm.base is not None:
        learned = score_samples(prm.base, records, groups)
        scores = prm.combine(recs, texts, learned)
    else:
        scores = score_samples(prm, records, groups) if prm else [None] * len(rows)
    scores = [s if s is None else finished(s) for s in scores]
    score_s = time.time() - start
    by_q = {rec["id"]: (samples[rec["id"]], scores[i * n:(i + 1) * n]) for i, rec in enumerate(records)}
    return by_q, sample_s, score_s, learned


def _predictions(by_q: dict, strategy: str, n: int, prm: Verifier | None,
                 step_weight: float | None = None) -> list[dict]:
    preds = []
    for rows, scores in by_q.values():
        chain = None
        if prm is not None:
            rule = prm.scoring if step_weight is None else prm.scoring.with_step_weight(step_weight)
            chain = [rule(s) for s in scores[:n]]
        preds.append(select(strategy, rows[:n], chain))
    return preds


def choose_temperature(policy: Policy, prm: Verifier, records: list[dict], cfg: SearchConfig,
                       out_dir: Path, max_tokens: int, seed: int = 0) -> tuple[float, list[dict]]:
    """Sample the val questions at each temperature; the best BoN accuracy (then SC, then the
    lower temperature) picks the one used. Every temperature tried is recorded, a single one too."""
    n = min(8, max(cfg.ns))
    sweep = []
    for t in cfg.temperatures:
        by_q, _, score_s, _ = _sample_and_score(policy, prm, records, temperature_file(out_dir, t), n, t,
                                                max_tokens, seed)
        row = {"temperature": t, "n": n, "questions": len(records), "verifier_s": round(score_s, 2)}
        row["sample"] = sum(r["correct"] for rows, _ in by_q.values() for r in rows) / (n * len(by_q))
        for strategy in ("pass", "sc", "bon"):
            preds = _predictions(by_q, strategy, n, prm)
            row[strategy] = sum(p["correct"] for p in preds) / len(preds)
        sweep.append(row)
    best = max(sweep, key=lambda r: (r["bon"], r["sc"], -r["temperature"]))
    return best["temperature"], sweep


def evaluate_search(policy: Policy, prm: Verifier, records: list[dict], cfg: SearchConfig, out_dir: Path,
                    temperature: float, model: str, split: str, max_tokens: int,
                    seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """Every strategy at every N on `records`: results rows, step-weight ablation rows, and the
    per-strategy predictions at the largest N (for paired comparisons)."""
    top = max(cfg.ns)
    path = samples_file(out_dir, model, split)
    by_q, sample_s, score_s, learned = _sample_and_score(policy, prm, records, path, top, temperature,
                                                         max_tokens, seed)
    results, final = [], {}
    for n in cfg.ns:
        for strategy in ("pass", "sc", "bon", "weighted"):
            preds = _predictions(by_q, strategy, n, prm)
            uses_prm = strategy in ("bon", "weighted")
            wall = (sample_s + (score_s if uses_prm else 0)) * n / top
            verifier_s = {"verifier_s": round(score_s * n / top, 2)} if uses_prm else {}
            results.append({**summarize(preds, model, strategy, n, split),
                            **_compute(preds, wall, estimated=True), **verifier_s,
                            "temperature": temperature})
            if n == top:
                final[strategy] = preds
    for n in cfg.beam_ns:
        path = beam_file(out_dir, model, split, n)
        preds, compute = beam_search(policy, prm, records, n, cfg.keep, temperature, cfg.step_tokens,
                                     cfg.max_steps, seed)
        replace_jsonl(path, preds)
        results.append({**summarize(preds, model, "beam", n, split), **compute,
                        "temperature": temperature})
        if n == max(cfg.beam_ns):
            final["beam"] = preds
    for name, scores in verifier_controls(records, by_q, top, learned).items():
        control = {qid: (rows, scores[qid]) for qid, (rows, _) in by_q.items()}
        for strategy in ("bon", "weighted"):
            preds = _predictions(control, strategy, top, prm)
            results.append({**summarize(preds, model, f"{strategy}[{name}]", top, split),
                            "temperature": temperature, "control": name})
            final[f"{strategy}[{name}]"] = preds
    ablation = []
    for w in cfg.step_weights:
        preds = _predictions(by_q, "bon", top, prm, step_weight=w)
        row = summarize(preds, model, "bon", top, split)
        ablation.append({"step_weight": w, "n": top, "accuracy": row["accuracy"],
                         "ci_low": row["ci_low"], "ci_high": row["ci_high"]})
    return results, ablation, final


def verifier_controls(records: list[dict], by_q: dict, n: int,
                      learned: list | None = None) -> dict[str, dict[str, list]]:
    """Other verifiers' scores of the same sampled chains, per question: the checks alone, the
    learned PRM alone (`learned`: its scores, in sampling order, when the search verifier is the
    PRM under the checks) and the programmatic judge as an oracle (tasks with step facts)."""
    recs = [rec for rec in records for _ in range(n)]
    texts = [row["response"] for rows, _ in by_q.values() for row in rows[:n]]
    scorers = {"checks": CheckedVerifier().score}
    if all(rec.get("meta", {}).get("steps") for rec in records):
        scorers["judge"] = JudgeVerifier().score
    flat = {name: score(recs, texts) for name, score in scorers.items()}
    if learned is not None:
        flat["learned"] = learned
    return {name: {rec["id"]: [finished(s) for s in scores[i * n:(i + 1) * n]]
                   for i, rec in enumerate(records)} for name, scores in flat.items()}


def _compute(preds: list[dict], wall_s: float, estimated: bool) -> dict:
    return {"tokens_generated": sum(p["tokens"] for p in preds),
            "prm_chains": sum(p["prm_chains"] for p in preds),
            "wall_s": round(wall_s, 2), "wall_s_estimated": estimated}


def evaluate_strategy(policy: Policy, records: list[dict], out_dir: Path, name: str, split: str,
                      settings: dict, style: str = "cos", strategy: str = "greedy", n: int = 1,
                      prm: Verifier | None = None, temperature: float = DEFAULT_SEARCH_TEMPERATURE,
                      extractor=None) -> dict:
    """What `chainstep eval` runs: greedy decoding, or one strategy at one N, on `records`; its
    row (with `settings`, what the result needs to be reproduced, and the verifier's rule) is
    added to `out_dir/metrics.json` and returned."""
    check_style(style, strategy)
    if strategy == "greedy":
        preds = predict(policy, records, predictions_file(out_dir, name, split), style,
                        SamplingParams(max_tokens=settings["max_tokens"]), extractor)
        compute, n = {}, 1
    else:
        if prm is not None:
            settings = {**settings, "scoring": prm.scoring.describe()}
        preds, compute = search_predictions(strategy, policy, records, n, out_dir, name, split, prm,
                                            temperature, settings["max_tokens"], extractor=extractor)
    row = {**summarize(preds, name, strategy, n, split), **compute, **settings}
    update_metrics(Path(out_dir) / METRICS, [row])
    return row


def search_predictions(strategy: str, policy: Policy, records: list[dict], n: int, out_dir: Path,
                       name: str, split: str, prm: Verifier | None = None,
                       temperature: float = DEFAULT_SEARCH_TEMPERATURE, max_tokens: int = 256,
                       cfg: SearchConfig | None = None, seed: int = 0,
                       extractor=None) -> tuple[list[dict], dict]:
    """One strategy at one N (what `chainstep eval --strategy S --n N` runs): predictions and compute.
    `extractor` (benchmarks only) reads answers the rules cannot, before voting or selection."""
    cfg = cfg or SearchConfig()
    check_strategy(strategy, prm is not None)
    if strategy == "beam":
        return beam_search(policy, prm, records, n, cfg.keep, temperature, cfg.step_tokens,
                           cfg.max_steps, seed, extractor)
    if strategy not in ("sc", "pass", "bon", "weighted"):
        raise ChainstepError(f"unknown strategy {strategy!r}; choose from {STRATEGIES}")
    start = time.time()
    path = samples_file(out_dir, name, split, temperature)
    scorer = prm if strategy in ("bon", "weighted") else None
    by_q, *_ = _sample_and_score(policy, scorer, records, path, n, temperature, max_tokens, seed, extractor)
    preds = _predictions(by_q, strategy, n, scorer)
    return preds, _compute(preds, time.time() - start, estimated=False)
