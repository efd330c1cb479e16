"""`chainstep serve` over real HTTP on localhost: the openai client, streaming, search
strategies, batching, bad requests, the API key, and construct with the server as teacher."""

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from chainstep.client import image_data_url
from chainstep.prm import PRM
from chainstep.sampling import Policy
from chainstep.server import ServeConfig, create_app
from chainstep.steps import parse

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")


def start_server(policy, prm=None, **cfg):
    app = create_app(policy, prm, ServeConfig(**cfg), name="tiny-sft")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def served(sft_model_dir, tiny_model_dir):
    policy = Policy.from_dir(sft_model_dir, batch_size=16)
    prm = PRM.from_dir(tiny_model_dir("llava"))
    server, thread, url = start_server(policy, prm, max_n=4, max_tokens=256, max_image_pixels=200_000,
                                       batch_window_ms=200, max_body_bytes=1_000_000)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def image_url(train_records):
    return image_data_url(Image.open(train_records[0]["image"]))


def client(url: str, key: str = "none"):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def user(text: str, url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def post(url: str, body, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_openai_client_gets_step_format_chat_completions(served, image_url, train_records):
    question = train_records[0]["question"]
    out = client(served).chat.completions.create(model="tiny-sft", messages=user(question, image_url),
                                                 temperature=0, max_tokens=64)
    [choice] = out.choices
    assert choice.message.content.startswith("<|reasoning_start|>")  # markers kept
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.completion_tokens > 0 and out.model == "tiny-sft"
    assert out.usage.prompt_tokens > len(question.split())  # the image tokens count too
    extra = out.model_extra["chainstep"]
    assert extra["strategy"] == "greedy" and len(extra["choices"]) == 1
    many = client(served).chat.completions.create(model="tiny-sft", messages=user(question, image_url),
                                                  temperature=1.0, n=3, max_tokens=16, seed=1)
    assert len(many.choices) == 3
    assert [m.id for m in client(served).models.list().data] == ["tiny-sft"]


def test_streaming_sends_steps_that_add_up_to_the_whole_answer(served, image_url, train_records):
    messages = user(train_records[1]["question"], image_url)
    whole = client(served).chat.completions.create(model="tiny-sft", messages=messages, temperature=0,
                                                   max_tokens=96).choices[0].message.content
    chunks = list(client(served).chat.completions.create(model="tiny-sft", messages=messages,
                                                         temperature=0, max_tokens=96, stream=True))
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(pieces) == whole
    assert all(p.endswith("<|reasoning_step_end|>") for p in pieces[:-1])  # one step per chunk
    tail = whole.rsplit("<|reasoning_step_end|>", 1)[-1]  # the answer, or a step cut by max_tokens
    assert len(pieces) == whole.count("<|reasoning_step_end|>") + bool(tail)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    described = chunks[-1].model_extra["chainstep"]["choices"]  # streamed responses carry it too
    assert len(described) == 1 and ("format_error" in described[0])


def test_the_prm_runs_only_when_asked(served, image_url):
    def scored() -> int:
        return json.loads(urllib.request.urlopen(f"{served}/health").read())["prm_chains_scored"]

    body = {"model": "tiny-sft", "messages": user("How many?", image_url), "temperature": 0, "max_tokens": 8}
    before = scored()
    assert post(served, body)[0] == 200
    assert scored() == before
    status, reply = post(served, {**body, "max_tokens": 160, "chainstep": {"scores": True}})
    assert status == 200
    choice = reply["chainstep"]["choices"][0]
    assert choice["format_error"] or ("chain_score" in choice and scored() == before + 1)


def test_health_names_the_chain_score_rule(served):
    health = json.loads(urllib.request.urlopen(f"{served}/health").read())
    assert health["scoring"] == {"step_weight": 0.2, "aggregate": "mean", "source": "default"}


def test_choices_are_scored_under_the_verifiers_rule(tiny_model_dir, train_records):
    from chainstep.scoring import ChainScore
    from chainstep.server import describe
    from chainstep.steps import Chain, Step, render

    prm = PRM.from_dir(tiny_model_dir("llava"), aggregate="min", step_weight=0.6)
    text = render(Chain([Step("Read", "Value: 1", "ok"), Step("Add", "1 + 1 = 2", "ok")], "2"))
    [choice] = describe([text], train_records[0], prm)
    want = ChainScore(0.6, "min")(prm.score([train_records[0]], [text])[0])
    assert choice["chain_score"] == pytest.approx(want, abs=1e-6)


def test_a_body_past_the_limit_is_refused_before_parsing(served):
    import http.client
    from urllib.parse import urlparse

    url = urlparse(served)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")  # announces 2 MB, sends none of it
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", "2000000")
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and "limit is 1000000" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_an_error_after_streaming_began_is_said_in_the_stream(sft_model_dir, image_url):
    policy = Policy.from_dir(sft_model_dir)
    real, calls = policy.generate, []

    def fails_on_the_second_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args, **kwargs)

    policy.generate = fails_on_the_second_step
    server, thread, url = start_server(policy)
    try:
        body = {"model": "tiny-sft", "messages": user("How many?", image_url), "temperature": 0,
                "max_tokens": 96, "stream": True}
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            events = [line[6:] for line in response.read().decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        failure = json.loads(events[-2])["error"]["message"]
        assert "generation failed after streaming began: out of memory" in failure
        status, reply = post(url, {**body, "stream": False, "chainstep": {"scores": True}})
        assert status == 400 and "needs a PRM" in reply["error"]["message"]
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_stop_sequences_cut_the_text(served, image_url):
    def ask(**kwargs):
        return client(served).chat.completions.create(model="tiny-sft", messages=user("How many?", image_url),
                                                      temperature=0, max_tokens=64, **kwargs).choices[0]

    whole = ask().message.content
    stop = whole[len(whole) // 2:len(whole) // 2 + 6]  # a piece of what the model writes anyway
    cut = ask(stop=[stop])
    assert cut.message.content == whole[:whole.index(stop)]
    assert cut.finish_reason == "stop"


@pytest.mark.parametrize("strategy", ["sc", "bon", "beam"])
def test_search_strategies_with_step_scores(served, image_url, train_records, strategy):
    out = client(served).chat.completions.create(
        model="tiny-sft", messages=user(train_records[2]["question"], image_url), temperature=1.0,
        max_tokens=48, seed=0, extra_body={"chainstep": {"strategy": strategy, "n": 2}})
    extra = out.model_extra["chainstep"]
    assert extra["strategy"] == strategy and extra["n"] == 2 and len(out.choices) == 1
    chosen = extra["choices"][0]
    text = out.choices[0].message.content
    assert chosen["answer"] == (None if chosen["format_error"] else parse(text).answer)
    if strategy == "sc":  # majority vote never runs the PRM
        assert "chain_score" not in chosen and extra["prm_chains"] == 0
    else:  # the PRM ranked 2 candidates, and a chosen chain that parses carries its scores
        assert extra["prm_chains"] >= 2
        assert chosen["format_error"] or (0 <= chosen["chain_score"] <= 1
                                          and all(0 <= s["score"] <= 1 for s in chosen["steps"]))
    if strategy == "beam":
        assert extra["prm_forward_passes"] >= 1


def test_concurrent_requests_are_batched(served, image_url):
    health = json.loads(urllib.request.urlopen(f"{served}/health").read())
    body = {"model": "tiny-sft", "messages": user("How many?", image_url), "temperature": 0, "max_tokens": 8}
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: post(served, body), range(6)))
    assert all(status == 200 for status, _ in results)
    after = json.loads(urllib.request.urlopen(f"{served}/health").read())
    assert after["requests"] - health["requests"] == 6
    assert after["batches"] - health["batches"] < 6


def test_a_seeded_request_does_not_depend_on_its_batch_mates(served, image_url):
    body = {"model": "tiny-sft", "messages": user("How many?", image_url), "temperature": 1.0, "n": 2,
            "max_tokens": 24, "seed": 7}
    alone = post(served, body)[1]["choices"]
    with ThreadPoolExecutor(3) as pool:  # arrive together, inside one batch window
        together = list(pool.map(lambda _: post(served, body)[1]["choices"], range(3)))
    assert all(t == alone for t in together)
    other = post(served, {**body, "seed": 8})[1]["choices"]
    assert other != alone


def _png(size) -> str:
    buffer = io.BytesIO()
    Image.new("1", size).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


CORRUPT_PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(8)).decode()


@pytest.mark.parametrize("body,status,words", [
    (b"{not json", 400, "invalid request"),
    ({"model": "gpt-4o", "messages": []}, 404, "not served here"),
    ({"model": "tiny-sft", "messages": "x"}, 400, "messages"),
    ({"model": "tiny-sft", "n": 1000}, 400, "n=1000 exceeds"),
    ({"model": "tiny-sft", "max_tokens": 10 ** 7}, 400, "max_tokens=10000000 exceeds"),
    ({"model": "tiny-sft", "n": 2, "temperature": 0}, 400, "needs temperature > 0"),
    ({"model": "tiny-sft", "image": CORRUPT_PNG}, 400, "cannot be decoded"),
    ({"model": "tiny-sft", "image": "https://example.com/cat.png"}, 400, "data URL"),
    ({"model": "tiny-sft", "image": _png((1000, 1000))}, 413, "decompression-bomb guard"),
    ({"model": "tiny-sft", "image": None}, 400, "exactly one image_url"),
    ({"model": "tiny-sft", "chainstep": {"strategy": "magic"}}, 400, "chainstep.strategy"),
])
def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_lives(served, image_url, body, status, words):
    if isinstance(body, dict):
        image = body.pop("image", image_url)
        parts = [{"type": "text", "text": "How many?"}] + \
            ([{"type": "image_url", "image_url": {"url": image}}] if image else [])
        body = {"messages": [{"role": "user", "content": parts}], **body}
    got, reply = post(served, body)
    assert got == status and words in reply["error"]["message"], reply
    assert json.loads(urllib.request.urlopen(f"{served}/health").read())["status"] == "ok"


def test_api_key(sft_model_dir, image_url):
    server, thread, url = start_server(Policy.from_dir(sft_model_dir), api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        assert client(url, "s3cret").models.list().data[0].id == "tiny-sft"
        assert json.loads(urllib.request.urlopen(f"{url}/health").read())["status"] == "ok"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_construct_with_the_served_model_as_teacher(served, train_records, tmp_path):
    """The closure: `chainstep construct --teacher` against `chainstep serve`, over localhost."""
    from chainstep.client import ChatClient
    from chainstep.construct import construct
    from chainstep.records import read_jsonl
    from chainstep.teacher import HTTPTeacher

    records = train_records[:4]
    teacher = HTTPTeacher(ChatClient(f"{served}/v1", "tiny-sft", max_retries=0, max_tokens=96))
    stats = construct(records, tmp_path, teacher, concurrency=4)
    accepted = {r["id"] for r in read_jsonl(tmp_path / "sft.jsonl")}
    rejected = {r["id"]: r["reason"] for r in read_jsonl(tmp_path / "rejects.jsonl")}
    assert accepted | set(rejected) == {r["id"] for r in records}
    assert not any(reason.startswith("remote:") for reason in rejected.values()), rejected
    assert stats["tokens"]["completion_tokens"] > 0
