"""`chainstep run`: tasks -> teacher data -> perception pretraining -> SFT (CoS and direct
answer) -> evaluation -> sampled chains -> step labels -> PRM -> PRM-guided search -> iterative
DPO and GRPO -> report.

Each stage writes into the run directory and leaves a marker in `stages/` when it finishes,
so re-running skips finished stages, and a stage killed mid-way resumes from its own files
(JSONL records keyed by id, trainer checkpoints).

    chainstep run --quick            # ~3 minutes on 2 CPU cores
    chainstep run --out runs/main    # the default profile, about an hour on 2 CPU cores
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console

from . import models
from .config import SEED_STRIDE, PRMConfig, RunConfig, dump_config, to_dict
from .construct import construct, write_plain
from .dpo import continued_sft_control, iterative_dpo, pair_source_ablation, rft_control
from .errors import ChainstepError
from .evaluate import paired_comparison, predict, sample_responses, sample_stats, summarize, update_metrics
from .grpo import train_grpo, variant
from .label import label
from .layout import MODE_RUNS, POLICIES, RunLayout, model_summary
from .pretrain import pretrain
from .prm_metrics import TRACE_CHAINS, check_quality, evaluate_prm, label_agreement, score_rows, write_traces
from .prm_train import train_prm
from .records import load_tasks, read_jsonl, write_json
from .report import write_report
from .sampling import Policy, SamplingParams
from .search import beam_search, choose_temperature, evaluate_search
from .synthetic import make_tasks
from .teacher import ProgrammaticTeacher
from .train_sft import train_sft
from .verifier import PARTS, CheckedVerifier, Verifier, compose, load_verifier, record_choice

console = Console(stderr=True)


def policies(cfg: RunConfig) -> list[str]:
    """The SFT policies a run trains: CoS and the direct baseline, and with
    `grpo.reasoning_modes` the plain-reasoning policy."""
    return [name for name in POLICIES if name != "cot" or cfg.grpo.reasoning_modes]


def style_of(name: str) -> str:
    """How a run's model answers: its own style, or that of the policy it was improved from."""
    return POLICIES.get(name) or POLICIES[MODE_RUNS.get(name, "sft")]


class Run:
    """One run: its config, its directory's layout (`paths`), and stage bookkeeping."""

    def __init__(self, cfg: RunConfig, out: str | Path):
        self.cfg, self.paths = cfg, RunLayout(out)
        self.dir = self.paths.root

    def check_config(self) -> None:
        saved = self.paths.config_json
        current = to_dict(self.cfg)
        if saved.exists() and json.loads(saved.read_text()) != json.loads(json.dumps(current)):
            raise ChainstepError(
                f"{self.dir} was started with a different config; resume it with the same "
                "options, or pass a new --out")
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(saved, current)
        dump_config(self.cfg, self.paths.config_yaml)

    def stage(self, name: str, fn: Callable[[], dict | None]) -> None:
        marker = self.paths.stage_marker(name)
        if marker.exists():
            console.print(f"[dim]{name}: done, skipping[/dim]")
            return
        console.rule(f"[bold]{name}")
        start = time.time()
        info = fn() or {}
        info["seconds"] = round(time.time() - start, 1)
        marker.parent.mkdir(exist_ok=True)
        write_json(marker, info)
        console.print(f"{name}: {info}")


def run(cfg: RunConfig, out: str | Path) -> Path:
    """The whole pipeline; returns the run directory."""
    torch.set_num_threads(cfg.threads)
    r = Run(cfg, out)
    with r.paths.lock():
        r.check_config()
        r.cfg = cfg.seeded()
        _stages(r)
    return r.dir


def _stages(r: Run) -> None:
    cfg = r.cfg
    r.stage("tasks", lambda: make_tasks(cfg.suite, r.paths.tasks))
    r.stage("construct", lambda: construct(r.paths.split("train"), r.paths.data,
                                           ProgrammaticTeacher(cfg.suite.seed), cfg.filter))
    r.stage("init_model", lambda: init_model(r))
    r.stage("pretrain", lambda: pretrain_perception(r))
    r.stage("sft", lambda: _train(r, "sft", cfg.sft))
    r.stage("base", lambda: _train(r, "base", cfg.base_sft))
    r.stage("cot", lambda: _train_plain(r) if cfg.grpo.reasoning_modes
            else {"skipped": "grpo.reasoning_modes is false"})
    r.stage("eval", lambda: evaluate_policies(r))
    r.stage("sample", lambda: sample_chains(r))
    r.stage("label", lambda: label_chains(r))
    r.stage("prm", lambda: _train_prm(r))
    r.stage("prm_eval", lambda: evaluate_verifier(r))
    r.stage("search", lambda: search(r))
    r.stage("dpo", lambda: improve_dpo(r))
    r.stage("grpo", lambda: improve_grpo(r))
    r.stage("policy_eval", lambda: evaluate_improved(r))
    r.stage("report", lambda: {"report": r.paths.relative(write_report(r.dir))})


def init_model(r: Run) -> dict:
    """A tiny model built on the suite's text, or a local VLM with the step tokens added."""
    cfg = r.cfg.model
    if cfg.path:
        model, processor = models.load(cfg.path)
        added = models.add_step_tokens(model, processor)
        meta = {"from_scratch": False, "source": cfg.path, "added_tokens": added}
    else:
        rows = read_jsonl(r.paths.teacher_data("cos"))
        texts = [row["question"] for row in rows] + [row["response"] for row in rows]
        tokenizer = models.train_tokenizer(texts, vocab_size=cfg.vocab_size)
        model, processor = models.build_tiny(cfg.arch, tokenizer, cfg.size, cfg.seed)
        meta = {"from_scratch": True, "arch": cfg.arch, "size": cfg.size}
    meta["parameters"] = models.count_parameters(model)
    models.save(model, processor, r.paths.model("init"), meta=meta)
    return meta


def _pretrains(cfg: RunConfig) -> bool:
    return cfg.pretrain.enabled and not cfg.model.path


def pretrain_perception(r: Run) -> dict:
    """The tiny model's vision tower learns to see (or comes from the cache); a local
    checkpoint already sees, and starts SFT as it is."""
    if not _pretrains(r.cfg):
        return {"skipped": "a local checkpoint" if r.cfg.model.path else "pretrain.enabled is false"}
    return pretrain(r.paths.model("init"), r.paths.model("pretrained"), r.cfg.suite, r.cfg.pretrain)


def _start_model(r: Run) -> Path:
    return r.paths.model("pretrained" if _pretrains(r.cfg) else "init")


def _train(r: Run, name: str, sft_cfg) -> dict:
    """One policy's SFT; with `val_every`, its greedy val curve is recorded as it trains."""
    style = POLICIES[name]
    val = load_tasks(r.paths.split("val")) if sft_cfg.val_every else None
    train_sft(_start_model(r), r.paths.teacher_data(style), r.paths.model(name), sft_cfg, val, style,
              r.cfg.eval.batch_size)
    meta = model_summary(r.paths.model(name))
    keys = ("train_loss_first", "train_loss_last", "train_runtime_s", "val_curve")
    return {k: meta[k] for k in keys if k in meta}


def _train_plain(r: Run) -> dict:
    write_plain(r.paths.teacher_data("cos"), r.paths.teacher_data("cot"))
    return _train(r, "cot", r.cfg.sft)


def evaluate_policies(r: Run) -> dict:
    """Greedy predictions of every policy on every eval split, then paired comparisons."""
    params = SamplingParams(max_tokens=r.cfg.eval.max_tokens)
    results, comparisons = [], []
    for split in r.cfg.eval.splits:
        records = load_tasks(r.paths.split(split))
        preds = {}
        for name in policies(r.cfg):
            policy = Policy.from_dir(r.paths.model(name), batch_size=r.cfg.eval.batch_size)
            preds[name] = predict(policy, records, r.paths.predictions(name, split), POLICIES[name], params)
            results.append(summarize(preds[name], name, split=split))
        for a, b in (("sft", "base"), ("cot", "base"), ("sft", "cot")):
            if a in preds and b in preds:
                comparisons.append({**paired_comparison(preds[a], preds[b], a, b), "split": split})
    update_metrics(r.paths.metrics, results, comparisons)
    return {f"{row['model']}/{row['split']}": round(row["accuracy"], 3) for row in results}


def _first(records: list[dict], count: int) -> list[dict]:
    return records[:count] if count else records


def _policy(r: Run, name: str = "sft") -> Policy:
    return Policy.from_dir(r.paths.model(name), batch_size=r.cfg.eval.batch_size)


def sample_chains(r: Run) -> dict:
    """Policy chains for PRM training (train split) and evaluation (val split)."""
    cfg, policy = r.cfg.label, _policy(r)
    params = SamplingParams(n=cfg.samples, temperature=cfg.sample_temperature,
                            max_tokens=r.cfg.eval.max_tokens, seed=cfg.seed)
    info = {}
    for split, count in (("train", cfg.questions), ("val", cfg.val_questions)):
        records = _first(load_tasks(r.paths.split(split)), count)
        got = sample_responses(policy, records, r.paths.samples(split), params)
        rows = [row for rows in got.values() for row in rows]
        info[split] = sample_stats(rows)
    return info


def label_chains(r: Run) -> dict:
    """MC + judge labels on train chains, plus perturbed teacher chains of every train question
    DPO and GRPO leave alone (the PRM never scores chains of questions it was trained on); val
    chains get judge labels (exact on the synthetic suite) and MC labels on as many as the
    report's trace viewer shows."""
    cfg, policy = r.cfg.label, _policy(r)
    train = load_tasks(r.paths.split("train"))
    val = _first(load_tasks(r.paths.split("val")), cfg.val_questions)
    shares = train_shares(r.cfg)
    improved = {x["id"] for x in train[shares["dpo"].start:shares["grpo"].stop]}
    return {
        "train": label(read_jsonl(r.paths.samples("train")), train, r.paths.labels("train"),
                       cfg, policy, perturb_records=[x for x in train if x["id"] not in improved]),
        "val": label(read_jsonl(r.paths.samples("val")), val, r.paths.labels("val"),
                     replace(cfg, perturbed=0, mc_chains=min(cfg.mc_chains or TRACE_CHAINS, TRACE_CHAINS)),
                     policy),
    }


def _train_prm(r: Run) -> dict:
    info = {}
    if r.cfg.prm.init == "policy":
        start = r.paths.model("sft")
    elif r.cfg.prm.init == "larger":
        start, info["base"] = _larger_base(r)
    else:
        start = Path(r.cfg.prm.init)
    train_prm(start, r.paths.labels("train"), r.paths.model("prm"), r.cfg.prm)
    meta = model_summary(r.paths.model("prm"))
    keys = ("chains", "train_loss_first", "train_loss_last", "train_runtime_s")
    return {**info, **{k: meta[k] for k in keys}}


def _language_width(size: str) -> int:
    return models.SIZES[size].hidden * models.SIZES[size].layers


def _larger_base(r: Run) -> tuple[Path, dict]:
    """The verifier's own start, bigger than the policy (the paper pairs a 38B PRM with 8B
    policies): a tiny VLM of size `prm.size` on the policy's tokenizer, with its own pretrained
    vision tower (cached like the policy's)."""
    if r.cfg.model.path:
        raise ChainstepError("prm.init=larger builds a bigger tiny model; with model.path set, point "
                             "prm.init at a larger local checkpoint (or use prm.init=policy)")
    size, arch = r.cfg.prm.size, r.cfg.model.arch
    if size not in models.SIZES or _language_width(size) <= _language_width(r.cfg.model.size):
        raise ChainstepError(f"prm.size={size} must be a model size larger than model.size="
                             f"{r.cfg.model.size} (sizes: {', '.join(models.SIZES)})")
    init, pretrained = r.paths.model("prm-init"), r.paths.model("prm-pretrained")
    if not (init / "config.json").exists():
        _, processor = models.load(r.paths.model("init"))
        model, processor = models.build_tiny(arch, processor.tokenizer, size, r.cfg.model.seed + 1)
        models.save(model, processor, init, meta={"from_scratch": True, "arch": arch, "size": size,
                                                  "parameters": models.count_parameters(model)})
    if not r.cfg.pretrain.enabled:
        return init, {"size": size, "pretrain": "disabled"}
    cache = pretrain(init, pretrained, r.cfg.suite, r.cfg.pretrain)["cache"]
    return pretrained, {"size": size, "pretrain": cache}


def _prm(r: Run) -> Verifier:
    """The run's verifier, scoring with the rule it was trained with (`prm.step_weight`,
    `prm.aggregate`), as DPO and GRPO read it too."""
    return load_verifier(r.paths.model("prm"), batch_size=r.cfg.eval.batch_size)


def evaluate_verifier(r: Run) -> dict:
    """The learned PRM, the checks and both on held-out chains against judge labels (each chain
    scored once by the PRM), and the MC/judge agreement. The run's verifier from here on is the
    one `prm.choose_on_val` picks by val ranking (else the PRM, with the checks if `prm.checks`),
    recorded beside the PRM for every consumer."""
    rows = read_jsonl(r.paths.labels("val"))
    judged = [row for row in rows if row["source"] == "judge"]
    learned = load_verifier(r.paths.model("prm"), batch_size=r.cfg.eval.batch_size, checks=False)
    learned_scores = score_rows(learned, judged)
    verifiers = {name: compose(learned, parts) for name, parts in PARTS.items()}
    results = {name: evaluate_prm(verifier, judged, _scores_over(verifier, judged, learned_scores))
               for name, verifier in verifiers.items()}
    chosen = _chosen_verifier(r.cfg.prm, results)
    record_choice(r.paths.model("prm"), chosen, {name: m["ranking_auroc"] for name, m in results.items()})
    controls = {name: {k: v for k, v in m.items() if "ranking" in k} for name, m in results.items()}
    metrics = {**results[chosen], "verifier": chosen, "chosen_on_val": r.cfg.prm.choose_on_val,
               "mc_judge_agreement": label_agreement(rows), "checks": check_quality(judged),
               "controls": controls}
    update_metrics(r.paths.metrics, prm=metrics)
    write_traces(verifiers[chosen], rows, r.paths.traces)
    return {k: v for k, v in metrics.items() if isinstance(v, float | str)}


def _scores_over(verifier: Verifier, rows: list[dict], learned: list) -> list:
    """`verifier`'s scores of `rows` from the learned PRM's (`learned`), so each chain is
    scored by the PRM once."""
    if not isinstance(verifier, CheckedVerifier):
        return learned
    return verifier.combine(rows, [row["response"] for row in rows], learned if verifier.base else None)


def _chosen_verifier(cfg: PRMConfig, results: dict[str, dict]) -> str:
    """The best val ranking (ties: the PRM with the checks first), or what the config says."""
    if not cfg.choose_on_val:
        return "learned PRM with checks" if cfg.checks else "learned PRM alone"
    return max(results, key=lambda name: results[name]["ranking_auroc"] or 0.0)


def _search_questions(r: Run) -> tuple[list[dict], str]:
    """The questions search runs on (`search.questions` of `search.split`), and their split name
    ("test[:32]" for a slice)."""
    name = r.cfg.search.split
    everything = load_tasks(r.paths.split(name))
    records = _first(everything, r.cfg.search.questions)
    return records, name if len(records) == len(everything) else f"{name}[:{len(records)}]"


def _greedy(r: Run, model: str, records: list[dict]) -> list[dict]:
    """`model`'s greedy answers to `records`, from its evaluation of `search.split` (made now
    where the eval stage did not cover that split)."""
    path = r.paths.predictions(model, r.cfg.search.split)
    return predict(_policy(r, model), records, path, "cos", SamplingParams(max_tokens=r.cfg.eval.max_tokens))


def search(r: Run) -> dict:
    """SC / BoN / weighted vote / beam search at each N on (a slice of) the test split."""
    cfg, policy, prm = r.cfg.search, _policy(r), _prm(r)
    val = _first(load_tasks(r.paths.split("val")), cfg.val_questions)
    seed = _search_seed(r.cfg)
    temperature, sweep = choose_temperature(policy, prm, val, cfg, r.paths.eval, r.cfg.eval.max_tokens, seed)
    records, split = _search_questions(r)
    results, ablation, final = evaluate_search(policy, prm, records, cfg, r.paths.eval, temperature, "sft",
                                               split, r.cfg.eval.max_tokens, seed)
    greedy = _greedy(r, "sft", records)
    results.append(summarize(greedy, "sft", "greedy", 1, split))
    final["greedy"] = greedy
    top = max(cfg.ns)
    labels = {s: f"sft/{s}@{top if s != 'greedy' else 1}" for s in final}
    pairs = [(s, base) for s in final if s not in ("greedy", "sc", "pass") for base in ("greedy", "sc")]
    comparisons = [{**paired_comparison(final[a], final[b], labels[a], labels[b]), "split": split}
                   for a, b in [*pairs, ("sc", "greedy")] if a in final and b in final]
    update_metrics(r.paths.metrics, results, comparisons,
                   search={"temperature": temperature, "temperature_sweep": sweep,
                           "step_weight_ablation": ablation, "split": split,
                           "scoring": prm.scoring.describe(),
                           "verifier_s": _verifier_seconds(results, sweep, top)})
    return {"temperature": temperature, **{f"{row['strategy']}@{row['n']}": round(row["accuracy"], 3)
                                           for row in results if row["n"] in (1, top)}}


def _verifier_seconds(results: list[dict], sweep: list[dict], top: int) -> float:
    """Seconds the verifier spent scoring in search: the temperature sweep, the top-N samples
    (scored once for best-of-N and the weighted vote) and every beam."""
    scored = [r for r in results if (r["strategy"] == "bon" and r["n"] == top) or r["strategy"] == "beam"]
    return round(sum(r.get("verifier_s", 0) for r in [*scored, *sweep]), 1)


def _search_seed(cfg: RunConfig) -> int:
    return SEED_STRIDE * cfg.seed


def train_shares(cfg: RunConfig) -> dict[str, slice]:
    """Which train questions each stage that samples from the policy owns, in this order: the
    PRM's labels, then DPO, then GRPO. Disjoint, so the PRM never scores chains of questions it
    was trained on."""
    ends = {"label": cfg.label.questions, "dpo": cfg.dpo.questions, "grpo": cfg.grpo.questions}
    shares, start = {}, 0
    for stage, count in ends.items():
        shares[stage] = slice(start, start + count)
        start += count
    return shares


def _train_questions(r: Run, stage: str) -> list[dict]:
    share = train_shares(r.cfg)[stage]
    train = load_tasks(r.paths.split("train"))
    if len(train) < share.stop:
        raise ChainstepError(f"the train split has {len(train)} questions; {share.stop} are needed "
                             "(raise suite.train or lower dpo.questions / grpo.questions)")
    return train[share]


def improve_dpo(r: Run) -> dict:
    """Iterative DPO on PRM-scored pairs, then round 1 with the other pair sources."""
    cfg = r.cfg.dpo
    records = _train_questions(r, "dpo")
    args = (r.paths.model("sft"), r.paths.model("prm"), records, r.dir, cfg, r.cfg.eval.batch_size)
    rounds = iterative_dpo(*args)
    control = rft_control(r.paths.model("sft"), records, r.dir, cfg, rounds)
    continued = continued_sft_control(r.paths.model("sft"), r.paths.teacher_data("cos"), records,
                                      r.dir, cfg, rounds)
    ablation = pair_source_ablation(*args)
    update_metrics(r.paths.metrics, dpo={"rounds": rounds, "ablation": ablation, "control": control,
                                         "continued_sft": continued,
                                         "pair_source": cfg.pair_source, "threshold": cfg.threshold,
                                         "questions": len(records)})
    pair_stats = {name: {"pairs": s["pairs"], "mean_gap": s["mean_gap"]}
                  for name, s in {**rounds, **ablation}.items()}
    return {"rft": control, "sft-continued": continued, **pair_stats}


def improve_grpo(r: Run) -> dict:
    """GRPO from the SFT model with each reward in `grpo.runs` (PRM, outcome, PRM with step
    advantages); with `grpo.reasoning_modes`, outcome GRPO from the direct and plain-reasoning
    policies too, on the same questions and steps."""
    cfg = r.cfg.grpo
    records = _train_questions(r, "grpo")
    jobs = [(f"grpo-{run}", "sft", run) for run in cfg.runs]
    if cfg.reasoning_modes:
        jobs += [(name, start, "outcome") for name, start in MODE_RUNS.items()]
    info = {}
    for name, start, run in jobs:
        out = train_grpo(r.paths.model(start), r.paths.model("prm"), records, r.paths.model(name),
                         variant(cfg, run), r.cfg.eval.batch_size, style=POLICIES[start])
        meta = model_summary(out)
        info[name] = {k: meta[k] for k in ("train_loss_last", "train_runtime_s")}
    return info


def improved_models(cfg: RunConfig) -> list[str]:
    return ([f"dpo-r{k}" for k in range(1, cfg.dpo.rounds + 1)] + ["rft", "sft-continued"]
            + [f"dpo-r1-{s}" for s in cfg.dpo.ablation]
            + [f"grpo-{run}" for run in cfg.grpo.runs]
            + (list(MODE_RUNS) if cfg.grpo.reasoning_modes else []))


def evaluate_improved(r: Run) -> dict:
    """Greedy test accuracy of every DPO/GRPO model, the comparisons the paper's claims rest
    on, and (`search.final_beam`) beam search on the final DPO model."""
    params = SamplingParams(max_tokens=r.cfg.eval.max_tokens)
    results, comparisons, info, left_out = [], [], {}, {}
    for split in r.cfg.eval.splits:
        records = load_tasks(r.paths.split(split))
        preds = {name: read_jsonl(r.paths.predictions(name, split)) for name in policies(r.cfg)}
        for name in improved_models(r.cfg):
            if not (r.paths.model(name)).exists():
                info[f"{name}/{split}"] = "not trained (too few pairs to change the model)"
                continue
            if not _weights_changed(r.paths.model(name)):
                left_out[name] = "training left its weights unchanged: it is its start model"
                info[f"{name}/{split}"] = f"left out: {left_out[name]}"
                continue
            policy = _policy(r, name)
            preds[name] = predict(policy, records, r.paths.predictions(name, split), style_of(name), params)
            results.append(summarize(preds[name], name, split=split))
            info[f"{name}/{split}"] = round(results[-1]["accuracy"], 3)
        for a, b in _claims(r.cfg):
            if a in preds and b in preds:
                comparisons.append({**paired_comparison(preds[a], preds[b], a, b), "split": split})
    final = next((f"dpo-r{k}" for k in range(r.cfg.dpo.rounds, 0, -1) if r.paths.model(f"dpo-r{k}").exists()),
                 None)
    if final and r.cfg.search.final_beam:
        beam, comparison = _final_beam(r, final)
        results.append(beam)
        comparisons.append(comparison)
        info[f"{final}/beam"] = round(beam["accuracy"], 3)
    update_metrics(r.paths.metrics, results, comparisons, left_out=left_out)
    return info


def _weights_changed(model_dir: Path) -> bool:
    """What the no-op guard recorded (`training.fit`); a model that does not say changed."""
    return model_summary(model_dir).get("weights_changed", True)


def _claims(cfg: RunConfig) -> list[tuple[str, str]]:
    last = f"dpo-r{cfg.dpo.rounds}"
    pairs = [("dpo-r1", "sft"), (last, "sft"), (last, "dpo-r1"), ("rft", "sft"), (last, "rft"),
             ("sft-continued", "sft"), (last, "sft-continued")]
    pairs += [("dpo-r1", f"dpo-r1-{s}") for s in cfg.dpo.ablation]
    runs = [f"grpo-{run}" for run in cfg.grpo.runs]
    pairs += [(a, "sft") for a in runs] + [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]]
    if cfg.grpo.reasoning_modes:
        pairs += list(MODE_RUNS.items())
    return list(dict.fromkeys(pairs))


def _final_beam(r: Run, model: str) -> tuple[dict, dict]:
    """Step beam search with the PRM on the final policy, on the search stage's questions, and
    its paired comparison with that policy's greedy answers."""
    cfg = r.cfg.search
    records, split = _search_questions(r)
    temperature = json.loads(r.paths.stage_marker("search").read_text())["temperature"]
    n = max(cfg.beam_ns)
    preds, compute = beam_search(_policy(r, model), _prm(r), records, n, cfg.keep, temperature,
                                 cfg.step_tokens, cfg.max_steps, seed=_search_seed(r.cfg))
    row = {**summarize(preds, model, "beam", n, split), **compute, "temperature": temperature}
    comparison = paired_comparison(preds, _greedy(r, model, records), f"{model}/beam@{n}", f"{model}/greedy")
    return row, {**comparison, "split": split}
