"""Greedy generation speed: batched vs batch 1, the growing KV cache vs `DynamicCache`, and
`generate` vs the bare forwards it needs.

    python bench/generation.py                     # a fresh tiny random Llava
    python bench/generation.py --model runs/default/models/sft

Prints a table and three ratios measured in the same run: the batching gain (tokens/s at
batch B over batch 1), the cache gain (`generate` with `DynamicCache`, which copies the whole
cache every step, over the `GrowingCache` the policy uses) and the generation-loop overhead
(HF `generate` time over a hand-written KV-cached greedy loop doing the same forwards).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import DynamicCache

from chainstep import models
from chainstep.inputs import collate, encode_prompt
from chainstep.kvcache import GrowingCache
from chainstep.records import load_tasks
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher


def _setup(model_dir: str | None, work: Path):
    make_tasks(SuiteConfig(train=200, val=0, test=128), work / "tasks")
    records = load_tasks(work / "tasks" / "test.jsonl")
    if model_dir:
        return (*models.load(model_dir), records)
    train = load_tasks(work / "tasks" / "train.jsonl")
    teacher = ProgrammaticTeacher()
    tok = models.train_tokenizer([r["question"] for r in train] +
                                 [teacher.explain(r) for r in train])
    model, processor = models.build_tiny("llava", tok)
    return model.eval(), processor, records


def _batch(processor, records):
    return collate([encode_prompt(processor, r) for r in records],
                   processor.tokenizer.pad_token_id, padding_side="left")


@torch.inference_mode()
def time_generate(model, processor, records, batch_size: int, new_tokens: int, growing: bool = True) -> float:
    start = time.perf_counter()
    for i in range(0, len(records), batch_size):
        batch = _batch(processor, records[i:i + batch_size])
        cache = GrowingCache(model.config) if growing else DynamicCache(config=model.config)
        model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                       past_key_values=cache)
    return time.perf_counter() - start


@torch.inference_mode()
def time_bare_loop(model, processor, records, batch_size: int, new_tokens: int) -> float:
    """Prefill once, then one cached forward per token: the floor `generate` could reach."""
    start = time.perf_counter()
    for i in range(0, len(records), batch_size):
        batch = _batch(processor, records[i:i + batch_size])
        out = model(**batch, use_cache=True, past_key_values=GrowingCache(model.config))
        mask = batch["attention_mask"]
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        for _ in range(new_tokens - 1):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = model(input_ids=token, attention_mask=mask, past_key_values=past, use_cache=True)
            token, past = out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: a fresh tiny Llava)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, processor, records = _setup(args.model, Path(tmp))
        time_generate(model, processor, records[:2], 2, 4)  # warm-up
        single = records[:8]
        t1 = time_generate(model, processor, single, 1, args.tokens)
        tb = time_generate(model, processor, records, args.batch, args.tokens)
        dynamic = time_generate(model, processor, records, args.batch, args.tokens, growing=False)
        bare = time_bare_loop(model, processor, records, args.batch, args.tokens)
    rate1 = len(single) * args.tokens / t1
    rate_b = len(records) * args.tokens / tb
    rate_bare = len(records) * args.tokens / bare
    table = Table(title=f"greedy generation, {args.tokens} new tokens, "
                        f"{models.count_parameters(model):,} params, {args.threads} threads")
    for col in ("setting", "sequences", "seconds", "tokens/s"):
        table.add_column(col)
    table.add_row("generate, batch 1", str(len(single)), f"{t1:.2f}", f"{rate1:.0f}")
    table.add_row(f"generate, batch {args.batch}", str(len(records)), f"{tb:.2f}", f"{rate_b:.0f}")
    table.add_row(f"generate, batch {args.batch}, DynamicCache", str(len(records)), f"{dynamic:.2f}",
                  f"{len(records) * args.tokens / dynamic:.0f}")
    table.add_row(f"bare cached forwards, batch {args.batch}", str(len(records)), f"{bare:.2f}",
                  f"{rate_bare:.0f}")
    console = Console()
    console.print(table)
    console.print(f"batching gain (batch {args.batch} / batch 1 tokens/s): {rate_b / rate1:.2f}x")
    console.print(f"cache gain (DynamicCache / GrowingCache time, batch {args.batch}): {dynamic / tb:.2f}x")
    console.print(f"generate overhead (generate / bare forwards time): {tb / bare:.2f}x")


if __name__ == "__main__":
    main()
