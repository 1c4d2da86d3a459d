"""`instructgpt serve`: an OpenAI-compatible HTTP server and a web chat page.

    GET  /                      the chat page (web/index.html)
    GET  /health                200 while the model loop is alive and making progress, else 503; counters
    GET  /v1/models             the one model this server holds
    POST /v1/chat/completions   chat, rendered with the one chat template; SSE streaming or one JSON reply
    POST /v1/completions        plain text: bos + encode(prompt), no template
    GET  /docs, /openapi.json   FastAPI's schema

Batching. Handlers do not touch the model: they validate a request, turn it into prompt ids (on a
worker thread, after a length check that needs no tokenizer) and submit one `Job` per prompt (its `n`
choices) to a single model thread. With the continuous engine (the default) that thread steps one
`engine.Engine` while any row runs: a job is prefilled between two decode steps as soon as slots free
up, streams from its first token, and its n choices share the prompt's prefill. Every row has its own
sampling parameters, token limit and stop strings; a seeded job draws from its own generator, so the
seed alone decides its samples. With `engine="static"` (kept for comparison) the batcher gathers what
arrives within `batch_wait_ms`, groups it by sampling parameters (greedy together; sampled by
temperature, top_p and top_k; seeded alone) and runs one `generate.stream` call per group until its
last row ends; later jobs wait for it.

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
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import torch
import tyro
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import engine as engine_lib
from .chat import TextStream, render_prompt
from .errors import UserError
from .generate import SamplingParams, stream
from .model import Seq2Seq
from .openai_api import (
    LOOPBACK_NAMES,
    MAX_LIST,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    Delta,
    Guard,
    SamplingRequest,
    check_length,
    check_request,
    error_response,
    is_loopback,
    log,
    max_prompt_chars,
    reply_json,
    reply_logprobs,
    reply_sse,
    sampling_params,
    stop_list,
    unless_gone,
    validation_error,
)
from .tokenizer import Tokenizer


@dataclass
class ServerConfig:
    model_name: str = "instructgpt"  # the id /v1/models reports (serve uses the folder's name)
    max_batch_size: int = 32  # most rows (requests x n) decoding at once
    engine: Literal["continuous", "static"] = "continuous"  # see the module's docstring; static: for comparison
    compile: bool = False  # continuous engine: torch.compile the decode step (the first request waits for it)
    batch_wait_ms: float = 5.0  # static engine: how long the batcher waits for more requests after the first
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
    chat: bool = False  # a chat reply (rendered prompt): its text drops the format's leading space
    open_rows: int = 0  # choices not yet finished (model thread)
    request: engine_lib.Request | None = None  # the continuous engine's handle of this job

    def emit(self, event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    async def deltas(self) -> AsyncIterator[Delta]:
        while (event := await self.events.get()) is not None:
            if isinstance(event, Exception):
                raise event
            yield event


class Row:
    """One choice of a job on the model thread: its tokens become text deltas (stop strings held back),
    with their log-probabilities when asked, until the end token, a stop string or the token limit."""

    def __init__(self, job: Job, index: int, tok: Tokenizer):
        self.job, self.index, self.tok = job, index, tok
        self.text = TextStream(tok, job.stop, reply=job.chat)
        self.logprobs: list | None = [] if job.logprobs else None  # since the last delta
        self.done = False

    def push(self, token: int, logprob: float) -> bool:
        """Feed one token; True once the choice has finished."""
        if self.logprobs is not None and token not in self.tok.stop_ids:
            self.logprobs.append((token, logprob, self.text.length))
        delta, reason = self.text.push(token)
        if reason is None and self.text.n_tokens >= self.job.params.max_new_tokens:
            delta, reason = delta + self.text.finish_length(), "length"
        if reason is not None or delta:
            self.emit(delta, reason)
        return self.done

    def emit(self, delta: str, reason: str | None) -> None:
        self.job.emit(Delta(self.index, delta, reason, self.text.n_tokens, self.logprobs))
        if self.logprobs is not None:
            self.logprobs = []
        if reason is not None:
            self.done = True
            self.job.open_rows -= 1
            if self.job.open_rows == 0:
                self.job.emit(None)


class Batcher:
    """Hands jobs from many requests to the model thread: a continuous engine, or one static batch per
    engine call (see the module's docstring)."""

    def __init__(self, model: torch.nn.Module, tok: Tokenizer, config: ServerConfig):
        self.model, self.tok, self.config = model, tok, config
        self.context = model.config.block_size
        self.seq2seq = isinstance(model, Seq2Seq)
        self.model_calls = 0  # engine calls made: static batches, or continuous runs (from idle to idle)
        self.jobs_done = 0  # jobs that went through the engine
        self.rows_done = 0
        self.queue: asyncio.Queue[Job] | None = None
        self.live: set[Job] = set()  # submitted and not yet through the engine
        self.last_step: float | None = None  # time.monotonic() of the engine's last step
        self.busy_since = time.monotonic()  # when rows last started waiting on an idle server
        self.engine: engine_lib.Engine | None = None
        self.inbox: deque[Job] = deque()  # jobs for the continuous engine, taken by the model thread
        self.rows: dict[Job, list[Row]] = {}  # jobs in the continuous engine (model thread only)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="instructgpt-model")
        self._task: asyncio.Task | None = None
        self._running: Future | None = None  # the engine call in progress

    def fits(self, prompt_len: int, max_new: int) -> bool:
        """Whether a prompt and its token budget fit in one engine call (the KV cache's size)."""
        if self.seq2seq:
            return prompt_len <= self.context and max_new + 1 <= self.context
        return prompt_len + max_new <= self.context

    @property
    def steps(self) -> int:
        """Decode steps the continuous engine took (0 for the static one)."""
        return self.engine.steps if self.engine is not None else 0

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
        if self.config.engine == "continuous":
            # A compiled step has fixed shapes: its cache starts at full length rather than grow (and recompile).
            self.engine = engine_lib.Engine(self.model, self.tok.stop_ids, self.tok.pad_id, self.config.max_batch_size,
                                            cache_len=self.context if self.config.compile else 256,
                                            start_id=self.tok.bos_id, compile=self.config.compile)
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
               logprobs: bool = False, chat: bool = False) -> list[Job]:
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
        jobs = [Job(p, sp, n, stop, loop, logprobs=logprobs, chat=chat) for p, sp in zip(prompts, params)]
        for job in jobs:
            self.live.add(job)
            if self.engine is not None:
                self.inbox.append(job)  # before the wake-up below, so that no run can miss it
            self.queue.put_nowait(job)
        return jobs

    async def _loop(self) -> None:
        try:
            if self.engine is not None:
                await self._wake_and_run()
            else:
                await self._gather_and_run()
        except Exception as e:  # a bug here must not leave clients waiting: answer them; /health turns 503
            log.exception("the model loop stopped")
            for job in self.live:
                if not job.cancelled:
                    job.emit(APIError(f"the model loop stopped: {type(e).__name__}: {e}", status=500,
                                      type="server_error"))
            raise

    # -- the continuous engine ----------------------------------------------------------------------

    async def _wake_and_run(self) -> None:
        """Start a run of the model thread when a job arrives at an idle engine. Jobs that arrive during
        a run are taken by that run (the inbox); their wake-ups then start a run that finds nothing."""
        while True:
            await self.queue.get()
            while not self.queue.empty():
                self.queue.get_nowait()
            self._running = self._executor.submit(self.run_engine)
            await asyncio.wrap_future(self._running)

    def run_engine(self) -> None:
        """Step the engine until no row runs and no job waits (on the model thread)."""
        self.model_calls += 1
        self.last_step = time.monotonic()
        while True:
            while self.inbox:
                self.admit(self.inbox.popleft())
            for job in [job for job in self.rows if job.cancelled]:
                self.engine.cancel(job.request)
                self.finish(job)
            if not self.engine.busy:
                if not self.inbox:
                    return
                continue
            try:
                tokens = self.engine.step()
            except Exception as e:  # a failed step answers its requests with a 500; the server goes on
                for job in list(self.rows):
                    if not job.cancelled:
                        job.emit(APIError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                          type="server_error"))
                    self.finish(job)
                self.engine.clear()
                continue
            self.last_step = time.monotonic()
            for t in tokens:
                job = t.request.tag
                if job.cancelled or job not in self.rows:
                    continue
                if self.rows[job][t.index].push(t.token, t.logprob) and not t.done:
                    self.engine.cancel(t.request, t.index)  # a stop string: free the slot now
                if job.open_rows == 0:
                    self.finish(job)

    def admit(self, job: Job) -> None:
        """Hand a job to the engine (model thread)."""
        if job.cancelled:
            self.finish(job)
            return
        job.request = engine_lib.Request(job.prompt, job.params, job.n, tag=job)
        job.open_rows = job.n
        try:
            self.engine.submit(job.request)
        except ValueError as e:  # what the handlers' checks let through (a config with max_n > max_batch_size)
            job.emit(APIError(str(e)))
            self.finish(job)
            return
        self.rows[job] = [Row(job, i, self.tok) for i in range(job.n)]

    def finish(self, job: Job) -> None:
        """A job is through the engine (model thread)."""
        self.rows.pop(job, None)
        self.jobs_done += 1
        self.rows_done += job.n
        job.loop.call_soon_threadsafe(self.live.discard, job)

    # -- the static engine --------------------------------------------------------------------------

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
        for job in (job for job in jobs if not job.cancelled):
            p = job.params
            key = (("greedy",) if p.temperature == 0 else ("seeded", id(job)) if p.seed is not None
                   else ("sampled", p.temperature, p.top_p, p.top_k))
            groups.setdefault(key, []).append(job)
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
        rows = [Row(job, i, self.tok) for job in batch for i in range(job.n)]
        for job in batch:
            job.open_rows = job.n
        params = replace(batch[0].params, max_new_tokens=max(job.params.max_new_tokens for job in batch))
        want_lps = any(job.logprobs for job in batch)
        self.model_calls += 1
        self.last_step = time.monotonic()
        try:
            for tokens, logprobs, _ in stream(self.model, [row.job.prompt for row in rows], params, self.tok.stop_ids,
                                              self.tok.pad_id, start_id=self.tok.bos_id,
                                              all_finished=lambda _: all(r.done or r.job.cancelled for r in rows)):
                self.last_step = time.monotonic()
                step_lps = logprobs.tolist() if want_lps else [0.0] * len(rows)
                for row, token, lp in zip(rows, tokens.tolist(), step_lps):
                    if not row.done and not row.job.cancelled:
                        row.push(token, lp)
            for row in rows:  # only if the engine stopped early: never leave a client waiting
                if not row.done and not row.job.cancelled:
                    row.emit(row.text.finish_length(), "length")
        except Exception as e:  # a failed call answers its requests with a 500; the server goes on
            for job in batch:
                if job.open_rows > 0 and not job.cancelled:
                    job.emit(APIError(f"generation failed: {type(e).__name__}: {e}", status=500,
                                      type="server_error"))
        finally:
            self.jobs_done += len(batch)
            self.rows_done += sum(job.n for job in batch)


# -- the app ----------------------------------------------------------------------------------------


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
                "steps": batcher.steps, "rows": batcher.rows_done, "engine": config.engine}
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
        params = [sampling_params(req, len(p), batcher.context, batcher.fits, batcher.seq2seq) for p in prompts]
        logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        stop = stop_list(req, config.max_stop, config.max_stop_chars, config.max_stop_total)
        jobs = batcher.submit(prompts, params, req.n, stop, logprobs, chat)
        app.state.requests += 1
        meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
                "model": config.model_name}
        usage_prompt = sum(len(p) for p in prompts)

        lp = partial(reply_logprobs, tok, chat) if logprobs else (lambda _: None)
        choices = [job.deltas() for job in jobs]

        def cancel() -> None:
            for job in jobs:
                job.cancelled = True

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            async def events() -> AsyncIterator[str]:
                try:
                    async for event in reply_sse(choices, req.n, chat, meta, usage_prompt, include_usage, lp):
                        yield event
                finally:  # a client that disconnects frees its rows at the next step
                    cancel()

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await unless_gone(request, reply_json(choices, req.n, chat, meta, usage_prompt, lp), on_gone=cancel)

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
    engine: Literal["continuous", "static"] = "continuous",
    compile: bool = False,
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
        max_batch_size: most rows (requests x n) decoding at once.
        engine: continuous (a request joins the running batch at the next step) or static (one batch at a
            time, each running until its longest row ends; for comparison).
        compile: run the continuous engine's decode step through torch.compile (the first request waits
            for the compilation; engine.DecodeBatch says what it measured).
        batch_wait_ms: static engine: how long to wait for more requests to batch with the first one.
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
    config = ServerConfig(model_name=name or folder.resolve().name, max_batch_size=max_batch_size, engine=engine,
                          compile=compile, batch_wait_ms=batch_wait_ms, max_messages=max_messages, max_n=max_n,
                          max_queued_rows=max_queued_rows, api_key=api_key, allowed_hosts=tuple(allowed_hosts))
    app = load_app(folder, device, config)
    if not loopback and api_key is None:
        print(f"warning: {host} is not a loopback address and no --api-key is set: anyone who can reach port "
              f"{port} can use this server", file=sys.stderr, flush=True)
    print(f"serving {config.model_name} on http://{host}:{port}  (chat page at /, API under /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=config.stop_timeout_s)
