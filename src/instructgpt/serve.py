"""`instructgpt serve`: an OpenAI-compatible HTTP server and a web chat page.

    GET  /                      the chat page (web/index.html)
    GET  /health                200 while the model loop is alive and making progress, else 503; counters
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   chat, rendered with the one chat template; SSE streaming or one JSON reply
    POST /v1/completions        plain text: bos + encode(prompt), no template
    GET  /docs, /openapi.json   FastAPI's schema

Batching. Handlers do not touch the model: they validate a request, turn it into prompt ids (on a
worker thread, after a length check that needs no tokenizer) and put a `Job` on an asyncio queue. One
batcher task takes the first job, gathers whatever else arrives within `batch_wait_ms` (or until
`max_batch_size` rows), groups the jobs by sampling parameters and runs ONE `generate.stream` call per
group on a single worker thread. Prompts of different lengths share the batch (the engine pads them on
the left); every row has its own token limit and stop strings, checked as the tokens come, and the call
ends when every row is done. Grouping keeps results independent of batch-mates: greedy requests
(temperature 0) form one group whatever their other settings; sampled requests group by (temperature,
top_p, top_k); a request with a `seed` runs on its own, so that the seed alone decides its samples.

Limits, so that no client can hold the model thread or the event loop: body size, prompt length before
tokenizing, capped stop strings (matched in time linear in the new text), queued rows (503 beyond), and
a request whose client has gone is cancelled, streaming or not. Wire format, errors and the guard (Host,
API key, JSON only) are in `openai_api`.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Annotated

import torch
import tyro
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import TextStream, render_prompt
from .errors import UserError
from .generate import SamplingParams, stream
from .model import Seq2Seq
from .openai_api import (
    GREEDY_BELOW,
    LOOPBACK_NAMES,
    MAX_LIST,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Guard,
    SamplingRequest,
    chat_logprobs,
    check_length,
    check_request,
    choice,
    chunk,
    completion_logprobs,
    error_body,
    error_response,
    is_loopback,
    log,
    max_prompt_chars,
    requested_tokens,
    sse,
    stop_list,
    unless_gone,
    usage,
    validation_error,
)
from .tokenizer import Tokenizer


@dataclass
class ServerConfig:
    model_name: str = "instructgpt"  # the id /v1/models reports (serve uses the folder's name)
    max_batch_size: int = 32  # most rows (requests x n) in one engine call
    batch_wait_ms: float = 5.0  # how long the batcher waits for more requests after the first one
    max_messages: int = 64  # longest conversation a chat request may send
    max_n: int = 8  # most choices per request
    max_stop: int = 4  # most stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # longest stop string: a stop string's cost is paid on the model thread
    max_stop_total: int = 1024  # all stop strings of a request together
    max_queued_rows: int = 256  # rows waiting or generating; a request beyond it gets a 503 with Retry-After
    max_body_bytes: int = 4 * 2**20  # larger bodies get a 413 (read and dropped up to 4x this, cut off beyond)
    stall_after_s: float = 60.0  # /health is 503 when rows wait and the engine has not stepped for this long
    stop_timeout_s: float = 10.0  # how long shutdown waits for the engine call in progress
    api_key: str | None = None  # if set, every /v1 request must send Authorization: Bearer <key>
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES  # Host headers answered ("*": any); see Guard


# -- the batcher ------------------------------------------------------------------------------------


@dataclass
class Delta:
    """New text of one choice; `finish_reason` set on its last delta."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int  # tokens generated so far for this choice
    logprobs: list[tuple[int, float, int]] | None = None  # (token, log-probability, text offset) since the last


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
    logprobs: bool = False  # the client wants each token's log-probability

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
        self.live: set[Job] = set()  # submitted and not yet through the engine
        self.last_step: float | None = None  # time.monotonic() of the engine's last step
        self.busy_since = time.monotonic()  # when rows last started waiting on an idle server
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instructgpt-model")
        self._task: asyncio.Task | None = None
        self._running: Future | None = None  # the engine call in progress

    def fits(self, prompt_len: int, max_new: int) -> bool:
        """Whether a prompt and its token budget fit in one engine call (the KV cache's size)."""
        if self.seq2seq:
            return prompt_len <= self.context and max_new + 1 <= self.context
        return prompt_len + max_new <= self.context

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def pending_rows(self) -> int:
        return sum(job.n for job in self.live if not job.cancelled)

    def stalled_s(self) -> float:
        """How long rows have waited without the engine taking a step (0 when none wait)."""
        if not self.pending_rows():
            return 0.0
        return time.monotonic() - max(self.last_step or 0.0, self.busy_since)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        """Cancel every job (the engine call ends at its next step once all its rows are cancelled) and
        wait for the call in progress at most `stop_timeout_s`."""
        for job in list(self.live):
            if not job.cancelled:
                job.cancelled = True
                job.emit(APIError("the server is shutting down", status=503, type="server_error"))
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._running is not None and not self._running.done():
            await asyncio.wait([asyncio.wrap_future(self._running)], timeout=self.config.stop_timeout_s)
        self._executor.shutdown(wait=False)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], n: int, stop: list[str],
               logprobs: bool = False) -> list[Job]:
        """Queue one job per prompt, or none: a 503 when the rows would pass `max_queued_rows`."""
        if self.queue is None or not self.alive:
            raise APIError("the model loop is not running", status=503, type="server_error")
        pending, rows = self.pending_rows(), len(prompts) * n
        if pending + rows > self.config.max_queued_rows:
            raise APIError(f"the server is busy ({pending} rows queued, limit {self.config.max_queued_rows}); "
                           "retry shortly", status=503, type="server_error", code="server_busy",
                           headers={"Retry-After": "1"})
        if pending == 0:
            self.busy_since = time.monotonic()
        loop = asyncio.get_running_loop()
        jobs = [Job(p, sp, n, stop, loop, logprobs=logprobs) for p, sp in zip(prompts, params)]
        for job in jobs:
            self.live.add(job)
            self.queue.put_nowait(job)
        return jobs

    async def _loop(self) -> None:
        try:
            await self._gather_and_run()
        except Exception as e:  # a bug here must not leave clients waiting: answer them; /health turns 503
            log.exception("the model loop stopped")
            for job in self.live:
                if not job.cancelled:
                    job.emit(APIError(f"the model loop stopped: {type(e).__name__}: {e}", status=500,
                                      type="server_error"))
            raise

    async def _gather_and_run(self) -> None:
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
                self._running = self._executor.submit(self.run_batch, batch)
                try:
                    await asyncio.wrap_future(self._running)
                finally:
                    self.live.difference_update(batch)
            self.live.difference_update(jobs)  # the cancelled ones plan() dropped

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
        lps: list[list | None] = [[] if job.logprobs else None for job, _, _ in rows]  # per row, since its last delta
        done = [False] * len(rows)
        params = replace(batch[0].params, max_new_tokens=max(job.params.max_new_tokens for job in batch))
        prompts = [job.prompt for job, _, _ in rows]

        def emit(r: int, delta: str, reason: str | None) -> None:
            job, i, text = rows[r]
            job.emit(Delta(i, delta, reason, text.n_tokens, lps[r]))
            if lps[r] is not None:
                lps[r] = []
            if reason is not None:
                done[r] = True
                open_rows[job] -= 1
                if open_rows[job] == 0:
                    job.emit(None)

        self.model_calls += 1
        self.last_step = time.monotonic()
        steps = stream(self.model, prompts, params, self.tok.stop_ids, self.tok.pad_id, start_id=self.tok.bos_id,
                       all_finished=lambda _: all(done))
        for tokens, logprobs, _ in steps:
            self.last_step = time.monotonic()
            step_lps = logprobs.tolist() if any(x is not None for x in lps) else None
            for r, token in enumerate(tokens.tolist()):
                job, i, text = rows[r]
                if done[r]:
                    continue
                if job.cancelled:
                    done[r] = True
                    continue
                if lps[r] is not None and token not in self.tok.stop_ids:
                    lps[r].append((token, step_lps[r], text.length))
                delta, reason = text.push(token)
                if reason is None and text.n_tokens >= job.params.max_new_tokens:
                    delta, reason = delta + text.finish_length(), "length"
                if reason is not None or delta:
                    emit(r, delta, reason)
        for r in range(len(rows)):  # only if the engine stopped early: never leave a client waiting
            if not done[r] and not rows[r][0].cancelled:
                emit(r, rows[r][2].finish_length(), "length")


# -- the app ----------------------------------------------------------------------------------------


def _params(req: SamplingRequest, prompt_len: int, batcher: Batcher) -> SamplingParams:
    """Sampling parameters of a request, with its limits checked against the model."""
    ctx = batcher.context
    if not batcher.fits(prompt_len, 1):
        raise APIError(f"This model's maximum context length is {ctx} tokens; the prompt is {prompt_len} "
                       f"tokens, which leaves no room for a reply. Please shorten the prompt.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    max_tokens = requested_tokens(req)
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
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    # A top_p below float32's resolution would drop every token (the engine compares in float32); any
    # top_p this small keeps the most likely token only, as the floor does.
    top_p = max(req.top_p, GREEDY_BELOW)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=top_p,
                          seed=req.seed)


def create_app(model: torch.nn.Module, tok: Tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """The server around a loaded model. Run it with uvicorn, or in tests with
    `with TestClient(app, base_url="http://localhost")` (the batcher starts in the app's lifespan; the
    Host must be an allowed one). `app.state.batcher.model_calls` counts engine calls."""
    config = config or ServerConfig()
    model.eval()
    batcher = Batcher(model, tok, config)
    max_chars = max_prompt_chars(tok, batcher.context)

    async def lifespan(app: FastAPI):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="instructgpt", version="0.1.0", lifespan=lifespan,
                  description="An OpenAI-compatible server for an instructgpt model, with a web chat page.")
    app.add_middleware(Guard, api_key=config.api_key, allowed_hosts=config.allowed_hosts,
                       max_body_bytes=config.max_body_bytes)
    app.state.batcher = batcher
    app.state.config = config
    app.state.requests = 0

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return error_response(APIError(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(exc.detail), status=exc.status_code, type=kind))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(resources.files("instructgpt").joinpath("web/index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> JSONResponse:
        alive, stalled = batcher.alive, batcher.stalled_s()
        healthy = alive and stalled < config.stall_after_s
        age = None if batcher.last_step is None else round(time.monotonic() - batcher.last_step, 3)
        body = {"status": "ok" if healthy else "unhealthy", "model": config.model_name, "context": batcher.context,
                "batcher_alive": alive, "queued_rows": batcher.pending_rows(), "last_step_age_s": age,
                "stalled_s": round(stalled, 3), "requests": app.state.requests, "model_calls": batcher.model_calls,
                "rows": batcher.rows_done}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "instructgpt", "context_length": batcher.context}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        check_request(req, config.max_n, config.max_stop, config.max_stop_chars, config.max_stop_total)
        if len(req.messages) > config.max_messages:
            raise APIError(f"too many messages: {len(req.messages)}; this server takes at most "
                           f"{config.max_messages}", param="messages")
        check_length(sum(len(m.content) for m in req.messages), max_chars, batcher.context, "messages")
        try:
            prompt = await run_in_threadpool(render_prompt, tok, [m.model_dump() for m in req.messages])
        except UserError as e:
            raise APIError(str(e), param="messages") from None
        return await _answer(req, request, [prompt], chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_request(req, config.max_n, config.max_stop, config.max_stop_chars, config.max_stop_total)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError("prompt must not be an empty list", param="prompt")
        if len(texts) * req.n > config.max_batch_size:
            raise APIError(f"{len(texts)} prompts x n={req.n} is more than the {config.max_batch_size} "
                           f"rows this server runs at once", param="prompt")
        for t in texts:
            check_length(len(t), max_chars, batcher.context, "prompt")
        prompts = await run_in_threadpool(lambda: [tok.begin + tok.encode(t) for t in texts])
        return await _answer(req, request, prompts, chat=False)

    async def _answer(req: SamplingRequest, request: Request, prompts: list[list[int]], chat: bool):
        params = [_params(req, len(p), batcher) for p in prompts]
        logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        stop = stop_list(req, config.max_stop, config.max_stop_chars, config.max_stop_total)
        jobs = batcher.submit(prompts, params, req.n, stop, logprobs)
        app.state.requests += 1
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": config.model_name}
        usage_prompt = sum(len(p) for p in prompts)

        def lp(entries: list) -> dict | None:
            if not logprobs:
                return None
            pairs = [(t, x) for t, x, _ in entries]
            return chat_logprobs(tok, pairs) if chat else completion_logprobs(tok, pairs, [o for _, _, o in entries])

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(jobs, req.n, chat, meta, usage_prompt, include_usage, lp),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect() -> dict:
            texts: dict[int, list[str]] = {}
            entries: dict[int, list] = {}
            finals: dict[int, Delta] = {}
            for j, job in enumerate(jobs):
                async for d in job.deltas():
                    k = j * req.n + d.index
                    texts.setdefault(k, []).append(d.text)
                    entries.setdefault(k, []).extend(d.logprobs or [])
                    if d.finish_reason is not None:
                        finals[k] = d
            choices = [choice(chat, k, "".join(texts.get(k, [])), finals[k].finish_reason, lp(entries.get(k, [])))
                       for k in sorted(finals)]
            return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                    "usage": usage(usage_prompt, sum(d.tokens for d in finals.values()))}

        def cancel() -> None:
            for job in jobs:
                job.cancelled = True

        return await unless_gone(request, collect(), on_gone=cancel)

    async def _stream(jobs: list[Job], n: int, chat: bool, meta: dict, usage_prompt: int,
                      include_usage: bool, lp) -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            if chat:
                for k in range(len(jobs) * n):
                    yield sse(chunk(meta, chat, k, None, None, first=True))
            # Jobs of one request run in the same engine call, so reading them in order costs nothing.
            for j, job in enumerate(jobs):
                async for d in job.deltas():
                    k = j * n + d.index
                    if d.text or d.logprobs:
                        yield sse(chunk(meta, chat, k, d.text, None, lp(d.logprobs) if d.logprobs else None))
                    if d.finish_reason is not None:
                        completion_tokens += d.tokens
                        yield sse(chunk(meta, chat, k, None, d.finish_reason))
            if include_usage:
                yield sse({**chunk(meta, chat, 0, None, None), "choices": [],
                           "usage": usage(usage_prompt, completion_tokens)})
            yield "data: [DONE]\n\n"
        except APIError as e:  # the headers are gone; report in the stream, as OpenAI does
            yield sse(error_body(e.message, e.type, e.param, e.code))
        except Exception as e:  # never a broken stream without a word
            log.exception("error while streaming")
            yield sse(error_body(f"internal error: {type(e).__name__}", "server_error"))
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
    max_queued_rows: int = 256,
    name: str | None = None,
    api_key: str | None = None,
    allowed_hosts: tuple[str, ...] = (),
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
        max_queued_rows: most rows waiting or generating; more requests get a 503 with Retry-After.
        name: the model id the API reports (default: the folder's name).
        api_key: require "Authorization: Bearer KEY" on every /v1 request (default: $INSTRUCTGPT_API_KEY;
            none when unset). The chat page asks for it.
        allowed_hosts: Host names the server answers to ("*" for any); default: localhost, 127.0.0.1 and
            [::1] when bound to a loopback address, any otherwise. Refusing other names stops a web page
            from reading a local server's replies by DNS rebinding.
    """
    import uvicorn

    if max_batch_size < 1 or not 1 <= max_n <= max_batch_size:
        raise UserError(f"need 1 <= --max-n <= --max-batch-size, got {max_n} and {max_batch_size}")
    if batch_wait_ms < 0 or not 1 <= max_messages <= MAX_LIST:
        raise UserError(f"--batch-wait-ms must be >= 0 and --max-messages in [1, {MAX_LIST}]")
    if max_queued_rows < max_batch_size:
        raise UserError(f"--max-queued-rows ({max_queued_rows}) must be at least --max-batch-size ({max_batch_size})")
    api_key = api_key or os.environ.get("INSTRUCTGPT_API_KEY") or None
    loopback = is_loopback(host)
    if not allowed_hosts:
        allowed_hosts = (*LOOPBACK_NAMES, host) if loopback else ("*",)
    folder = Path(model)
    config = ServerConfig(model_name=name or folder.resolve().name, max_batch_size=max_batch_size,
                          batch_wait_ms=batch_wait_ms, max_messages=max_messages, max_n=max_n,
                          max_queued_rows=max_queued_rows, api_key=api_key, allowed_hosts=tuple(allowed_hosts))
    app = load_app(folder, device, config)
    if not loopback and api_key is None:
        print(f"warning: {host} is not a loopback address and no --api-key is set: anyone who can reach port "
              f"{port} can use this server", file=sys.stderr, flush=True)
    print(f"serving {config.model_name} on http://{host}:{port}  (chat page at /, API under /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=config.stop_timeout_s)
