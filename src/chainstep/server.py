"""`chainstep serve`: an OpenAI-compatible chat-completions server for a step-reasoning VLM.

    chainstep serve runs/final/models/sft --prm runs/final/models/prm --port 8000

`POST /v1/chat/completions` (one user turn: text plus an `image_url` part holding a data URL;
`n`, `temperature`, `top_p`, `max_tokens`, `stop`, `seed`, `stream`), `GET /v1/models`,
`GET /health`. `message.content` is the step-format text, markers included. The extension field
`"chainstep": {"strategy": "greedy"|"sc"|"bon"|"weighted"|"beam", "n": N}` picks a search
strategy (the PRM ones need `--prm`); every response, streamed or not, carries a `chainstep` field
with each choice's parsed steps, and their PRM scores when asked (`"scores": true`) or when the
strategy ranks by them. Bodies past `max_body_bytes` are refused before any JSON is parsed, and
images are decoded off the event loop.

Requests that arrive together are generated together: a batcher collects them for a few
milliseconds and runs one batched `generate` per set of sampling parameters. Streaming sends one
reasoning step per chunk (each step is generated, as in step search, up to `<|reasoning_step_end|>`).
Bad requests get a 4xx with a message, never a dead server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Literal

from PIL import Image
from pydantic import BaseModel, Field

from .config import VERIFIER_STRATEGIES, ServeConfig, check_strategy
from .errors import ChainstepError
from .inputs import encode_prompt
from .sampling import Generation, Policy, SamplingParams, load_policy
from .search import beam_search, select
from .steps import ANSWER_END, FormatError, parse
from .verifier import Verifier, load_verifier


class ContentPart(BaseModel):
    type: str
    text: str | None = None
    image_url: dict | None = None


class Message(BaseModel):
    role: str
    content: str | list[ContentPart] | None = None


class SearchOptions(BaseModel):
    strategy: Literal["greedy", "sc", "bon", "weighted", "beam"] = "greedy"
    n: int = Field(1, ge=1)
    scores: bool = False  # PRM scores of every step in the `chainstep` field (needs --prm)


class ChatRequest(BaseModel):
    model: str
    messages: list[Message]
    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    chainstep: SearchOptions | None = None


class RequestError(Exception):
    """A client mistake: status code and an OpenAI-style message."""

    def __init__(self, status: int, message: str, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


# ---------------------------------------------------------------- request -> record


def decode_image(url: str, cfg: ServeConfig) -> Image.Image:
    """A data URL to an RGB image, refusing oversized, bomb-sized or corrupt ones."""
    if not url.startswith("data:"):
        raise RequestError(400, "image_url must be a data URL (data:image/png;base64,...); "
                                "the server fetches nothing over the network")
    try:
        header, payload = url.split(",", 1)
        if not header.endswith(";base64"):
            raise ValueError
        data = base64.b64decode(payload, validate=True)
    except (ValueError, binascii.Error):
        raise RequestError(400, "image_url is not a valid base64 data URL") from None
    if len(data) > cfg.max_image_bytes:
        raise RequestError(413, f"image is {len(data)} bytes; the limit is {cfg.max_image_bytes}")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size  # read from the header, before any pixel is decoded
        if width * height > cfg.max_image_pixels:
            raise RequestError(413, f"image is {width}x{height} pixels; the limit is "
                                    f"{cfg.max_image_pixels} (decompression-bomb guard)")
        return image.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError, SyntaxError) as err:
        raise RequestError(400, f"image cannot be decoded: {err}") from None


def request_record(req: ChatRequest, cfg: ServeConfig) -> dict:
    """The one user turn as a task record: its text as the question, its image in memory."""
    turns = [m for m in req.messages if m.role != "system"]
    if len(turns) != 1 or turns[0].role != "user":
        raise RequestError(400, "send one user message (system messages are ignored); "
                                "chainstep serves single-turn questions")
    content = turns[0].content
    parts = [ContentPart(type="text", text=content)] if isinstance(content, str) else (content or [])
    texts = [p.text for p in parts if p.type == "text" and p.text]
    images = [p.image_url for p in parts if p.type == "image_url"]
    if len(images) != 1 or not isinstance(images[0], dict) or "url" not in images[0]:
        raise RequestError(400, f"send exactly one image_url part with a url (got {len(images)})")
    if not texts:
        raise RequestError(400, "the user message has no text part")
    return {"id": f"req-{uuid.uuid4().hex[:12]}", "image": decode_image(images[0]["url"], cfg),
            "question": "\n".join(texts), "options": None, "answer": "", "meta": {}}


# ---------------------------------------------------------------- batching


class Batcher:
    """Collects requests for `window` seconds (up to `max_batch`) and generates each group that
    shares sampling parameters in one batched call, on one worker thread that owns the model."""

    def __init__(self, policy: Policy, window: float, max_batch: int):
        self.policy, self.window, self.max_batch = policy, window, max_batch
        self.queue: asyncio.Queue | None = None
        self.worker = ThreadPoolExecutor(1)
        self.batches = self.requests = 0

    def start(self) -> None:
        self.queue = asyncio.Queue()
        asyncio.get_running_loop().create_task(self._loop())

    async def generate(self, record: dict, params: SamplingParams, prefix: str = "") -> list[Generation]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((record, prefix, params, future))
        return await future

    async def run(self, fn, *args):
        """Anything else that uses the model (PRM search), on the same worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _loop(self) -> None:
        while True:
            items = [await self.queue.get()]
            deadline = time.monotonic() + self.window
            while len(items) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            groups: dict[tuple, list] = {}
            for item in items:
                groups.setdefault(astuple(item[2]), []).append(item)
            for group in groups.values():
                await self._run_group(group[0][2], group)

    async def _run_group(self, params: SamplingParams, group: list) -> None:
        if params.seed is not None and len(group) > 1:  # a seeded request owns its random stream
            for item in group:
                await self._run_group(params, [item])
            return
        self.batches += 1
        self.requests += len(group)
        try:
            out = await self.run(lambda: self._generate(group, params))
        except Exception as err:  # noqa: BLE001 - every waiting request must hear about it
            for *_, future in group:
                future.set_exception(err)
            return
        for (*_, future), gens in zip(group, out):
            future.set_result(gens)

    def _generate(self, group: list, params: SamplingParams) -> list[list[Generation]]:
        return self.policy.generate([g[0] for g in group], params, prefixes=[g[1] for g in group],
                                    progress=False)


# ---------------------------------------------------------------- the app


def _params(req: ChatRequest, cfg: ServeConfig, n: int) -> SamplingParams:
    max_tokens = req.max_completion_tokens or req.max_tokens or min(512, cfg.max_tokens)
    if max_tokens > cfg.max_tokens:
        raise RequestError(400, f"max_tokens={max_tokens} exceeds this server's limit {cfg.max_tokens}")
    if n > cfg.max_n:
        raise RequestError(400, f"n={n} exceeds this server's limit {cfg.max_n}")
    try:
        return SamplingParams(n=n, temperature=req.temperature, top_p=req.top_p, max_tokens=max_tokens,
                              seed=req.seed)
    except ChainstepError as err:
        raise RequestError(400, str(err)) from None


def _cut_at_stop(gen: Generation, stop: str | list[str] | None) -> tuple[str, str]:
    text, reason = gen.text, "length" if gen.finish_reason == "length" else "stop"
    for s in [stop] if isinstance(stop, str) else (stop or []):
        if s and s in text:
            text, reason = text[:text.index(s)], "stop"
    return text, reason


def describe(texts: list[str], record: dict, prm: Verifier | None) -> list[dict]:
    """The extension field of each choice: parsed steps, answer and (with a PRM) their scores,
    all parsed choices scored in one batched PRM call."""
    out = []
    for text in texts:
        try:
            chain = parse(text)
        except FormatError as err:
            out.append({"format_error": err.code, "steps": None, "answer": None})
            continue
        out.append({"format_error": None, "answer": chain.answer, "steps": [
            {"name": s.name, "thought": s.thought, "reflection": s.reflection} for s in chain.steps]})
    parsed = [i for i, d in enumerate(out) if d["format_error"] is None]
    if prm is not None and parsed:
        for i, scores in zip(parsed, prm.score([record] * len(parsed), [texts[i] for i in parsed])):
            for step, score in zip(out[i]["steps"], scores.steps):
                step["score"] = score
            out[i].update(answer_score=scores.answer,
                          chain_score=prm.scoring(scores))
    return out


class ChatService:
    """What the routes do apart from HTTP: check a request against what this server can do,
    then generate, search or stream through one batcher, and describe the chains it returns."""

    def __init__(self, policy: Policy, prm: Verifier | None, cfg: ServeConfig, name: str):
        self.policy, self.prm, self.cfg, self.name = policy, prm, cfg, name
        self.batcher = Batcher(policy, cfg.batch_window_ms / 1000, cfg.max_batch)

    def health(self) -> dict:
        prm = self.prm
        return {"status": "ok", "model": self.name, "prm": prm is not None,
                "scoring": prm.scoring.describe() if prm is not None else None,
                "batches": self.batcher.batches, "requests": self.batcher.requests,
                "prm_chains_scored": prm.chains_scored if prm is not None else 0}

    def search_options(self, req: ChatRequest) -> SearchOptions:
        """The request's search, refused (RequestError) where this server cannot run it."""
        if req.model != self.name:
            raise RequestError(404, f"model {req.model!r} is not served here; this server has {self.name!r}",
                               "model_not_found")
        search = req.chainstep or SearchOptions()
        try:
            check_strategy(search.strategy, self.prm is not None)
        except ChainstepError as err:
            raise RequestError(400, f"{err}: start the server with one") from None
        if search.strategy != "greedy" and req.n != 1:
            raise RequestError(400, "with a search strategy, set chainstep.n (the search width) and n=1")
        if search.scores and self.prm is None:
            raise RequestError(400, "chainstep.scores needs a PRM: start the server with --prm DIR")
        if req.stream and (search.strategy != "greedy" or req.n != 1):
            raise RequestError(400, "stream=true serves n=1 without a search strategy")
        return search

    async def completion(self, req: ChatRequest, search: SearchOptions, record: dict, params: SamplingParams,
                         rid: str, created: int) -> dict:
        gens, extra = await self._complete(record, params, search)
        cut = [_cut_at_stop(gen, req.stop) for gen in gens]
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                   for i, (text, reason) in enumerate(cut)]
        described = await self.batcher.run(describe, [text for text, _ in cut], record, self._scorer(search))
        completion = sum(g.num_tokens for g in gens)
        processor = self.policy.processor
        prompt = await self.batcher.run(lambda: len(encode_prompt(processor, record)["input_ids"]))
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.name,
                "choices": choices, "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                              "total_tokens": prompt + completion},
                "chainstep": {"strategy": search.strategy, "n": params.n, "choices": described, **extra}}

    def _scorer(self, search: SearchOptions) -> Verifier | None:
        """The PRM runs only where it is asked for, or where the strategy ranks by it anyway."""
        return self.prm if search.scores or search.strategy in VERIFIER_STRATEGIES else None

    async def _complete(self, record: dict, params: SamplingParams, search: SearchOptions):
        if search.strategy == "greedy":
            return await self.batcher.generate(record, params), {}
        if search.strategy == "beam":
            rows, compute = await self.batcher.run(lambda: beam_search(
                self.policy, self.prm, [record], params.n, temperature=params.temperature or 1.0,
                step_tokens=min(params.max_tokens, 256), max_steps=self.cfg.max_steps, seed=params.seed))
            return [Generation(rows[0]["response"], compute["tokens_generated"], "stop")], compute
        gens = await self.batcher.generate(record, params)
        from .evaluate import response_row

        rows = [response_row(record, g) for g in gens]
        scores = await self.batcher.run(self.prm.chain_scores, [record] * len(gens), [g.text for g in gens]) \
            if search.strategy in ("bon", "weighted") else None
        chosen = select(search.strategy, rows, scores)
        return [Generation(chosen["response"], chosen["tokens"], chosen["finish_reason"])], \
            {"prm_chains": chosen["prm_chains"]}

    async def stream(self, record: dict, params: SamplingParams, req: ChatRequest, search: SearchOptions,
                     rid: str, created: int):
        """Server-sent events, one step a chunk; a failure after the first chunk is sent as an
        error event, since the status line has already gone."""
        def chunk(delta: dict, reason: str | None = None, **extra) -> str:
            body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": reason}], **extra}
            return f"data: {json.dumps(body)}\n\n"

        yield chunk({"role": "assistant", "content": ""})
        text, left, reason = "", params.max_tokens, "length"
        try:
            for _ in range(self.cfg.max_steps + 1):
                step = SamplingParams(n=1, temperature=params.temperature, top_p=params.top_p,
                                      max_tokens=left, stop_at_step=True,
                                      seed=None if text else params.seed)
                [gen] = await self.batcher.generate(record, step, prefix=text)
                whole = text + gen.text
                piece, _ = _cut_at_stop(Generation(whole, 0, gen.finish_reason), req.stop)
                yield chunk({"content": piece[len(text):]})
                text, left = piece, left - gen.num_tokens
                if piece != whole or gen.finish_reason == "stop" or ANSWER_END in gen.text:
                    reason = "stop"
                    break
                if left <= 0 or gen.finish_reason == "length":
                    break
            described = await self.batcher.run(describe, [text], record, self._scorer(search))
        except Exception as err:  # noqa: BLE001 - the client must hear that the stream broke
            failure = {"message": f"generation failed after streaming began: {err}", "type": "server_error",
                       "code": 500}
            yield f"data: {json.dumps({'error': failure})}\n\n"
            yield "data: [DONE]\n\n"
            return
        yield chunk({}, reason, chainstep={"strategy": "greedy", "n": 1, "choices": described})
        yield "data: [DONE]\n\n"


def create_app(policy: Policy, prm: Verifier | None = None, cfg: ServeConfig | None = None,
               name: str = "chainstep"):
    """The FastAPI app; `chainstep serve` runs it under uvicorn, tests run it in a thread."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    cfg = cfg or ServeConfig()
    service = ChatService(policy, prm, cfg, name)

    @asynccontextmanager
    async def lifespan(_):
        service.batcher.start()
        yield

    app = FastAPI(title="chainstep", lifespan=lifespan)
    app.state.batcher = service.batcher

    def error(status: int, message: str, code: str = "invalid_request_error") -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": code, "code": status}}, status)

    @app.exception_handler(RequestError)
    async def _request_error(_, err: RequestError):
        return error(err.status, err.message, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or "body"
        return error(400, f"invalid request: {where}: {first.get('msg', 'malformed body')}")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/") and \
                request.headers.get("authorization") != f"Bearer {cfg.api_key}":
            return error(401, "missing or wrong API key (Authorization: Bearer KEY)", "authentication_error")
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return error(411, "send a Content-Length header")
            if not length.isdigit() or int(length) > cfg.max_body_bytes:
                return error(413, f"request body is {length} bytes; the limit is {cfg.max_body_bytes}")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return service.health()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "chainstep"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        search = service.search_options(req)
        record = await asyncio.to_thread(request_record, req, cfg)
        params = _params(req, cfg, req.n if search.strategy == "greedy" else search.n)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:16]}", int(time.time())
        if req.stream:
            return StreamingResponse(service.stream(record, params, req, search, rid, created),
                                     media_type="text/event-stream")
        return await service.completion(req, search, record, params, rid, created)

    return app


def serve(model_dir: str | Path, prm_dir: str | Path | None = None, cfg: ServeConfig | None = None,
          backend: str = "hf", step_weight: float | None = None, aggregate: str | None = None) -> None:
    import uvicorn

    cfg = cfg or ServeConfig()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").exists():
        raise ChainstepError(f"{model_dir} is not a saved model directory (no config.json)")
    policy = load_policy(model_dir, backend)
    prm = load_verifier(prm_dir, step_weight=step_weight, aggregate=aggregate) if prm_dir else None
    app = create_app(policy, prm, cfg, cfg.name or model_dir.name)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
