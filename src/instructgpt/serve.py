"""`instructgpt serve`: an OpenAI-compatible HTTP server and a web chat page.

    GET  /                      the chat page (web/index.html)
    GET  /health                liveness, plus how many requests and model calls were served
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   chat, rendered with the one chat template; SSE streaming or one JSON reply
    POST /v1/completions        plain text: bos + encode(prompt), no template
    GET  /docs, /openapi.json   FastAPI's schema

Batching. Handlers do not touch the model: they validate a request, turn it into prompt ids and put a
`Job` on an asyncio queue. One batcher task takes the first job, gathers whatever else arrives within
`batch_wait_ms` (or until `max_batch_size` rows), groups the jobs by sampling parameters and runs ONE
`generate.stream` call per group on a single worker thread. Prompts of different lengths share the
batch (the engine pads them on the left); every row has its own token limit and stop strings, checked
as the tokens come, and the call ends when every row is done. Grouping keeps results independent of
batch-mates: greedy requests (temperature 0) form one group whatever their other settings; sampled
requests group by (temperature, top_p, top_k); a request with a `seed` runs on its own, so that the
seed alone decides its samples.

Errors follow OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 422 for a body whose
fields have the wrong type or range (FastAPI's validation, as the schema documents), 400 for malformed
JSON and for limits of this model and server (context length, number of messages, n, max_tokens).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import TextStream, render_prompt
from .errors import UserError
from .generate import SamplingParams, stream
from .model import Seq2Seq
from .tokenizer import Tokenizer


@dataclass
class ServerConfig:
    model_name: str = "instructgpt"  # the id /v1/models reports (serve uses the folder's name)
    max_batch_size: int = 32  # most rows (requests x n) in one engine call
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first one
    max_messages: int = 64  # longest conversation a chat request may send
    max_n: int = 8  # most choices per request
    max_stop: int = 4  # most stop strings per request (OpenAI's limit)


# -- errors -----------------------------------------------------------------------------------------


class APIError(Exception):
    """A request this server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


# -- request and response bodies --------------------------------------------------------------------


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both endpoints. Unknown fields are ignored, as clients send many."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any name is accepted: this server holds one model
    max_tokens: int | None = None  # default: what the context leaves after the prompt
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0: all)")
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)


class CompletionRequest(_Sampling):
    prompt: str | list[str]


# -- the batcher ------------------------------------------------------------------------------------


@dataclass
class Delta:
    """New text of one choice; `finish_reason` set on its last delta."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int  # tokens generated so far for this choice


@dataclass(eq=False)
class Job:
    """One request's rows: `n` continuations of one prompt. Events go to `events` from the worker
    thread: Deltas, then None when every choice has finished, or an Exception."""

    prompt: list[int]
    params: SamplingParams
    n: int
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the client went away; its rows stop counting

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def deltas(self) -> AsyncIterator[Delta]:
        while (event := await self.events.get()) is not None:
            if isinstance(event, Exception):
                raise event
            yield event


def group_key(job: Job) -> tuple:
    p = job.params
    if p.temperature == 0:
        return ("greedy",)
    if p.seed is not None:
        return ("seeded", id(job))
    return ("sampled", p.temperature, p.top_p, p.top_k)


class Batcher:
    """Gathers jobs from many requests and runs them through the engine, one call per batch."""

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, config: ServerConfig):
        self.model, self.tok, self.config = model, tok, config
        self.context = model.config.block_size
        self.seq2seq = isinstance(model, Seq2Seq)
        self.model_calls = 0  # engine calls made (each one batch)
        self.jobs_done = 0  # jobs that went through the engine
        self.rows_done = 0
        self.queue: asyncio.Queue[Job] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instructgpt-model")
        self._task: asyncio.Task | None = None

    def fits(self, prompt_len: int, max_new: int) -> bool:
        """Whether a prompt and its token budget fit in one engine call (the KV cache's size)."""
        if self.seq2seq:
            return prompt_len <= self.context and max_new + 1 <= self.context
        return prompt_len + max_new <= self.context

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    def submit(self, prompt: list[int], params: SamplingParams, n: int, stop: list[str]) -> Job:
        if self.queue is None:
            raise RuntimeError("the batcher is not running (start the app with its lifespan)")
        job = Job(prompt, params, n, stop, asyncio.get_running_loop())
        self.queue.put_nowait(job)
        return job

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            rows = jobs[0].n
            deadline = loop.time() + self.config.batch_wait_ms / 1000
            while rows < self.config.max_batch_size:
                try:
                    job = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    wait = deadline - loop.time()
                    if wait <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self.queue.get(), wait)
                    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                        break
                jobs.append(job)
                rows += job.n
            for batch in self.plan(jobs):
                await loop.run_in_executor(self._executor, self.run_batch, batch)

    def plan(self, jobs: list[Job]) -> list[list[Job]]:
        """Split gathered jobs into engine calls: one sampling group per call, each call within the
        batch size and the context (longest prompt + largest token budget), in arrival order."""
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if not job.cancelled:
                groups.setdefault(group_key(job), []).append(job)
        batches = []
        for group in groups.values():
            batch, T, N, rows = [], 0, 0, 0
            for job in group:
                t, m = max(T, len(job.prompt)), max(N, job.params.max_new_tokens)
                if batch and (rows + job.n > self.config.max_batch_size or not self.fits(t, m)):
                    batches.append(batch)
                    batch, t, m, rows = [], len(job.prompt), job.params.max_new_tokens, 0
                batch.append(job)
                T, N, rows = t, m, rows + job.n
            batches.append(batch)
        return batches

    def run_batch(self, batch: list[Job]) -> None:
        """One engine call over every row of `batch` (runs on the worker thread)."""
        open_rows = {job: job.n for job in batch}
        try:
            self._generate(batch, open_rows)
        except Exception as e:  # a failed call answers its requests with a 500; the server goes on
            for job in batch:
                if open_rows[job] > 0 and not job.cancelled:
                    job.emit(APIError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                      type="server_error"))
        finally:
            self.jobs_done += len(batch)
            self.rows_done += sum(job.n for job in batch)

    def _generate(self, batch: list[Job], open_rows: dict[Job, int]) -> None:
        rows = [(job, i, TextStream(self.tok, job.stop)) for job in batch for i in range(job.n)]
        done = [False] * len(rows)
        params = replace(batch[0].params, max_new_tokens=max(job.params.max_new_tokens for job in batch))
        prompts = [job.prompt for job, _, _ in rows]

        def close(r: int, delta: str, reason: str) -> None:
            job, i, text = rows[r]
            done[r] = True
            job.emit(Delta(i, delta, reason, text.n_tokens))
            open_rows[job] -= 1
            if open_rows[job] == 0:
                job.emit(None)

        self.model_calls += 1
        steps = stream(self.model, prompts, params, self.tok.eos_id, self.tok.pad_id, start_id=self.tok.bos_id,
                       all_finished=lambda _: all(done))
        for tokens, _, _ in steps:
            for r, token in enumerate(tokens.tolist()):
                job, i, text = rows[r]
                if done[r]:
                    continue
                if job.cancelled:
                    done[r] = True
                    continue
                delta, reason = text.push(token)
                if reason is None and text.n_tokens >= job.params.max_new_tokens:
                    delta, reason = delta + text.finish_length(), "length"
                if reason is not None:
                    close(r, delta, reason)
                elif delta:
                    job.emit(Delta(i, delta, None, text.n_tokens))
        for r in range(len(rows)):  # only if the engine stopped early: never leave a client waiting
            if not done[r] and not rows[r][0].cancelled:
                close(r, rows[r][2].finish_length(), "length")


# -- the app ----------------------------------------------------------------------------------------


def _max_tokens(req: _Sampling) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def _stop_list(req: _Sampling, config: ServerConfig) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > config.max_stop:
        raise APIError(f"stop takes at most {config.max_stop} strings, got {len(stop)}", param="stop")
    return [s for s in stop if s]


def _params(req: _Sampling, prompt_len: int, batcher: Batcher, config: ServerConfig) -> SamplingParams:
    """Sampling parameters of a request, with its limits checked against the model and server."""
    if not 1 <= req.n <= config.max_n:
        raise APIError(f"n must be between 1 and {config.max_n}, got {req.n}", param="n")
    ctx = batcher.context
    if not batcher.fits(prompt_len, 1):
        raise APIError(f"This model's maximum context length is {ctx} tokens; the prompt is {prompt_len} "
                       f"tokens, which leaves no room for a reply. Please shorten the prompt.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    max_tokens = _max_tokens(req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = ctx - 1 if batcher.seq2seq else ctx - prompt_len
    elif max_tokens < 1:
        raise APIError(f"{param} must be at least 1, got {max_tokens}", param=param)
    elif not batcher.fits(prompt_len, max_tokens):
        raise APIError(f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                       f"completion). Please reduce the prompt or the completion length.",
                       param=param, code="context_length_exceeded")
    return SamplingParams(max_new_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                          top_p=req.top_p, seed=req.seed)


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError("the request body is not valid JSON", code="invalid_json")
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        return APIError("the request body must be a JSON object (sent with Content-Type: application/json)",
                        code="invalid_json")
    parts, first = [], None
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # A union (str | list[str]) reports every branch; the field path is what a user needs.
        loc = [x for x in loc if not x.startswith(("list[", "str", "int", "float"))]
        path = ".".join(loc)
        first = first or path or None
        parts.append(f"{path}: {e.get('msg')}" if path else str(e.get("msg")))
    return APIError("; ".join(dict.fromkeys(parts)), param=first, status=422, code="invalid_value")


def create_app(model: torch.nn.Module, tok: Tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """The server around a loaded model. Run it with uvicorn, or in tests with `with TestClient(app)`
    (the batcher starts in the app's lifespan). `app.state.batcher.model_calls` counts engine calls."""
    config = config or ServerConfig()
    model.eval()
    batcher = Batcher(model, tok, config)

    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="instructgpt", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server for an instructgpt model, with a web chat page.")
    app.state.batcher = batcher
    app.state.config = config
    app.state.requests = 0

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return _error_response(APIError(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(resources.files("instructgpt").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": config.model_name, "context": batcher.context,
                "requests": app.state.requests, "model_calls": batcher.model_calls, "rows": batcher.rows_done}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "instructgpt", "context_length": batcher.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest):
        if len(req.messages) > config.max_messages:
            raise APIError(f"too many messages: {len(req.messages)}; this server takes at most "
                           f"{config.max_messages}", param="messages")
        try:
            prompt = render_prompt(tok, [m.model_dump() for m in req.messages])
        except UserError as e:
            raise APIError(str(e), param="messages") from None
        return await _answer(req, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError("prompt must not be an empty list", param="prompt")
        if len(texts) * req.n > config.max_batch_size:
            raise APIError(f"{len(texts)} prompts x n={req.n} is more than the {config.max_batch_size} "
                           f"rows this server runs at once", param="prompt")
        return await _answer(req, [[tok.bos_id] + tok.encode(t) for t in texts], chat=False)

    async def _answer(req: _Sampling, prompts: list[list[int]], chat: bool):
        params = [_params(req, len(p), batcher, config) for p in prompts]
        stop = _stop_list(req, config)
        app.state.requests += 1
        jobs = [batcher.submit(p, sp, req.n, stop) for p, sp in zip(prompts, params)]
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": config.model_name}
        usage_prompt = sum(len(p) for p in prompts)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(jobs, req.n, chat, meta, usage_prompt, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            texts: dict[int, list[str]] = {}
            finals: dict[int, Delta] = {}
            for j, job in enumerate(jobs):
                async for d in job.deltas():
                    k = j * req.n + d.index
                    texts.setdefault(k, []).append(d.text)
                    if d.finish_reason is not None:
                        finals[k] = d
        except asyncio.CancelledError:
            for job in jobs:
                job.cancelled = True
            raise
        completion_tokens = sum(d.tokens for d in finals.values())
        if chat:
            choices = [{"index": k, "message": {"role": "assistant", "content": "".join(texts.get(k, []))},
                        "finish_reason": finals[k].finish_reason, "logprobs": None} for k in sorted(finals)]
        else:
            choices = [{"index": k, "text": "".join(texts.get(k, [])), "finish_reason": finals[k].finish_reason,
                        "logprobs": None} for k in sorted(finals)]
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": {"prompt_tokens": usage_prompt, "completion_tokens": completion_tokens,
                          "total_tokens": usage_prompt + completion_tokens}}

    async def _stream(jobs: list[Job], n: int, chat: bool, meta: dict, usage_prompt: int,
                      include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(k: int, text: str | None, finish: str | None, first: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                choice = {"index": k, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": k, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {**meta, "object": obj, "choices": [choice]}

        completion_tokens = 0
        try:
            if chat:
                for k in range(len(jobs) * n):
                    yield _sse(chunk(k, None, None, first=True))
            # Jobs of one request run in the same engine call, so reading them in order costs nothing.
            for j, job in enumerate(jobs):
                async for d in job.deltas():
                    k = j * n + d.index
                    if d.text:
                        yield _sse(chunk(k, d.text, None))
                    if d.finish_reason is not None:
                        completion_tokens += d.tokens
                        yield _sse(chunk(k, None, d.finish_reason))
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [],
                            "usage": {"prompt_tokens": usage_prompt, "completion_tokens": completion_tokens,
                                      "total_tokens": usage_prompt + completion_tokens}})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the headers are gone; report in the stream, as OpenAI does
            yield _sse(error_body(e.message, e.type, e.param, e.code))
        finally:  # a client that disconnects frees its rows at the next step
            for job in jobs:
                job.cancelled = True

    return app


def load_app(folder: str | Path, device: str = "auto", config: ServerConfig | None = None) -> FastAPI:
    """create_app for a model folder (model.safetensors, config.json, tokenizer.json)."""
    from .checkpoint import load_model
    from .distributed import resolve_device

    folder = Path(folder)
    tok = Tokenizer.load(folder / "tokenizer.json")
    model = load_model(folder, device=resolve_device(device))
    if model.config.vocab_size < tok.vocab_size:
        raise UserError(f"{folder}: the tokenizer has {tok.vocab_size} tokens, "
                        f"the model only {model.config.vocab_size}")
    config = config or ServerConfig(model_name=folder.resolve().name)
    return create_app(model, tok, config)


def serve_command(
    model: Annotated[Path, tyro.conf.Positional],
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    max_batch_size: int = 32,
    batch_wait_ms: float = 5.0,
    max_messages: int = 64,
    max_n: int = 8,
    name: str | None = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a web chat page at /.

    Args:
        model: a model folder (model.safetensors, config.json, tokenizer.json), e.g. RUN/sft.
        host: address to bind; 127.0.0.1 keeps the server to this machine (0.0.0.0 opens it to the network).
        port: TCP port.
        device: auto, cpu or cuda[:N].
        max_batch_size: most rows (requests x n) generated together in one engine call.
        batch_wait_ms: how long to wait for more requests to batch with the first one.
        max_messages: longest conversation a chat request may send.
        max_n: most choices per request.
        name: the model id the API reports (default: the folder's name).
    """
    import uvicorn

    if max_batch_size < 1 or not 1 <= max_n <= max_batch_size:
        raise UserError(f"need 1 <= --max-n <= --max-batch-size, got {max_n} and {max_batch_size}")
    if batch_wait_ms < 0 or max_messages < 1:
        raise UserError("--batch-wait-ms must be >= 0 and --max-messages >= 1")
    folder = Path(model)
    config = ServerConfig(model_name=name or folder.resolve().name, max_batch_size=max_batch_size,
                          batch_wait_ms=batch_wait_ms, max_messages=max_messages, max_n=max_n)
    app = load_app(folder, device, config)
    print(f"serving {config.model_name} on http://{host}:{port}  (chat page at /, API under /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")

