"""The real training path in a given precision on whatever device torch sees: a few SFT, PRM
and DPO steps on a tiny model (finite loss that falls), and batched greedy generation tokens/s
on that device against the CPU in the same run.

    python bench/device_steps.py --bf16        # on a GPU machine (bench/device_check.sh runs it)
    python bench/device_steps.py               # fp32 on this CPU: the same checks, slower

Prints one table row per check and exits non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from chainstep import models
from chainstep.config import PRMConfig, SFTConfig
from chainstep.construct import construct
from chainstep.dpo import DPOConfig, train_dpo
from chainstep.inputs import collate, encode_prompt
from chainstep.prm_train import train_prm
from chainstep.records import JsonlWriter, load_tasks, read_jsonl, replace_jsonl
from chainstep.steps import parse
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher
from chainstep.train_sft import train_sft


def losses(model_dir: Path) -> tuple[float, float]:
    meta = json.loads((model_dir / "chainstep.json").read_text())
    return meta["train_loss_first"], meta["train_loss_last"]


def check(name: str, first: float, last: float, seconds: float) -> dict:
    ok = math.isfinite(first) and math.isfinite(last) and last < first
    return {"check": name, "ok": ok, "loss": f"{first:.3f} -> {last:.3f}", "seconds": round(seconds, 1)}


@torch.inference_mode()
def tokens_per_second(model_dir: Path, records: list[dict], device: str, dtype, batch: int = 64,
                      new_tokens: int = 48) -> float:
    model, processor = models.load(model_dir, dtype=dtype, device=device)
    inputs = collate([encode_prompt(processor, r) for r in records[:batch]], processor.tokenizer.pad_token_id,
                     padding_side="left").to(device)
    inputs = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
    knobs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                 pad_token_id=processor.tokenizer.pad_token_id)
    model.generate(**inputs, **knobs)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    model.generate(**inputs, **knobs)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * new_tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bf16", action="store_true", help="train and generate in bfloat16")
    parser.add_argument("--steps", type=int, default=30, help="SFT steps (PRM and DPO take fewer)")
    args = parser.parse_args()
    device = models.default_device()
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_tasks(SuiteConfig(train=96, val=0, test=64), work / "tasks")
        construct(work / "tasks" / "train.jsonl", work / "data", ProgrammaticTeacher())
        sft_rows = read_jsonl(work / "data" / "sft.jsonl")
        tok = models.train_tokenizer([r["question"] for r in sft_rows] + [r["response"] for r in sft_rows])
        model, processor = models.build_tiny("llava", tok)
        models.save(model, processor, work / "init", meta={"from_scratch": True})

        start = time.time()
        sft = train_sft(work / "init", work / "data" / "sft.jsonl", work / "sft",
                        SFTConfig(max_steps=args.steps, per_device_train_batch_size=16, save_steps=10_000,
                                  warmup_steps=2, bf16=args.bf16))
        rows.append(check("sft", *losses(sft), time.time() - start))

        labels = work / "labels.jsonl"
        with JsonlWriter(labels) as writer:
            for row in sft_rows:
                steps = len(parse(row["response"]).steps)
                good = int(row["family"] in ("count_sum", "bar_chart"))  # learnable from the question
                writer.write({**row, "id": f"{row['id']}/judge", "sample_id": row["id"],
                              "question_id": row["id"], "source": "judge", "labels": [good] * (steps + 1)})
        start = time.time()
        prm_cfg = PRMConfig(max_steps=max(4, args.steps // 3), per_device_train_batch_size=16,
                            save_steps=10_000, warmup_steps=1, bf16=args.bf16)
        prm = train_prm(sft, labels, work / "prm", prm_cfg)
        rows.append(check("prm", *losses(prm), time.time() - start))

        records = {r["id"]: r for r in load_tasks(work / "tasks" / "train.jsonl")}
        pairs = [{"id": f"{r['id']}#p", "question_id": r["id"], "chosen": r["response"],
                  "rejected": r["response"].replace(r["answer"] + "<|answer_end|>", "99<|answer_end|>")}
                 for r in sft_rows[:32]]
        replace_jsonl(work / "pairs.jsonl", pairs)
        start = time.time()
        dpo = train_dpo(sft, work / "pairs.jsonl", records, work / "dpo",
                        DPOConfig(max_steps=8, epochs=4, per_device_train_batch_size=8, warmup_steps=1,
                                  learning_rate=5e-4, save_steps=10_000, bf16=args.bf16))
        rows.append(check("dpo", *losses(dpo), time.time() - start))

        test = load_tasks(work / "tasks" / "test.jsonl")
        here = tokens_per_second(sft, test, device, dtype)
        cpu = here if device == "cpu" else tokens_per_second(sft, test, "cpu", torch.float32)
        rows.append({"check": f"generate tokens/s, batch 64 ({device} vs cpu fp32)", "ok": True,
                     "loss": f"{here:,.0f} vs {cpu:,.0f} ({here / cpu:.1f}x)", "seconds": ""})

    print(f"torch {torch.__version__}, device {device}, dtype {dtype}")
    for row in rows:
        print(f"{'PASS' if row['ok'] else 'FAIL'}  {row['check']:<48} {row['loss']:<28} {row['seconds']}")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
