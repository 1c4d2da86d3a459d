"""The HTTP edge of `instructgpt serve`: OpenAI's wire format and the guard in front of the app.

- Request bodies as pydantic models. Unknown fields are ignored, as clients send many; fields that
  would change what a reply means and that this server does not implement (tools, response_format,
  logit_bias, echo, best_of, suffix, penalties, top log-probabilities) are refused with a 400 naming the
  field, rather than silently ignored. Lone surrogates (valid JSON, not valid Unicode) are a 400.
- Errors in OpenAI's shape, {"error": {"message", "type", "param", "code"}}: 400 for every body this
  server will not run (wrong types, out of range, limits of this model and server), as OpenAI and vLLM
  answer; 401 for a missing or wrong API key; 413 for a body over the size limit; 415 for a body that is
  not JSON; 503 with Retry-After when the queue is full.
- Log-probabilities in the chat and the legacy completions format.
- A request's sampling parameters, checked against the model's context, and its reply (one JSON body or
  SSE chunks) assembled from the `Delta`s the server's batcher sends for each choice.
- `Guard`, an ASGI middleware: Host allow-list (against DNS rebinding of a server on localhost), the
  API key on /v1, JSON bodies only on /v1, a body size limit, and a last-resort 500 in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from .generate import SamplingParams
from .tokenizer import Tokenizer

log = logging.getLogger("instructgpt.serve")

# Hard caps checked while a body is validated, far above any sensible configuration, so that a huge list
# is refused before its items are; the configured limits (ServerConfig) are checked after validation.
MAX_LIST = 4096
MAX_STOP_LIST = 64
# Temperatures under this decode greedily (vLLM's _SAMPLING_EPS: 1/T would overflow); top_p is floored at it.
GREEDY_BELOW = 1e-5


class APIError(Exception):
    """A request this server refuses; becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


# -- request bodies ---------------------------------------------------------------------------------


def _unicode(s: str) -> str:
    """Refuse lone surrogates: JSON can escape them ("\\ud800"), but they are not text and no tokenizer
    takes them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains a lone surrogate (U+{ord(s[e.start]):04X}) at character {e.start}; "
                         "send valid Unicode") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # any name is accepted: this server holds one model
    max_tokens: int | None = None  # default: what the context leaves after the prompt
    max_completion_tokens: int | None = None  # the newer name of max_tokens
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="extension: keep the k most likely tokens (0: all)")
    n: int = 1
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_LIST)] | None = None
    # Every value torch.Generator.manual_seed takes (negative seeds wrap around, as there).
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused unless neutral (see refuse_unsupported).
    logit_bias: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_LIST)
    logprobs: bool | None = None  # the log-probability of each chosen token
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(max_length=MAX_LIST)]
    logprobs: int | None = None  # legacy: N alternatives per token; this server gives the chosen one (0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def refuse_unsupported(req: SamplingRequest) -> None:
    """A 400 naming the first field that asks for something this server does not do."""

    def no(field: str, what: str) -> APIError:
        return APIError(f"{field} is not supported by this server: {what}", param=field, code="unsupported_parameter")

    if req.logit_bias:
        raise no("logit_bias", "sampling has no per-token bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise no(name, "sampling has no repetition penalties; send 0 or leave it out")
    if isinstance(req, ChatCompletionRequest):
        if req.tools or req.functions:
            raise no("tools" if req.tools else "functions", "the model has no tool calling")
        for name in ("tool_choice", "function_call"):
            if getattr(req, name) not in (None, "none"):
                raise no(name, "the model has no tool calling")
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise no("response_format", "replies are plain text (no JSON mode or schema)")
        if req.top_logprobs:
            raise no("top_logprobs", "only the chosen token's log-probability is computed (logprobs: true)")
    else:
        if req.echo:
            raise no("echo", "the prompt is not returned with the completion")
        if req.suffix:
            raise no("suffix", "there is no insertion mode")
        if req.best_of is not None and req.best_of != req.n:
            raise no("best_of", "every sampled choice is returned; use n")
        if req.logprobs:
            raise no("logprobs", "only the chosen token's log-probability is computed (logprobs: 0)")


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's validation errors as one 400 that names the first bad field."""
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
        loc = [x for x in loc if not x.startswith(("list[", "str", "int", "float", "function-after"))]
        path = ".".join(loc)
        first = first or path or None
        parts.append(f"{path}: {e.get('msg')}" if path else str(e.get("msg")))
    return APIError("; ".join(dict.fromkeys(parts)), param=first, code="invalid_value")


def requested_tokens(req: SamplingRequest) -> int | None:
    return req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens


def stop_list(req: SamplingRequest, max_stop: int, max_chars: int, max_total: int) -> list[str]:
    """The request's stop strings, within the server's limits on their number and length."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > max_stop:
        raise APIError(f"stop takes at most {max_stop} strings, got {len(stop)}", param="stop")
    for i, s in enumerate(stop):
        if len(s) > max_chars:
            raise APIError(f"stop[{i}] has {len(s)} characters; this server takes stop strings of at most "
                           f"{max_chars}", param="stop")
    if sum(map(len, stop)) > max_total:
        raise APIError(f"the stop strings have {sum(map(len, stop))} characters together; this server takes at "
                       f"most {max_total}", param="stop")
    return [s for s in stop if s]


def max_prompt_chars(tok: Tokenizer, context: int) -> int:
    """No text longer than this fits `context` tokens: a token never covers more characters than its own
    string has (a byte-level token's string has one character per byte, and a character is >= 1 byte)."""
    return context * max(len(tok.id_to_token(i) or "") for i in range(tok.vocab_size))


def check_length(chars: int, max_chars: int, context: int, param: str) -> None:
    """Refuse a text that cannot fit the context, before the tokenizer spends time on it."""
    if chars > max_chars:
        raise APIError(f"This model's maximum context length is {context} tokens; the {param} has {chars} "
                       "characters, more than that many tokens can hold. Please shorten it.",
                       param=param, code="context_length_exceeded")


def check_request(req: SamplingRequest, max_n: int, max_stop: int, max_stop_chars: int, max_stop_total: int) -> None:
    """The checks that need no tokenizer, made before any tokenizing."""
    refuse_unsupported(req)
    if not 1 <= req.n <= max_n:
        raise APIError(f"n must be between 1 and {max_n}, got {req.n}", param="n")
    stop_list(req, max_stop, max_stop_chars, max_stop_total)


async def unless_gone(request: Request, work: Awaitable, on_gone: Callable[[], object]):
    """Await `work` unless the client disconnects first (as vLLM's `with_cancellation`): then `on_gone()`
    runs (it cancels the request's jobs) and the reply is a 499 nobody reads. Starlette does not cancel a
    handler whose client has gone; the server's `receive` reports it."""

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    left = False
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:  # also when the handler itself is cancelled (shutdown)
        watch.cancel()
        if not task.done():
            left = True
            on_gone()
            task.cancel()
    if left:
        return Response(status_code=499)  # nginx's "client closed request"
    return task.result()


def sampling_params(req: SamplingRequest, prompt_len: int, context: int, fits: Callable[[int, int], bool],
                    seq2seq: bool) -> SamplingParams:
    """Sampling parameters of a request, with its limits checked against the model's context
    (`fits(prompt_len, max_new)` says whether a prompt and its token budget fit)."""
    if not fits(prompt_len, 1):
        raise APIError(f"This model's maximum context length is {context} tokens; the prompt is {prompt_len} "
                       f"tokens, which leaves no room for a reply. Please shorten the prompt.",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    max_tokens = requested_tokens(req)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if max_tokens is None:
        max_tokens = context - 1 if seq2seq else context - prompt_len
    elif max_tokens < 1:
        raise APIError(f"{param} must be at least 1, got {max_tokens}", param=param)
    elif not fits(prompt_len, max_tokens):
        raise APIError(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
                       f"completion). Please reduce the prompt or the completion length.",
                       param=param, code="context_length_exceeded")
    temperature = 0.0 if req.temperature < GREEDY_BELOW else req.temperature
    # A top_p below float32's resolution would drop every token (the engine compares in float32); any
    # top_p this small keeps the most likely token only, as the floor does.
    top_p = max(req.top_p, GREEDY_BELOW)
    return SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=req.top_k, top_p=top_p,
                          seed=req.seed)


# -- replies ----------------------------------------------------------------------------------------


@dataclass
class Delta:
    """New text of one choice; `finish_reason` set on its last delta."""

    index: int
    text: str
    finish_reason: str | None
    tokens: int  # tokens generated so far for this choice
    logprobs: list[tuple[int, float, int]] | None = None  # (token, log-probability, text offset) since the last


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def choice(chat: bool, k: int, text: str, finish: str | None, logprobs: dict | None) -> dict:
    """Choice k of a whole reply."""
    body = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
    return {"index": k, **body, "finish_reason": finish, "logprobs": logprobs}


def chunk(meta: dict, chat: bool, k: int, text: str | None, finish: str | None, logprobs: dict | None = None,
          first: bool = False) -> dict:
    """One streamed chunk of choice k; a chat stream's first chunk of each choice carries the role."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        one = {"index": k, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
    else:
        one = {"index": k, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
    return {**meta, "object": "chat.completion.chunk" if chat else "text_completion", "choices": [one]}


def _token(tok: Tokenizer, token: int, logprob: float) -> tuple[str, float, list[int] | None]:
    """A token's text (special tokens by name), its log-probability (finite: JSON has no infinity; -9999
    is OpenAI's "as good as impossible") and its bytes (None when the token holds part of a character,
    whose bytes its text cannot carry)."""
    text = tok.decode([token], skip_special_tokens=False)
    lp = -9999.0 if math.isnan(logprob) else max(logprob, -9999.0)
    return text, lp, None if "\ufffd" in text else list(text.encode("utf-8"))


def chat_logprobs(tok: Tokenizer, tokens: Sequence[tuple[int, float]]) -> dict:
    content = []
    for token, logprob in tokens:
        text, lp, raw = _token(tok, token, logprob)
        content.append({"token": text, "logprob": lp, "bytes": raw, "top_logprobs": []})
    return {"content": content, "refusal": None}


def completion_logprobs(tok: Tokenizer, tokens: Sequence[tuple[int, float]], offsets: Sequence[int]) -> dict:
    """The legacy format; `text_offset` is where each token's text starts in the reply (a token that
    finishes a character split over several tokens starts where that character does)."""
    texts, lps = [], []
    for token, logprob in tokens:
        text, lp, _ = _token(tok, token, logprob)
        texts.append(text)
        lps.append(lp)
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": None, "text_offset": list(offsets)}


# -- the guard --------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host: str) -> str:
    """The Host header without its port; IPv6 literals keep their brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def host_allowed(host: str, allowed: Sequence[str]) -> bool:
    name = _host_name(host)
    for pattern in allowed:
        pattern = pattern.lower()
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def _send_error(send, e: APIError, close: bool = False) -> None:
    body = json.dumps(error_body(e.message, e.type, e.param, e.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in (e.headers or {}).items()]
    if close:  # the rest of the body was not read: the connection cannot carry another request
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": e.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware in front of the app; see the module's docstring. The body is read here, up to
    `max_body_bytes`, and handed to the app in one piece; after it, the app's `receive` is the server's,
    so a handler can still wait for the client to disconnect."""

    def __init__(self, app, api_key: str | None, allowed_hosts: Sequence[str], max_body_bytes: int):
        self.app = app
        self.key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.allowed_hosts = list(allowed_hosts)
        self.max_body_bytes = max_body_bytes

    def _refusal(self, scope, headers: dict[str, str]) -> APIError | None:
        if not host_allowed(headers.get("host", ""), self.allowed_hosts):
            return APIError(f"Host {headers.get('host', '')!r} is not one this server answers to (--allowed-hosts)",
                            param="host", code="invalid_host")
        if not (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            return None
        if self.key_digest is not None:
            scheme, _, given = headers.get("authorization", "").partition(" ")
            # Compare digests: constant time whatever the lengths.
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                hashlib.sha256(given.strip().encode("utf-8", "replace")).digest(), self.key_digest)
            if not ok:
                return APIError("Incorrect or missing API key: send the header Authorization: Bearer <key>",
                                status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if scope["method"] in ("POST", "PUT", "PATCH") and not _is_json(headers.get("content-type")):
            return APIError("the request body must be JSON, sent with Content-Type: application/json",
                            param="content-type", status=415, code="unsupported_media_type")
        return None

    async def _refuse(self, receive, send, e: APIError, declared: int | None, seen: int = 0, more: bool = True):
        """Answer without running the request. The body is read and dropped first (up to 4 times the limit):
        a server that closes a socket still holding unread data resets the connection, and a client still
        sending its body would lose the answer."""
        budget = 4 * self.max_body_bytes
        drained = declared is None or declared <= budget
        while drained and more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            seen += len(message.get("body", b""))
            more = message.get("more_body", False)
            drained = seen <= budget
        await _send_error(send, e, close=not drained)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        length = headers.get("content-length", "")
        declared = int(length) if length.isdigit() else None
        too_big = APIError(f"the request body is larger than this server's limit of {self.max_body_bytes} bytes",
                           status=413, code="request_too_large")
        refusal = self._refusal(scope, headers)
        if refusal is None and declared is not None and declared > self.max_body_bytes:
            refusal = too_big
        if refusal is not None:
            return await self._refuse(receive, send, refusal, declared)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_body_bytes:
                return await self._refuse(receive, send, too_big, None, size, more)
            chunks.append(chunk)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        started = False

        async def watch(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, replay, watch)
        except Exception as e:  # what no handler answered: a 500 in OpenAI's shape, the connection kept
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if started:
                raise  # a response is under way: the server can only close the connection
            await _send_error(send, APIError(f"internal error: {type(e).__name__}", status=500, type="server_error"))


def reply_logprobs(tok: Tokenizer, chat: bool, entries: Sequence[tuple[int, float, int]]) -> dict:
    """(token, log-probability, text offset) entries in the chat or the legacy completions format."""
    pairs = [(t, x) for t, x, _ in entries]
    return chat_logprobs(tok, pairs) if chat else completion_logprobs(tok, pairs, [o for _, _, o in entries])


async def reply_json(choices: list[AsyncIterator[Delta]], n: int, chat: bool, meta: dict, usage_prompt: int,
                     lp: Callable[[list], dict | None]) -> dict:
    """One JSON reply from the Deltas of each prompt's n choices (`lp` formats log-probabilities)."""
    texts: dict[int, list[str]] = {}
    entries: dict[int, list] = {}
    finals: dict[int, Delta] = {}
    for j, deltas in enumerate(choices):
        async for d in deltas:
            k = j * n + d.index
            texts.setdefault(k, []).append(d.text)
            entries.setdefault(k, []).extend(d.logprobs or [])
            if d.finish_reason is not None:
                finals[k] = d
    out = [choice(chat, k, "".join(texts.get(k, [])), finals[k].finish_reason, lp(entries.get(k, [])))
           for k in sorted(finals)]
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": out,
            "usage": usage(usage_prompt, sum(d.tokens for d in finals.values()))}


async def reply_sse(choices: list[AsyncIterator[Delta]], n: int, chat: bool, meta: dict, usage_prompt: int,
                    include_usage: bool, lp: Callable[[list], dict | None]) -> AsyncIterator[str]:
    """SSE events of a streamed reply, ending with [DONE]; an error after the headers is reported in the
    stream, as OpenAI does."""
    completion_tokens = 0
    try:
        if chat:
            for k in range(len(choices) * n):
                yield sse(chunk(meta, chat, k, None, None, first=True))
        # Each prompt's choices in turn: a later prompt's deltas wait in its queue meanwhile.
        for j, deltas in enumerate(choices):
            async for d in deltas:
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
    except APIError as e:
        yield sse(error_body(e.message, e.type, e.param, e.code))
    except Exception as e:  # never a broken stream without a word
        log.exception("error while streaming")
        yield sse(error_body(f"internal error: {type(e).__name__}", "server_error"))
