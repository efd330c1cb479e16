"""The `chainstep` command: one thin subcommand per stage, plus `run` for the whole pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from .errors import ChainstepError

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


@app.command()
def run(
    out: Path = typer.Option(None, help="Run directory [default: runs/default or runs/quick]"),
    quick: bool = typer.Option(False, "--quick", help="Small budgets: the same stages in ~2 min"),
    config: Path = typer.Option(None, help="YAML config (see configs/tiny.yaml)"),
    set_: list[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Run the whole pipeline on the embedded default (resumes a killed run).

    Example: chainstep run --quick --set sft.max_steps=100
    """
    from .config import load_config, parse_overrides
    from .pipeline import run as run_pipeline

    cfg = load_config(config, parse_overrides(set_), quick=quick)
    run_dir = run_pipeline(cfg, out or Path("runs") / ("quick" if quick else "default"))
    _print_results(run_dir / "metrics.json")
    console.print(f"report: {run_dir / 'report.html'}")


@tasks_app.command("make")
def tasks_make(
    out: Path = typer.Option(Path("tasks"), help="Output folder for {split}.jsonl + images/"),
    train: int = 2000, val: int = 200, test: int = 300, seed: int = 0,
    max_objects: int = typer.Option(8, help="Shapes per image in counting families"),
    terms: int = typer.Option(2, help="Difficulty: terms + 1 colour groups are read (2 or 3)"),
    families: str = typer.Option(None, help="Comma-separated families [default: all]"),
):
    """Draw the synthetic suite. Example: chainstep tasks make --out tasks --test 100"""
    from .synthetic import SuiteConfig, make_tasks

    extra = {"families": tuple(families.split(","))} if families else {}
    cfg = SuiteConfig(train=train, val=val, test=test, seed=seed, max_objects=max_objects,
                      terms=terms, **extra)
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
    vocab_size: int = 1024,
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
    meta_path = src / "chainstep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"from_scratch": False}
    models.save(model, processor, dst, meta={**meta, "added_tokens": added})
    console.print(f"added {len(added)} tokens -> {dst}")


@app.command()
def construct(
    tasks: Path = typer.Argument(..., help="Task records (e.g. tasks/train.jsonl)"),
    out: Path = typer.Option(Path("data"), help="Folder for sft.jsonl, rejects.jsonl"),
    seed: int = 0,
):
    """Teacher chains for every task, filtered; resumable. Example: chainstep construct tasks/train.jsonl"""
    from .construct import construct as run_construct
    from .teacher import ProgrammaticTeacher

    console.print(run_construct(tasks, out, ProgrammaticTeacher(seed)))


@app.command()
def sft(
    model: Path = typer.Argument(..., help="Starting model directory"),
    data: Path = typer.Argument(..., help="sft.jsonl (or direct.jsonl for the baseline)"),
    out: Path = typer.Option(..., help="Output model directory"),
    set_: list[str] = typer.Option([], "--set", help="SFT override, e.g. --set max_steps=200"),
):
    """Fine-tune on step chains; resumes from the last checkpoint after a kill."""
    from .config import from_dict, parse_overrides
    from .train_sft import SFTConfig, train_sft

    train_sft(model, data, out, from_dict(SFTConfig, parse_overrides(set_), "sft."))
    console.print(f"saved -> {out}")


@app.command("eval")
def evaluate(
    model: Path = typer.Argument(..., help="Model directory"),
    tasks: Path = typer.Argument(..., help="Task records (e.g. tasks/test.jsonl)"),
    out: Path = typer.Option(Path("eval"), help="Folder for predictions and metrics.json"),
    name: str = typer.Option(None, help="Model name in metrics.json [default: folder name]"),
    style: str = typer.Option("cos", help="cos (step chains) or direct (answer only)"),
    max_tokens: int = 256, batch_size: int = 64,
):
    """Greedy evaluation with 95% intervals. Example: chainstep eval runs/quick/models/sft tasks/test.jsonl"""
    from .evaluate import predict, summarize, update_metrics
    from .records import load_tasks
    from .sampling import Policy, SamplingParams

    if style not in ("cos", "direct"):
        raise ChainstepError(f"--style {style!r}: choose cos or direct")
    name = name or model.name
    records = load_tasks(tasks)
    policy = Policy.from_dir(model, batch_size=batch_size)
    preds = predict(policy, records, out / f"{name}-{tasks.stem}.jsonl", style,
                    SamplingParams(max_tokens=max_tokens))
    update_metrics(out / "metrics.json", [summarize(preds, name, split=tasks.stem)])
    _print_results(out / "metrics.json")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="Run directory")):
    """Rewrite report.html from a run directory's files."""
    from .report import write_report

    console.print(f"report: {write_report(run_dir)}")


def _print_results(path: Path) -> None:
    results = json.loads(path.read_text())["results"]
    table = Table(title="accuracy (95% interval)")
    for col in ("model", "split", "strategy", "accuracy", "parse fail", "steps", "tokens"):
        table.add_column(col)
    for r in results:
        table.add_row(r["model"], r["split"], r["strategy"],
                      f"{100 * r['accuracy']:.1f} [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]",
                      f"{100 * r['parse_failure_rate']:.1f}%", f"{r['avg_steps']:.2f}",
                      f"{r['avg_tokens']:.1f}")
    console.print(table)
