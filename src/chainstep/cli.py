"""The `chainstep` command: one thin subcommand per stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .config import DEFAULT_SEARCH_TEMPERATURE, check_strategy, check_style
from .errors import ChainstepError
from .layout import METRICS, RunLayout, model_summary, predictions_file, writing_into

console = Console()


class _App(typer.Typer):
    """Shows user errors as one red line instead of a traceback."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except ChainstepError as err:
            Console(stderr=True).print(f"[red]error:[/red] {err}")
            raise SystemExit(1) from None


app = _App(help="Chain-of-step reasoning for VLMs with step-level rewards.",
           no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
tasks_app = typer.Typer(help="The synthetic visual reasoning suite.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")

SET_HELP = "Config override key.sub=value (repeatable), e.g. --set sft.max_steps=200"
BACKEND_HELP = "Sampling backend: hf (transformers) or vllm (if installed; untested, see README)"
STEP_WEIGHT_OPTION = typer.Option(None, help="Chain score = w * agg(steps) + (1 - w) * answer "
                                  "[default: the rule the PRM was trained with]")
AGGREGATE_OPTION = typer.Option(None, help="How step scores aggregate: mean, min, last or prod "
                                "[default: the PRM's own]")
BATCH_SIZE_OPTION = typer.Option(64, help="Sequences per generate call (questions x n); sampled draws "
                                 "depend on it (`chainstep run` uses eval.batch_size)")


def writes_into(param: str):
    """The command writes where its argument `param` points: while it runs it holds the lock of the
    run directory that lies in, so it never writes into a run another process is writing."""
    def decorate(command):
        @functools.wraps(command)
        def locked(*args, **kwargs):
            with writing_into(kwargs[param]):
                return command(*args, **kwargs)
        locked.writes_into = param
        return locked
    return decorate


@app.command()
def run(
    out: Path = typer.Option(None, help="Run directory [default: runs/default or runs/quick]"),
    quick: bool = typer.Option(False, "--quick", help="Small budgets: the same stages in ~3 min"),
    config: Path = typer.Option(None, help="YAML config (see configs/tiny.yaml)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
    seeds: int = typer.Option(None, min=1, help="Run every training and sampling stage under this many "
                                                "seeds (OUT/seed-k), then summarise them in OUT/seeds.json "
                                                "[default: the config's `seeds`, 1]"),
):
    """Run the whole pipeline on the embedded default (resumes a killed run).

    Example: chainstep run --quick --set sft.max_steps=100
    """
    from .config import load_config, parse_overrides
    from .pipeline import run as run_pipeline

    cfg = load_config(config, parse_overrides(set_), quick=quick)
    out = out or Path("runs") / ("quick" if quick else "default")
    seeds = seeds or cfg.seeds
    if seeds > 1:
        from .seeds import run_seeds

        _print_seeds(run_seeds(cfg, out, seeds, run_pipeline))
        console.print(f"summary: {out / 'seeds.json'}")
        return
    layout = RunLayout(run_pipeline(cfg, out))
    _print_results(layout.metrics)
    console.print(f"report: {layout.report}")


def _print_seeds(summary: dict) -> None:
    table = Table(title=f"over {summary['seeds']} seeds: accuracy mean [min, max] (sd)")
    for column in ("model", "strategy", "n", "split", "accuracy"):
        table.add_column(column)
    for r in summary["results"]:
        table.add_row(r["model"], r["strategy"], str(r["n"]), r["split"],
                      f"{100 * r['mean']:.1f} [{100 * r['min']:.1f}, {100 * r['max']:.1f}] "
                      f"({100 * r['sd']:.1f})")
    console.print(table)
    for c in summary["comparisons"]:
        console.print(f"{c['a']} - {c['b']} ({c['split']}, pooled n={c['n']}): {100 * c['diff']:+.1f} "
                      f"[{100 * c['ci_low']:+.1f}, {100 * c['ci_high']:+.1f}], p = {c['p_value']:.2g}; "
                      f"seeds + / -: {c['seeds_positive']} / {c['seeds_negative']}")


@tasks_app.command("make")
def tasks_make(
    out: Path = typer.Option(Path("tasks"), help="Output folder for {split}.jsonl + images/"),
    train: int = typer.Option(None, help="Training records [default: 3000, as in chainstep run]"),
    val: int = typer.Option(None, help="Validation records [default: 500]"),
    test: int = typer.Option(None, help="Test records [default: 1000]"),
    seed: int = typer.Option(None, help="Suite seed [default: 0]"),
    max_objects: int = typer.Option(None, help="Shapes per image in counting families [default: 8]"),
    terms: int = typer.Option(None, help="Difficulty: terms + 1 colour groups are read, 2 or 3 "
                                         "[default: 3]"),
    operands: int = typer.Option(None, help="Difficulty: colour groups a sum adds, 2 to terms + 1 "
                                            "[default: 2]"),
    families: str = typer.Option(None, help="Comma-separated families [default: all]"),
):
    """Draw the synthetic suite; defaults are those of `chainstep run`.

    Example: chainstep tasks make --out tasks --test 100
    """
    from .config import SuiteConfig
    from .synthetic import make_tasks

    given = dict(train=train, val=val, test=test, seed=seed, max_objects=max_objects, terms=terms,
                 operands=operands,
                 families=tuple(families.split(",")) if families else None)
    cfg = SuiteConfig(**{k: v for k, v in given.items() if v is not None})
    console.print(make_tasks(cfg, out))


@tasks_app.command("show")
def tasks_show(
    task_id: str = typer.Argument(..., help="Record id, e.g. count_sum-test-00003"),
    tasks: Path = typer.Option(Path("tasks"), help="Folder holding {split}.jsonl"),
):
    """Print one record and the programmatic teacher's chain for it."""
    from .records import iter_jsonl
    from .teacher import ProgrammaticTeacher

    for path in sorted(tasks.glob("*.jsonl")):
        for record in iter_jsonl(path):
            if record["id"] == task_id:
                console.print_json(json.dumps(record))
                console.print(f"image: {tasks / record['image']}")
                console.print(ProgrammaticTeacher().explain(record), markup=False)
                return
    raise ChainstepError(f"no record {task_id!r} in {tasks}/*.jsonl")


@app.command("build-model")
def build_model(
    out: Path = typer.Argument(..., help="Model directory to write"),
    data: Path = typer.Option(..., help="sft.jsonl whose text trains the tokenizer"),
    arch: str = typer.Option("llava", help="llava, llava_next, qwen2_vl, idefics3, internvl"),
    size: str = typer.Option("tiny", help="tiny or small"),
    vocab_size: int = typer.Option(1024, help="Tokenizer vocabulary (the 17 step tokens included)"),
):
    """Build a tiny random VLM with a tokenizer trained on DATA (standard HF layout)."""
    from . import models
    from .records import read_jsonl

    rows = read_jsonl(data)
    tok = models.train_tokenizer([r["question"] for r in rows] + [r["response"] for r in rows],
                                 vocab_size=vocab_size)
    model, processor = models.build_tiny(arch, tok, size)
    models.save(model, processor, out, meta={"from_scratch": True, "arch": arch, "size": size})
    console.print(f"{arch}/{size}: {models.count_parameters(model):,} parameters -> {out}")


@app.command("add-tokens")
def add_tokens(src: Path = typer.Argument(..., help="Local VLM directory"),
               dst: Path = typer.Argument(..., help="Where to save the extended model")):
    """Add the 17 step tokens to any local VLM (new rows = mean of a description's embedding)."""
    from . import models

    model, processor = models.load(src)
    added = models.add_step_tokens(model, processor)
    meta = model_summary(src) or {"from_scratch": False}
    models.save(model, processor, dst, meta={**meta, "added_tokens": added})
    console.print(f"added {len(added)} tokens -> {dst}")


@app.command()
@writes_into("out")
def construct(
    tasks: Path = typer.Argument(..., help="Task records, a LLaVA/ShareGPT JSON, or a parquet/JSON file"),
    out: Path = typer.Option(Path("data"), help="Folder for sft.jsonl, rejects.jsonl"),
    teacher: str = typer.Option(None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 "
                                "[default: the programmatic teacher of the synthetic suite]"),
    model: str = typer.Option(None, help="Model name at --teacher"),
    template: Path = typer.Option(None, help="Prompt template file [default: templates/teacher_prompt.txt]"),
    concurrency: int = typer.Option(8, help="Requests in flight"),
    max_retries: int = typer.Option(5, help="Retries per request (429/5xx/timeouts, with backoff)"),
    timeout: float = typer.Option(120.0, help="Seconds per request"),
    retry_remote: bool = typer.Option(False, help="Ask again for records rejected as remote:*"),
    columns: str = typer.Option(None, help="Column names of a parquet/JSON input, "
                                "e.g. question=query,answer=label,image=img"),
    image_dir: Path = typer.Option(None, help="Where input images are found or written"),
    seed: int = typer.Option(0, help="Programmatic teacher's wording seed"),
    shard: str = typer.Option(None, help="I/N: only shard I of N (records by a stable hash of their id), "
                              "into its own file; join with `chainstep merge`"),
):
    """Teacher chains for every task, filtered, resumable (kill it and start again).

    Examples: chainstep construct tasks/train.jsonl;
    chainstep construct llava.json --teacher http://127.0.0.1:8000/v1 --model gpt-4o --concurrency 16
    """
    from .client import ChatClient
    from .construct import construct as run_construct
    from .datafiles import load_inputs
    from .shards import Shard
    from .teacher import TEMPLATE, HTTPTeacher, ProgrammaticTeacher

    if teacher and not model:
        raise ChainstepError("--teacher URL needs --model NAME (the model to ask at that endpoint)")
    mapping = _column_mapping(columns) if columns else None
    records = load_inputs(tasks, mapping, image_dir)
    chosen = HTTPTeacher(ChatClient(teacher, model, max_retries=max_retries, timeout=timeout,
                                    max_tokens=1024), template or TEMPLATE) \
        if teacher else ProgrammaticTeacher(seed)
    console.print(run_construct(records, out, chosen, concurrency=concurrency if teacher else 1,
                                retry_remote=retry_remote, shard=Shard.parse(shard)))


def _column_mapping(columns: str) -> dict[str, str]:
    pairs = [pair.split("=", 1) for pair in columns.split(",")]
    bad = [p[0] for p in pairs if len(p) != 2 or not all(x.strip() for x in p)]
    if bad:
        raise ChainstepError(f"--columns {columns!r}: write FIELD=COLUMN pairs separated by commas, "
                             f"e.g. question=prompt,answer=label (not {bad[0]!r})")
    return {k.strip(): v.strip() for k, v in pairs}


@app.command()
def export(
    sft_rows: Path = typer.Argument(..., help="sft.jsonl from chainstep construct"),
    out: Path = typer.Argument(..., help="JSON file to write"),
    layout: str = typer.Option("llava", help="llava (conversations from/value) or sharegpt (messages)"),
):
    """SFT data in the conversation layouts other fine-tuning tools read."""
    from .datafiles import export_conversations
    from .records import read_jsonl

    rows = read_jsonl(sft_rows, required=("id", "image", "question", "response"))
    rows = export_conversations(rows, layout)
    out.write_text(json.dumps(rows, ensure_ascii=False, indent=1))
    console.print(f"{len(rows)} conversations ({layout}) -> {out}")


@app.command()
@writes_into("out")
def pretrain(
    model: Path = typer.Argument(..., help="A tiny model built from config (chainstep build-model)"),
    out: Path = typer.Option(..., help="Output model directory (the base SFT starts from)"),
    set_: list[str] = typer.Option([], "--set", help="Pretrain override, e.g. --set images=20000"),
):
    """Pretrain a tiny model to see, then to read and add, on freshly drawn suite images (cached).

    Example: chainstep pretrain models/init --out models/pretrained
    """
    from .config import PretrainConfig, section_config
    from .pretrain import pretrain as pretrain_perception

    info = pretrain_perception(model, out, cfg=section_config(PretrainConfig, set_, "pretrain"))
    console.print(info)
    console.print(f"saved -> {out}")


@app.command()
@writes_into("out")
def sft(
    model: Path = typer.Argument(..., help="Starting model directory"),
    data: Path = typer.Argument(..., help="sft.jsonl (or direct.jsonl for the baseline)"),
    out: Path = typer.Option(..., help="Output model directory"),
    val: Path = typer.Option(None, help="Val task records (e.g. tasks/val.jsonl): the greedy val curve "
                             "every `val_every` steps, kept in the model's chainstep.json"),
    style: str = typer.Option("cos", help="How the val answers are graded: cos, cot or direct"),
    set_: list[str] = typer.Option([], "--set", help="SFT override, e.g. --set max_steps=200"),
):
    """Fine-tune on step chains; resumes from the last checkpoint after a kill."""
    from .config import SFTConfig, check_style, section_config
    from .records import load_tasks
    from .train_sft import train_sft

    check_style(style)
    cfg = section_config(SFTConfig, set_, "sft")
    train_sft(model, data, out, cfg, load_tasks(val) if val else None, style)
    console.print(f"saved -> {out}")


@app.command("eval")
@writes_into("out")
def evaluate(
    model: Path = typer.Argument(..., help="Model directory"),
    tasks: Path = typer.Argument(None, help="Task records (e.g. tasks/test.jsonl); or --benchmark"),
    benchmark: str = typer.Option(None, help="mathvista, mmstar, mmmu, m3cot, ai2d or chartqa"),
    data: Path = typer.Option(None, help="The benchmark's local files: a folder or one file"),
    limit: int = typer.Option(None, help="Only the first N records"),
    out: Path = typer.Option(Path("eval"), help="Folder for predictions and metrics.json"),
    name: str = typer.Option(None, help="Model name in metrics.json [default: folder name]"),
    style: str = typer.Option("cos", help="cos (step chains), cot (plain reasoning) or direct (answer only)"),
    strategy: str = typer.Option("greedy", help="greedy, sc (self-consistency), bon (best-of-N), weighted "
                                 "(PRM-weighted vote), beam (step beam search), or pass (pass@N: an "
                                 "oracle that reads the answers, an upper bound, not a method)"),
    n: int = typer.Option(1, help="Samples (sc, bon, weighted, pass) or candidates per step (beam); "
                          "greedy ignores it and records n = 1"),
    prm: str = typer.Option(None, help="PRM directory (bon, weighted, beam); `judge` for the "
                                       "programmatic judge as an oracle verifier (synthetic "
                                       "tasks), `judge:0.2` for one that flips 20% of its verdicts"),
    temperature: float = typer.Option(
        DEFAULT_SEARCH_TEMPERATURE, help="Sampling temperature for n > 1 strategies (`chainstep run` "
        "picks one on val: metrics.json search.temperature)"),
    step_weight: float = STEP_WEIGHT_OPTION,
    aggregate: str = AGGREGATE_OPTION,
    max_tokens: int = typer.Option(None, help="Token budget [default: 256; a benchmark's own]"),
    extract_url: str = typer.Option(None, help="OpenAI-compatible endpoint that extracts answers "
                                    "(MathVista's official way, VLMEvalKit's multiple-choice fallback)"),
    extract_model: str = typer.Option("gpt-4o-mini", help="Model name at --extract-url"),
    backend: str = typer.Option("hf", help=BACKEND_HELP),
    batch_size: int = BATCH_SIZE_OPTION,
    shard: str = typer.Option(None, help="I/N: only shard I of N (records by a stable hash of their id), "
                              "greedy only, into its own file; `chainstep merge`, then eval again "
                              "for the metrics"),
):
    """Evaluate with 95% intervals and compute counts, on task records or one of the paper's benchmarks.

    Examples: chainstep eval runs/quick/models/sft tasks/test.jsonl;
    chainstep eval runs/quick/models/sft tasks/test.jsonl --strategy beam --n 8 --prm runs/quick/models/prm;
    chainstep eval runs/quick/models/sft tasks/test.jsonl --strategy bon --n 8 --prm judge;
    chainstep eval runs/final/models/sft --benchmark mathvista --data ~/data/MathVista --out runs/final
    """
    from .sampling import load_policy
    from .search import evaluate_strategy
    from .shards import sharded

    check_style(style, strategy)
    check_strategy(strategy, prm is not None)
    if shard and strategy != "greedy":
        raise ChainstepError("--shard splits greedy evaluation; search strategies run unsharded")
    records, split, settings = _eval_records(tasks, benchmark, data, out, limit, max_tokens)
    name = name or model.name
    extractor = _extractor(extract_url, extract_model, benchmark, settings)
    policy = load_policy(model, backend, batch_size)
    if shard:
        from .evaluate import predict
        from .sampling import SamplingParams

        with sharded(shard, records, predictions_file(out, name, split)) as (chosen, path):
            preds = predict(policy, chosen, path, style, SamplingParams(max_tokens=settings["max_tokens"]),
                            extractor)
        console.print(f"shard {shard}: {sum(p['correct'] for p in preds)}/{len(preds)} right -> {path}")
        return
    verifier = _verifier(prm, step_weight, aggregate, batch_size) if prm and strategy != "greedy" else None
    row = evaluate_strategy(policy, records, out, name, split, settings, style, strategy, n, verifier,
                            temperature, extractor)
    _print_results(out / METRICS)
    if benchmark:
        _print_categories(row, f"{benchmark} by category ({split}, {strategy})")


def _extractor(url: str | None, model: str, benchmark: str | None, settings: dict):
    """The LLM answer extractor of a benchmark evaluation (`--extract-url`), recorded in its settings."""
    if not url:
        return None
    if not benchmark:
        raise ChainstepError("--extract-url applies to --benchmark evaluations")
    from .benchmarks import LLMExtractor
    from .client import ChatClient

    settings["extraction"] = f"llm:{model}"
    return LLMExtractor(ChatClient(url, model, max_tokens=32))


def _print_categories(row: dict, title: str) -> None:
    table = Table(title=title)
    table.add_column("category")
    table.add_column("accuracy")
    for family, acc in row["per_family"].items():
        low, high = row["per_family_ci"][family]
        table.add_row(family, f"{100 * acc:.1f} [{100 * low:.1f}, {100 * high:.1f}]")
    console.print(table)


def _verifier(spec: str, step_weight: float | None, aggregate: str | None, batch_size: int):
    from .verifier import load_verifier

    return load_verifier(spec, batch_size, step_weight, aggregate)


def _eval_records(tasks: Path | None, benchmark: str | None, data: Path | None, out: Path,
                  limit: int | None, max_tokens: int | None) -> tuple[list[dict], str, dict]:
    """Records, split name and the settings a result must carry to be reproduced."""
    from .benchmarks import get, load
    from .records import load_tasks

    if (tasks is None) == (benchmark is None):
        raise ChainstepError("give either TASKS (a records file) or --benchmark NAME --data PATH")
    if tasks is not None:
        records = load_tasks(tasks)[:limit]
        return records, tasks.stem, {"max_tokens": max_tokens or 256}
    bench = get(benchmark)
    if data is None:
        raise ChainstepError(f"--benchmark {bench.name} needs --data PATH: {bench.layouts}")
    records = load(bench.name, data, out / "images" / bench.name)[:limit]
    missing = [r["id"] for r in records if r["image"] is None]
    if missing:
        raise ChainstepError(f"{len(missing)} of {len(records)} {bench.title} records under {data} have "
                             f"no image (first: id {missing[0]}); expected {bench.layouts}")
    return records, bench.name, {
        "benchmark": bench.name, "benchmark_split": bench.split, "max_tokens": max_tokens or bench.max_tokens,
        "instructions": sorted({r["meta"]["instruction"] for r in records}), "extraction": "rules"}


@app.command()
@writes_into("out")
def sample(
    model: Path = typer.Argument(..., help="Policy model directory"),
    tasks: Path = typer.Argument(..., help="Task records"),
    out: Path = typer.Option(..., help="samples.jsonl to append to (resumable)"),
    n: int = typer.Option(16, help="Chains per question"),
    temperature: float = typer.Option(1.0, help="Sampling temperature (0 = greedy; then use --n 1)"),
    max_tokens: int = typer.Option(256, help="New tokens per chain"),
    limit: int = typer.Option(0, help="First K questions (0 = all)"),
    seed: int = typer.Option(0, help="Random seed, set once for the whole command"),
    batch_size: int = BATCH_SIZE_OPTION,
    backend: str = typer.Option("hf", help=BACKEND_HELP),
    shard: str = typer.Option(None, help="I/N: only shard I of N (records by a stable hash of their id), "
                              "into its own file; join with `chainstep merge`"),
):
    """Sample N graded chains per question.

    Example: chainstep sample runs/x/models/sft tasks/train.jsonl --out samples.jsonl --n 16
    """
    from .evaluate import sample_responses
    from .records import load_tasks
    from .sampling import SamplingParams, load_policy
    from .shards import sharded

    every = load_tasks(tasks)
    with sharded(shard, every[:limit] if limit else every, out) as (records, path):
        got = sample_responses(load_policy(model, backend, batch_size), records, path,
                               SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed))
    rows = [r for group in got.values() for r in group]
    console.print({"chains": len(rows), "correct": sum(r["correct"] for r in rows) / max(1, len(rows)),
                   "parsed": sum(r["parsed"] for r in rows) / max(1, len(rows))})


@app.command()
@writes_into("out")
def label(
    samples: Path = typer.Argument(..., help="samples.jsonl from `chainstep sample`"),
    tasks: Path = typer.Argument(..., help="The task records the samples answer"),
    out: Path = typer.Option(..., help="prm_labels.jsonl to append to (resumable)"),
    policy: Path = typer.Option(None, help="Policy directory for Monte Carlo rollouts"),
    judge_url: str = typer.Option(None, help="OpenAI-compatible base URL for an LLM judge"),
    judge_model: str = typer.Option(None, help="Model name at --judge-url"),
    set_: list[str] = typer.Option([], "--set", help="Label override, e.g. --set rollouts=16"),
    shard: str = typer.Option(None, help="I/N: only shard I of N (records by a stable hash of their id), "
                              "into its own file; join with `chainstep merge`"),
):
    """Step labels from MC rollouts, a judge, and perturbed teacher chains."""
    from .client import ChatClient
    from .config import LabelConfig, section_config
    from .judge import HTTPJudge
    from .label import label as run_label
    from .records import load_tasks, read_jsonl
    from .sampling import Policy
    from .shards import sharded

    cfg = section_config(LabelConfig, set_, "label")
    judge = HTTPJudge(ChatClient(judge_url, judge_model or "default")) if judge_url else None
    if cfg.mc and policy is None:
        raise ChainstepError("Monte Carlo labels need --policy (or --set mc=false)")
    rows = read_jsonl(samples)
    with sharded(shard, load_tasks(tasks), out) as (records, path):
        if shard:
            mine = {r["id"] for r in records}
            rows = [r for r in rows if r.get("question_id", r["id"]) in mine]
        console.print(run_label(rows, records, path, cfg, Policy.from_dir(policy) if policy else None, judge))


prm_app = typer.Typer(help="Process reward model: train and evaluate.", no_args_is_help=True)
app.add_typer(prm_app, name="prm")


@prm_app.command("train")
@writes_into("out")
def prm_train(
    model: Path = typer.Argument(..., help="Starting model: an SFT policy or any VLM with the step tokens"),
    labels: Path = typer.Argument(..., help="prm_labels.jsonl"),
    out: Path = typer.Option(..., help="Output PRM directory"),
    set_: list[str] = typer.Option([], "--set", help="PRM override, e.g. --set soft_labels=true"),
):
    """Train a PRM (BCE at every step tag); resumes from the last checkpoint after a kill."""
    from .config import PRMConfig, section_config
    from .prm_train import train_prm

    train_prm(model, labels, out, section_config(PRMConfig, set_, "prm"))
    console.print(f"saved -> {out}")


@prm_app.command("eval")
def prm_eval(
    prm: str = typer.Argument(..., help="PRM directory, `checks` or `judge`"),
    labels: Path = typer.Argument(..., help="Held-out prm_labels.jsonl"),
    source: str = typer.Option("judge", help="Label source to evaluate against (judge, mc, perturb)"),
    checks: bool = typer.Option(None, "--checks/--no-checks", help="Read the PRM with or without the "
                                "checks [default: as it was trained]"),
):
    """Step accuracy, AUROC, bad-step F1, first-error accuracy, within-question ranking AUROC (per
    family) and, against judge labels, the checks' false-fail and false-pass rates."""
    from .prm_metrics import check_quality, evaluate_prm
    from .records import read_jsonl
    from .verifier import load_verifier

    rows = [r for r in read_jsonl(labels) if r["source"] == source]
    if not rows:
        raise ChainstepError(f"{labels} has no rows labelled by {source!r}")
    metrics = evaluate_prm(load_verifier(prm, checks=checks), rows)
    if source == "judge":
        metrics["checks"] = check_quality(rows)
    console.print(metrics)


dpo_app = typer.Typer(help="Iterative DPO on PRM-scored pairs.", no_args_is_help=True)
app.add_typer(dpo_app, name="dpo")


@dpo_app.command("run")
@writes_into("out")
def dpo_run(
    sft_model: Path = typer.Argument(..., help="SFT policy: every round restarts from it"),
    tasks: Path = typer.Argument(..., help="Training task records (the first dpo.questions are used)"),
    out: Path = typer.Option(..., help="Folder for data/ (samples, pairs) and models/dpo-r{k}"),
    prm: str = typer.Option(None, help="PRM directory, `checks` or `judge` (not needed with --set "
                                       "pair_source=outcome)"),
    step_weight: float = STEP_WEIGHT_OPTION,
    aggregate: str = AGGREGATE_OPTION,
    set_: list[str] = typer.Option([], "--set", help="DPO override, e.g. --set rounds=2 --set threshold=0.2"),
    batch_size: int = BATCH_SIZE_OPTION,
):
    """Sample, score, pair and train for dpo.rounds rounds; finished rounds are skipped on a re-run."""
    from .config import DPOConfig, section_config
    from .dpo import iterative_dpo
    from .records import load_tasks

    cfg = section_config(DPOConfig, set_, "dpo")
    records = load_tasks(tasks)
    records = records[:cfg.questions] if cfg.questions else records
    verifier = _verifier(prm, step_weight, aggregate, batch_size) if prm else None
    for name, stats in iterative_dpo(sft_model, verifier, records, out, cfg, batch_size).items():
        console.print(f"{name}: {stats}")


@dpo_app.command("train")
@writes_into("out")
def dpo_train(
    model: Path = typer.Argument(..., help="Policy and reference start here"),
    pairs: Path = typer.Argument(..., help="pairs.jsonl (question_id, chosen, rejected)"),
    tasks: Path = typer.Argument(..., help="The task records the pairs answer"),
    out: Path = typer.Option(..., help="Output model directory"),
    set_: list[str] = typer.Option([], "--set", help="DPO override, e.g. --set beta=0.1"),
):
    """One DPO training run on a pairs file. Launch under accelerate or torchrun for DDP:
    accelerate launch --multi_gpu --num_processes 2 -m chainstep dpo train ..."""
    from .config import DPOConfig, section_config
    from .dpo import train_dpo
    from .records import load_tasks

    cfg = section_config(DPOConfig, set_, "dpo")
    train_dpo(model, pairs, {r["id"]: r for r in load_tasks(tasks)}, out, cfg)
    console.print(f"saved -> {out}")


@app.command()
@writes_into("out")
def grpo(
    sft_model: Path = typer.Argument(..., help="Starting policy"),
    tasks: Path = typer.Argument(..., help="Training task records (the first grpo.questions are used)"),
    out: Path = typer.Option(..., help="Output model directory"),
    prm: str = typer.Option(None, help="PRM directory, `checks` or `judge` (the reward with --set "
                                       "reward=prm)"),
    step_weight: float = STEP_WEIGHT_OPTION,
    aggregate: str = AGGREGATE_OPTION,
    set_: list[str] = typer.Option([], "--set", help="GRPO override, e.g. --set reward=outcome "
                                   "--set advantages=step"),
    style: str = typer.Option("cos", help="How the starting policy answers: cos, cot or direct (outcome "
                                          "reward only)"),
    batch_size: int = BATCH_SIZE_OPTION,
):
    """GRPO with the PRM chain score (or the outcome) as reward; resumes after a kill."""
    from .config import GRPOConfig, section_config
    from .grpo import train_grpo
    from .records import load_tasks

    cfg = section_config(GRPOConfig, set_, "grpo")
    records = load_tasks(tasks)
    verifier = _verifier(prm, step_weight, aggregate, batch_size) if prm else None
    check_style(style)
    train_grpo(sft_model, verifier, records[:cfg.questions] if cfg.questions else records, out, cfg,
               batch_size, style=style)
    console.print(f"saved -> {out}")


@app.command()
def serve(
    model: Path = typer.Argument(..., help="Saved model directory, e.g. runs/final/models/sft"),
    prm: str = typer.Option(None, help="PRM directory, `checks` or `judge`: enables bon, weighted and beam, "
                                       "and step scores"),
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, help="TCP port to listen on"),
    api_key: str = typer.Option(None, envvar="CHAINSTEP_API_KEY", help="Require Authorization: Bearer KEY"),
    name: str = typer.Option(None, help="Model id clients send [default: the folder name]"),
    max_n: int = typer.Option(16, help="Largest n (or search width) a request may ask for"),
    max_tokens: int = typer.Option(2048, help="Largest max_tokens a request may ask for"),
    batch_window_ms: float = typer.Option(5.0, help="How long to gather concurrent requests into a batch"),
    backend: str = typer.Option("hf", help=BACKEND_HELP),
    step_weight: float = STEP_WEIGHT_OPTION,
    aggregate: str = AGGREGATE_OPTION,
):
    """OpenAI-compatible chat completions for a step-reasoning VLM (streaming, search strategies).

    Example: chainstep serve runs/final/models/sft --prm runs/final/models/prm --port 8000
    """
    from .server import ServeConfig
    from .server import serve as run_server

    run_server(model, prm, ServeConfig(host=host, port=port, api_key=api_key, name=name, max_n=max_n,
                                       max_tokens=max_tokens, batch_window_ms=batch_window_ms), backend,
               step_weight, aggregate)


@app.command()
@writes_into("path")
def merge(
    path: Path = typer.Argument(..., help="The file the shards stand for, e.g. data/samples.jsonl"),
    shards: int = typer.Option(..., help="N: how many shards the work was split into"),
):
    """Join the shards of a --shard I/N run into PATH, checking none is missing or unfinished.

    Example: chainstep merge data/samples.jsonl --shards 4
    """
    from .shards import merge as merge_shards

    console.print(merge_shards(path, shards))


@app.command()
@writes_into("run_dir")
def report(run_dir: Path = typer.Argument(..., help="Run directory")):
    """Rewrite report.html from a run directory's files."""
    from .report import write_report

    if not RunLayout(run_dir).metrics.exists():
        raise ChainstepError(f"{run_dir} has no metrics.json: is it a run directory (chainstep run --out)?")
    console.print(f"report: {write_report(run_dir)}")


def _print_results(path: Path) -> None:
    results = json.loads(path.read_text())["results"]
    table = Table(title="accuracy (95% interval)")
    for col in ("model", "split", "strategy", "accuracy", "all steps right", "parse fail", "steps",
                "tokens"):
        table.add_column(col)
    for r in results:
        right = r.get("right_chain_rate")
        table.add_row(r["model"], r["split"], r["strategy"],
                      f"{100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]",
                      "–" if right is None else f"{100 * right:.1f}%",
                      f"{100 * r['parse_failure_rate']:.1f}%", f"{r['avg_steps']:.2f}",
                      f"{r['avg_tokens']:.1f}")
    console.print(table)
