"""A bounded load run of `chainstep serve` on localhost, at concurrency 1 and 16.

    python bench/server.py                          # a fresh tiny random Llava
    python bench/server.py --model runs/final/models/sft --requests 64

Starts the server in this process (uvicorn on 127.0.0.1, an ephemeral port), sends the same
number of chat-completion requests through the official `openai` client with 1 and then 16 in
flight, and prints requests/s, p50/p95 latency and errors for each, plus the batching gain: the
requests/s at concurrency 16 over concurrency 1, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import torch
import uvicorn
from PIL import Image
from rich.console import Console
from rich.table import Table

from chainstep import models
from chainstep.client import image_data_url
from chainstep.records import load_tasks
from chainstep.sampling import Policy
from chainstep.server import ServeConfig, create_app
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher


def _policy(model_dir: str | None, work: Path) -> tuple[Policy, list[dict]]:
    make_tasks(SuiteConfig(train=200, val=0, test=64), work / "tasks")
    records = load_tasks(work / "tasks" / "test.jsonl")
    if model_dir:
        return Policy.from_dir(model_dir, batch_size=32), records
    train = load_tasks(work / "tasks" / "train.jsonl")
    tok = models.train_tokenizer([r["question"] for r in train] +
                                 [ProgrammaticTeacher().explain(r) for r in train])
    model, processor = models.build_tiny("llava", tok)
    return Policy(model, processor, batch_size=32), records


def _start(policy: Policy) -> tuple[uvicorn.Server, str]:
    app = create_app(policy, None, ServeConfig(batch_window_ms=10), name="bench")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return server, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/v1"


def load_run(url: str, records: list[dict], requests: int, concurrency: int, tokens: int) -> dict:
    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=600)
    messages = [[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(Image.open(r["image"]))}},
        {"type": "text", "text": r["question"]}]}] for r in records]

    def one(i: int) -> float | None:
        start = time.perf_counter()
        try:
            client.chat.completions.create(model="bench", messages=messages[i % len(messages)],
                                           temperature=0, max_tokens=tokens)
        except openai.OpenAIError:
            return None
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    ok = sorted(x for x in latencies if x is not None)
    return {"concurrency": concurrency, "requests": requests, "errors": requests - len(ok),
            "rps": len(ok) / wall, "p50": statistics.median(ok) if ok else float("nan"),
            "p95": ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else float("nan"), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: a fresh tiny Llava)")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens per request")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as work:
        policy, records = _policy(args.model, Path(work))
        server, url = _start(policy)
        load_run(url, records, 4, 4, args.tokens)  # warm-up
        runs = [load_run(url, records, args.requests, c, args.tokens) for c in (1, 16)]
        server.should_exit = True
    table = Table(title=f"chainstep serve, {args.requests} requests, max_tokens {args.tokens}")
    for col in ("concurrency", "requests/s", "p50 latency (s)", "p95 latency (s)", "errors", "wall (s)"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r["concurrency"]), f"{r['rps']:.2f}", f"{r['p50']:.2f}", f"{r['p95']:.2f}",
                      str(r["errors"]), f"{r['wall']:.1f}")
    console = Console()
    console.print(table)
    console.print(f"batching gain (requests/s at 16 over 1): {runs[1]['rps'] / runs[0]['rps']:.2f}x")


if __name__ == "__main__":
    main()
