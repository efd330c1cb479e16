"""Where the time of one SFT step and of one batched generation goes (issue 24's measure-first).

    python bench/profile_steps.py --run runs/default          # a finished run's SFT model and data
    python bench/profile_steps.py                              # a fresh tiny model on a fresh suite

SFT step, split into its parts and timed over `--steps` steps at the run's batch size, fp32 and
bf16 autocast: batch building (image decoding, the processor, tokenising), forward, backward,
optimizer; and what the batch holds (image tokens, prompt, response, padding). Generation, one
batched call of `--gen-batch` test questions: greedy, and sampling at T = 1 with and without the
step grammar (its per-token Python cost). Ratios are against the same run's own numbers.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from chainstep import models
from chainstep.config import SFTConfig
from chainstep.construct import construct
from chainstep.inputs import SFTCollator
from chainstep.records import load_tasks, read_jsonl
from chainstep.sampling import Policy, SamplingParams
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher
from chainstep.training import prepare_model

console = Console()


def _setup(run: Path | None, work: Path):
    if run:
        return (run / "models" / "sft", read_jsonl(run / "data" / "sft.jsonl"),
                load_tasks(run / "tasks" / "test.jsonl"))
    make_tasks(SuiteConfig(train=400, val=0, test=64), work / "tasks")
    construct(work / "tasks" / "train.jsonl", work / "data", ProgrammaticTeacher(0))
    rows = read_jsonl(work / "data" / "sft.jsonl")
    tok = models.train_tokenizer([r["question"] for r in rows] + [r["response"] for r in rows])
    model, processor = models.build_tiny("llava", tok)
    models.save(model, processor, work / "model")
    return work / "model", rows, load_tasks(work / "tasks" / "test.jsonl")


def profile_sft(model_dir: Path, rows: list[dict], steps: int, batch_size: int, bf16: bool) -> dict:
    model, processor = prepare_model(model_dir, SFTConfig())  # as training prepares it: tower frozen
    model.train()
    collator = SFTCollator(processor, 1024)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    parts = dict.fromkeys(("batch", "forward", "backward", "optimizer"), 0.0)
    counts = dict.fromkeys(("positions", "padding", "image", "prompt", "response"), 0)
    config = model.config
    image_id = getattr(config, "image_token_id", None) or getattr(config, "image_token_index", None)
    for step in range(steps + 1):  # step 0 warms up and is not counted
        chunk = rows[step * batch_size:(step + 1) * batch_size]
        times = {}
        start = time.perf_counter()
        batch = collator(chunk)
        times["batch"] = time.perf_counter() - start
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        times["forward"] = time.perf_counter() - start
        start = time.perf_counter()
        loss.backward()
        times["backward"] = time.perf_counter() - start
        start = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times["optimizer"] = time.perf_counter() - start
        if step == 0:
            continue
        for key, value in times.items():
            parts[key] += value
        mask, labels, ids = batch["attention_mask"], batch["labels"], batch["input_ids"]
        counts["positions"] += mask.numel()
        counts["padding"] += int((mask == 0).sum())
        counts["image"] += int((ids == image_id).sum()) if image_id is not None else 0
        counts["response"] += int((labels != -100).sum())
    counts["prompt"] = counts["positions"] - counts["padding"] - counts["image"] - counts["response"]
    return {"parts": parts, "counts": counts, "steps": steps}


def profile_generation(model_dir: Path, records: list[dict], max_tokens: int) -> list[dict]:
    policy = Policy.from_dir(model_dir, batch_size=len(records))
    out = []
    for name, params in (("greedy", SamplingParams(max_tokens=max_tokens)),
                         ("T=1, free", SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=0,
                                                      grammar=False)),
                         ("T=1, grammar", SamplingParams(temperature=1.0, max_tokens=max_tokens, seed=0,
                                                         grammar=True))):
        policy.generate(records[:4], params, progress=False)  # warm-up
        start = time.perf_counter()
        gens = policy.generate(records, params, progress=False)
        seconds = time.perf_counter() - start
        tokens = sum(g[0].num_tokens for g in gens)
        longest = max(g[0].num_tokens for g in gens)
        out.append({"decoding": name, "s": seconds, "tokens": tokens, "decode_steps": longest,
                    "ms_per_step": 1000 * seconds / max(longest, 1), "tokens_per_s": tokens / seconds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="a finished run directory (its SFT model and data)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--gen-batch", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, rows, records = _setup(args.run, Path(tmp))
        sft = {precision: profile_sft(model_dir, rows, args.steps, args.batch, precision == "bf16")
               for precision in ("fp32", "bf16")}
        gen = profile_generation(model_dir, records[:args.gen_batch], args.max_tokens)
    table = Table(title=f"SFT step, batch {args.batch}, mean of {args.steps} steps (ms)")
    for column in ("precision", "batch", "forward", "backward", "optimizer", "total", "tokens / s"):
        table.add_column(column)
    for precision, result in sft.items():
        parts = {k: 1000 * v / result["steps"] for k, v in result["parts"].items()}
        read = result["counts"]["positions"] - result["counts"]["padding"]  # tokens the model reads
        table.add_row(precision, *(f"{parts[k]:.0f}" for k in ("batch", "forward", "backward", "optimizer")),
                      f"{sum(parts.values()):.0f}", f"{read / sum(result['parts'].values()):.0f}")
    console.print(table)
    counts, steps = sft["fp32"]["counts"], sft["fp32"]["steps"]
    shares = ", ".join(f"{k} {v / steps:.0f} ({100 * v / counts['positions']:.0f}%)"
                       for k, v in counts.items() if k != "positions")
    console.print(f"positions per step: {shares} of {counts['positions'] / steps:.0f}")
    fp32, bf16 = (sum(sft[p]["parts"].values()) for p in ("fp32", "bf16"))
    console.print(f"bf16 autocast speed-up over fp32 (whole step): {fp32 / bf16:.2f}x")
    questions = len(records[:args.gen_batch])
    table = Table(title=f"one generate call, {questions} questions, <= {args.max_tokens} tokens")
    for column in ("decoding", "s", "tokens", "decode steps", "ms / step", "tokens / s"):
        table.add_column(column)
    for row in gen:
        table.add_row(row["decoding"], f"{row['s']:.1f}", str(row["tokens"]), str(row["decode_steps"]),
                      f"{row['ms_per_step']:.1f}", f"{row['tokens_per_s']:.0f}")
    console.print(table)
    free, constrained = gen[1], gen[2]
    console.print(f"grammar cost per decode step: {constrained['ms_per_step'] - free['ms_per_step']:+.1f} ms "
                  f"({constrained['ms_per_step'] / free['ms_per_step']:.2f}x the free sampler's step)")


if __name__ == "__main__":
    main()
