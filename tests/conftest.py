"""Session fixtures: a small synthetic suite and tiny random VLMs saved to disk, built once."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from chainstep import models
from chainstep.construct import construct
from chainstep.records import load_tasks, read_jsonl
from chainstep.synthetic import SuiteConfig, make_tasks
from chainstep.teacher import ProgrammaticTeacher

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Pretrained towers go to a cache of the test session's own, never the user's."""
    import os

    os.environ["CHAINSTEP_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def suite_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("suite")
    make_tasks(SuiteConfig(train=40, val=10, test=10, terms=2), out / "tasks")  # fixtures sized on terms 2
    construct(out / "tasks" / "train.jsonl", out / "data", ProgrammaticTeacher())
    return out


@pytest.fixture(scope="session")
def train_records(suite_dir) -> list[dict]:
    return load_tasks(suite_dir / "tasks" / "train.jsonl")


@pytest.fixture(scope="session")
def test_records(suite_dir) -> list[dict]:
    return load_tasks(suite_dir / "tasks" / "test.jsonl")


@pytest.fixture(scope="session")
def tokenizer_texts(suite_dir) -> list[str]:
    rows = read_jsonl(suite_dir / "data" / "sft.jsonl")
    return [r["question"] for r in rows] + [r["response"] for r in rows]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_texts):
    """tiny_model_dir(arch, step_tokens=True) -> a saved random model of that architecture."""
    cache: dict = {}

    def build(arch: str = "llava", step_tokens: bool = True) -> Path:
        key = (arch, step_tokens)
        if key not in cache:
            tok = models.train_tokenizer(tokenizer_texts, vocab_size=400,
                                         with_step_tokens=step_tokens)
            model, processor = models.build_tiny(arch, tok)
            cache[key] = models.save(model, processor,
                                     tmp_path_factory.mktemp(f"{arch}-{step_tokens}"),
                                     meta={"from_scratch": True, "arch": arch})
        return cache[key]

    return build


@pytest.fixture(scope="session")
def sft_model_dir(tmp_path_factory, tiny_model_dir, suite_dir) -> Path:
    """The tiny Llava after a short CoS SFT: it writes step-format chains (not always right)."""
    from chainstep.config import SFTConfig
    from chainstep.train_sft import train_sft

    cfg = SFTConfig(max_steps=60, per_device_train_batch_size=8, learning_rate=3e-3, warmup_steps=5,
                    save_steps=1000)
    return train_sft(tiny_model_dir("llava"), suite_dir / "data" / "sft.jsonl",
                     tmp_path_factory.mktemp("sft") / "model", cfg)


class _Endpoint(BaseHTTPRequestHandler):
    """An OpenAI-compatible chat endpoint that fails `fail_first` times with `status`."""

    replies: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if len(self.server.requests) <= self.server.fail_first:
            self.send_response(self.server.status)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "slow down"}}')
            return
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": self.server.text}}],
                 "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def endpoint():
    def start(text: str, fail_first: int = 0, status: int = 429):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Endpoint)
        server.requests, server.fail_first, server.status, server.text = [], fail_first, status, text
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1"

    servers = []
    yield start
    for server in servers:
        server.shutdown()
