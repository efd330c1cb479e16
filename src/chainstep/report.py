"""report.html: the paper's Table 1 layout, paired comparisons, timings and sample chains.

Reads `metrics.json`, `stages/*.json` and `eval/*.jsonl` of a run directory; later stages add
rows to the same files and so to the same tables.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from .layout import MODE_RUNS, POLICIES, VERIFIER_STAGES, RunLayout, model_summary
from .records import iter_jsonl, load_tasks, write_text_atomic

MODEL_ORDER = ("base", "cot", "sft", "sft-continued", "dpo-r1", "dpo-r2", "dpo-r3", "rft", "grpo-prm",
               "grpo-outcome", "grpo-prm-step", "grpo-random", "grpo-outcome-base", "grpo-outcome-cot")
MODE_NAMES = {"direct": "no reasoning (answer only)", "cot": "plain reasoning", "cos": "chain of steps"}
# The paper's reasoning-mode ablation (`grpo.reasoning_modes`): mode, its SFT policy, RL from it, the reward.
REASONING_MODES = (*((MODE_NAMES[POLICIES[start]], start, run, "outcome")
                     for run, start in MODE_RUNS.items()),
                   (MODE_NAMES["cos"], "sft", "grpo-prm", "PRM"))
ABLATION_PREFIX = "dpo-r1-"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ci(bounds) -> str:
    return "" if not bounds else f"[{100 * bounds[0]:.0f}, {100 * bounds[1]:.0f}]"


def _order(model: str) -> tuple[int, str]:
    return (MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER), model)


def accuracy_plot(rows: list[dict], families: list[str]) -> str:
    """Per-family accuracy bars with 95% intervals, as a PNG data URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.2))
    width = 0.8 / max(1, len(rows))
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(families) + 1)]
        accs = [row["per_family"].get(f, 0) for f in families] + [row["accuracy"]]
        cis = [row["per_family_ci"].get(f, [0, 0]) for f in families] + \
            [[row["ci_low"], row["ci_high"]]]
        err = [[a - lo for a, (lo, _) in zip(accs, cis)], [hi - a for a, (_, hi) in zip(accs, cis)]]
        ax.bar(xs, accs, width, yerr=err, capsize=2, label=row["model"])
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(families) + 1)],
                  families + ["average"], fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


SEARCH_STYLES = {"pass": ("pass@N (oracle)", ":"), "sc": ("self-consistency", "-"),
                 "bon": ("best-of-N (PRM)", "-"), "weighted": ("PRM-weighted vote", "--"),
                 "beam": ("step beam search (PRM)", "-")}


def scaling_plot(rows: list[dict], greedy: float | None) -> str:
    """Accuracy against N for every search strategy, as a PNG data URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for strategy, (label, style) in SEARCH_STYLES.items():
        points = sorted((r["n"], r["accuracy"]) for r in rows if r["strategy"] == strategy)
        if points:
            ax.plot(*zip(*points), style, marker="o", label=label)
    if greedy is not None:
        ax.axhline(greedy, color="grey", linewidth=1, label="greedy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("N (samples or candidates per step)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def length_plot(points: list[tuple[int, dict]]) -> str:
    """Average steps and tokens of greedy answers against the DPO round (0 = SFT)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, steps_ax = plt.subplots(figsize=(5.5, 3.2))
    rounds = [k for k, _ in points]
    steps_ax.plot(rounds, [row["avg_steps"] for _, row in points], "o-", color="tab:blue")
    steps_ax.set_ylabel("steps", color="tab:blue")
    steps_ax.set_xlabel("DPO round (0 = SFT)")
    steps_ax.set_xticks(rounds)
    tokens_ax = steps_ax.twinx()
    tokens_ax.plot(rounds, [row["avg_tokens"] for _, row in points], "s--", color="tab:orange")
    tokens_ax.set_ylabel("tokens", color="tab:orange")
    fig.tight_layout()
    return _png(fig)


def curve_plot(curves: dict[str, list[dict]]) -> str:
    """Greedy val accuracy against the SFT step, one line per policy, as a PNG data URL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for name, points in curves.items():
        ax.plot([p["step"] for p in points], [p["accuracy"] for p in points], "o-", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val accuracy (greedy)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def val_curves(run: RunLayout) -> dict[str, list[dict]]:
    """The val curves the SFT stages recorded (`sft.val_every`), by policy."""
    curves = {}
    for name in ("sft", "base", "cot"):
        if points := model_summary(run.model(name)).get("val_curve"):
            curves[name] = points
    return curves


def _dpo_sections(metrics: dict, greedy: dict[str, dict]) -> dict:
    dpo = metrics.get("dpo")
    if not dpo:
        return {"dpo": None}
    rounds = [(name, stats, greedy.get(name)) for name, stats in dpo["rounds"].items()]
    points = [(0, greedy["sft"])] if "sft" in greedy else []
    points += [(k, row) for k, (_, _, row) in enumerate(rounds, start=1) if row]
    ablation = [(dpo["pair_source"], dpo["rounds"].get("dpo-r1"), greedy.get("dpo-r1"))]
    ablation += [(name.removeprefix(ABLATION_PREFIX), stats, greedy.get(name))
                 for name, stats in dpo["ablation"].items()]
    return {"dpo": dpo, "dpo_rounds": rounds, "ablation": ablation if dpo["ablation"] else None,
            "length_plot": length_plot(points) if len(points) > 1 else None}


def reasoning_modes(greedy: dict[str, dict], comparisons: list[dict]) -> list[dict] | None:
    """One row per reasoning mode: its SFT policy, RL from it, and the paired RL − SFT test;
    None unless the run trained the ablation."""
    if "cot" not in greedy:
        return None
    paired = {(c["a"], c["b"]): c for c in comparisons}
    return [{"mode": mode, "sft": greedy.get(sft), "rl": greedy.get(rl), "reward": reward,
             "gain": paired.get((rl, sft))} for mode, sft, rl, reward in REASONING_MODES]


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _score_colour(p: float | None) -> str:
    return "#eee" if p is None else f"hsl({int(120 * p)}, 70%, 85%)"


def _image_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _traces(run: RunLayout, model: str, split: str, per_family: int = 2) -> list[dict]:
    preds_path, tasks_path = run.predictions(model, split), run.split(split)
    if not preds_path.exists() or not tasks_path.exists():
        return []
    tasks = {t["id"]: t for t in load_tasks(tasks_path)}
    shown: dict[str, int] = {}
    traces = []
    for pred in iter_jsonl(preds_path):
        if shown.get(pred["family"], 0) >= per_family or pred["id"] not in tasks:
            continue
        shown[pred["family"]] = shown.get(pred["family"], 0) + 1
        task = tasks[pred["id"]]
        traces.append({**pred, "question": task["question"], "image": _image_url(task["image"])})
    return traces


def _prm_traces(run: RunLayout) -> list[dict]:
    path = run.traces
    if not path.exists():
        return []
    return [{**t, "image": _image_url(t["image"])} for t in iter_jsonl(path) if Path(t["image"]).exists()]


def benchmark_section(results: list[dict]) -> dict:
    """The paper's Table 1 layout for benchmark results (one row per model and strategy), the
    published numbers beside it, and each benchmark's per-category breakdown."""
    from .benchmarks import BENCHMARKS, PAPER_TABLE1

    rows = [r for r in results if r.get("benchmark")]
    table: dict[str, dict[str, dict]] = {}
    for r in rows:
        label = r["model"] if r["strategy"] == "greedy" else f"{r['model']} ({r['strategy']}, N={r['n']})"
        table.setdefault(label, {})[r["benchmark"]] = r
    names = list(BENCHMARKS)
    ours = [(label, cells, sum(cells[b]["accuracy"] for b in names) / len(names)
             if all(b in cells for b in names) else None) for label, cells in table.items()]
    paper = [(label, numbers, sum(numbers.values()) / len(numbers))
             for label, numbers in PAPER_TABLE1.items()]
    return {"bench_names": names, "bench_titles": {b: BENCHMARKS[b].title for b in names},
            "bench_rows": ours, "paper_rows": paper, "bench_results": rows}


def verifier_cost(timings: list[tuple[str, float]], search: dict) -> dict | None:
    """What the verifier costs the run: the stages that exist for it, and its scoring inside
    search (the sampling it scores is the policy's cost)."""
    stages = {name: secs for name, secs in timings if name in VERIFIER_STAGES}
    total = sum(secs for _, secs in timings)
    if not stages or not total:
        return None
    parts = {**stages, "scoring in search": search.get("verifier_s", 0)}
    seconds = sum(parts.values())
    return {"parts": parts, "seconds": seconds, "share": seconds / total}


def write_report(run_dir: str | Path, split: str = "test") -> Path:
    run = RunLayout(run_dir)
    run_dir = run.root
    metrics = json.loads(run.metrics.read_text())
    greedy_rows = {r["model"]: r for r in metrics["results"] if r["split"] == split
                   and r["strategy"] == "greedy"}
    rows = sorted((r for name, r in greedy_rows.items() if not name.startswith(ABLATION_PREFIX)),
                  key=lambda r: _order(r["model"]))
    families = sorted({f for r in rows for f in r["per_family"]})
    timings = [(p.stem, json.loads(p.read_text()).get("seconds", 0))
               for p in sorted(run.stages.glob("*.json"), key=lambda p: p.stat().st_mtime)]
    env = Environment(loader=PackageLoader("chainstep", "templates"),
                      autoescape=select_autoescape(["html", "j2"]))
    search = metrics.get("search", {})
    search_rows = sorted((r for r in metrics["results"] if r["split"] == search.get("split")
                          and r["strategy"] != "greedy" and r["model"] == "sft"),
                         key=lambda r: (r["strategy"], r["n"]))
    final_beam = next((r for r in metrics["results"]
                       if r["strategy"] == "beam" and r["model"] != "sft"), None)
    greedy = next((r for r in metrics["results"] if r["split"] == search.get("split")
                   and r["strategy"] == "greedy" and r["model"] == "sft"), None)
    prm_traces = _prm_traces(run)
    comparisons = [c for c in metrics.get("comparisons", []) if c.get("split", split).startswith(split)]
    curves = val_curves(run)
    trace_model = "sft" if any(r["model"] == "sft" for r in rows) else (rows[0]["model"] if rows else "")
    html = env.get_template("report.html.j2").render(
        run_name=run_dir.name, run_dir=str(run_dir), split=split, table=rows, families=families,
        num_questions=rows[0]["num_questions"] if rows else 0,
        comparisons=comparisons, modes=reasoning_modes(greedy_rows, comparisons),
        curves=curves, curve_plot=curve_plot(curves) if curves else None, left_out=metrics.get("left_out"),
        timings=timings, total_seconds=sum(s for _, s in timings),
        verifier_cost=verifier_cost(timings, search),
        plot=accuracy_plot(rows, families) if rows else None,
        trace_model=trace_model, traces=_traces(run, trace_model, split),
        prm=metrics.get("prm"), search=search, search_rows=search_rows, greedy=greedy,
        scaling=scaling_plot(search_rows, greedy and greedy["accuracy"]) if search_rows else None,
        prm_traces=prm_traces, colour=_score_colour, pct=_pct, ci=_ci, final_beam=final_beam,
        **_dpo_sections(metrics, greedy_rows), **benchmark_section(metrics["results"]),
    )
    write_text_atomic(run.report, html)
    return run.report
