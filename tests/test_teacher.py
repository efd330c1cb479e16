"""The remote teacher: prompt, reply rendering, faults, concurrency, kill -9 and resume."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from chainstep.client import ChatClient
from chainstep.construct import construct
from chainstep.records import read_jsonl
from chainstep.steps import parse
from chainstep.teacher import HTTPTeacher, ProgrammaticTeacher, reply_to_chain_text


def json_chain(record: dict, answer: str | None = None) -> str:
    chain = ProgrammaticTeacher().chain(record)
    return json.dumps({"steps": [{"name": s.name, "thought": s.thought, "reflection": s.reflection}
                                 for s in chain.steps], "answer": answer or record["answer"]})


class _Scripted(BaseHTTPRequestHandler):
    """Answers each record (found by the `[id]` tag in its question) as its script says."""

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][0]["content"][-1]["text"]
        rid = re.search(r"\[(\S+)\]", text).group(1)
        with self.server.lock:
            attempt = self.server.attempts[rid] = self.server.attempts.get(rid, 0) + 1
        kind = self.server.script.get(rid, "ok")
        time.sleep(self.server.delay)
        if kind == "429x2" and attempt <= 2 or kind == "500":
            return self._send(429 if kind == "429x2" else 500, b'{"error": {"message": "busy"}}')
        if kind == "timeout":
            time.sleep(1.0)
        if kind == "truncated":
            return self._send(200, b'{"id": "x", "object": "chat.completion", "choi')
        record = self.server.records[rid]
        content = {"garbage": "I believe the answer is " + record["answer"],
                   "wrong": json_chain(record, answer="999")}.get(kind) or json_chain(record)
        reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": content}}],
                 "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
        self._send(200, json.dumps(reply).encode())

    def _send(self, status: int, data: bytes):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Retry-After", "0")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def scripted(train_records):
    servers = []

    def start(script: dict[str, str], delay: float = 0.0):
        records = {r["id"]: {**r, "question": f"{r['question']} [{r['id']}]"} for r in train_records[:12]}
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
        server.records, server.script, server.delay = records, script, delay
        server.attempts, server.lock = {}, threading.Lock()
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server, f"http://127.0.0.1:{server.server_address[1]}/v1", list(records.values())

    yield start
    for server in servers:
        server.shutdown()


def test_reply_rendering_accepts_marked_up_or_json_chains(train_records):
    record = train_records[0]
    marked = ProgrammaticTeacher().explain(record)
    assert reply_to_chain_text("Sure!\n" + marked) == marked
    as_json = reply_to_chain_text("```json\n" + json_chain(record) + "\n```")
    assert parse(as_json).answer == record["answer"]
    assert reply_to_chain_text("no chain here") == "no chain here"


def test_prompt_carries_image_question_and_answer(scripted):
    server, url, records = scripted({})
    teacher = HTTPTeacher(ChatClient(url, "teacher", max_retries=0))
    text = teacher.explain(records[0])
    assert parse(text).answer == records[0]["answer"]
    assert teacher.usage == {"prompt_tokens": 100, "completion_tokens": 20}
    prompt = teacher.prompt(records[0])
    assert records[0]["question"] in prompt and f"Correct final answer: {records[0]['answer']}" in prompt


def test_every_record_ends_accepted_or_rejected_with_its_reason(scripted, tmp_path):
    """429s then success, 500s, timeouts, truncated JSON, wrong-format text and a wrong answer:
    nothing is lost, each failure names its cause."""
    ids = None
    server, url, records = scripted({})
    ids = [r["id"] for r in records]
    server.script.update({ids[0]: "429x2", ids[1]: "500", ids[2]: "timeout", ids[3]: "truncated",
                          ids[4]: "garbage", ids[5]: "wrong"})
    teacher = HTTPTeacher(ChatClient(url, "teacher", max_retries=2, timeout=0.5))
    stats = construct(records, tmp_path, teacher, concurrency=4)
    accepted = {r["id"] for r in read_jsonl(tmp_path / "sft.jsonl")}
    rejected = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "rejects.jsonl")}
    assert accepted | set(rejected) == set(ids) and not accepted & set(rejected)
    assert ids[0] in accepted and server.attempts[ids[0]] == 3
    assert rejected[ids[1]] == "remote:http_500" and server.attempts[ids[1]] == 3
    assert rejected[ids[2]] == "remote:timeout"
    assert rejected[ids[3]] == "remote:bad_response"
    assert rejected[ids[4]].startswith("format:")
    assert rejected[ids[5]] == "answer_mismatch"
    assert stats["accepted"] == len(ids) - 5 and stats["rejected"] == 5
    by_reason = stats["rejected_by_reason"]
    assert by_reason["remote:timeout"] == by_reason["answer_mismatch"] == 1
    assert stats["tokens"]["completion_tokens"] == 20 * (len(ids) - 3)

    server.script.clear()  # the endpoint recovered: only remote failures are asked again
    again = construct(records, tmp_path, HTTPTeacher(ChatClient(url, "teacher", max_retries=0)),
                      concurrency=4, retry_remote=True)
    rejected = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "rejects.jsonl")}
    assert set(rejected) == {ids[4], ids[5]} and again["accepted"] == len(ids) - 2
    assert len(read_jsonl(tmp_path / "sft.jsonl")) == len(ids) - 2  # no duplicates


@pytest.mark.slow
def test_kill_minus_9_mid_run_loses_nothing_and_duplicates_nothing(scripted, tmp_path):
    server, url, records = scripted({}, delay=0.3)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(r) + "\n" for r in records))
    command = [sys.executable, "-m", "chainstep", "construct", str(tasks), "--out", str(tmp_path / "d"),
               "--teacher", url, "--model", "teacher", "--concurrency", "2"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sft = tmp_path / "d" / "sft.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not sft.exists() or len(sft.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(sft.read_text().splitlines())
    assert 3 <= done_before < len(records)
    subprocess.run(command, check=True, capture_output=True)
    ids = [r["id"] for r in read_jsonl(sft)]
    assert sorted(ids) == sorted(r["id"] for r in records)  # all there, each once
    assert sum(server.attempts.values()) <= len(records) + 2  # only the in-flight ones asked twice
