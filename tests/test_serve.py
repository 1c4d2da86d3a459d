"""The OpenAI-compatible server: the official client against a live server, batching, limits."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import torch.nn.functional as F
import uvicorn

from instructgpt.chat import TextStream, render, render_prompt, reply_text
from instructgpt.checkpoint import load_model, save_model
from instructgpt.generate import SamplingParams, generate
from instructgpt.model import GPT, ModelConfig
from instructgpt.serve import Batcher, Job, ServerConfig, load_app
from instructgpt.tokenizer import Tokenizer

PAIRS = [("hello", "hi there! how can I help you today?"), ("what does the cat do?", "the cat sat on the mat."),
         ("count to five", "one two three four five"), ("say goodbye", "goodbye, and thank you!")]


def train_tiny_chat_model(folder) -> None:
    """A 2-layer model that has memorised four short exchanges, so it answers and ends with <|eos|>."""
    tok = Tokenizer.train_bpe([a + " " + b for a, b in PAIRS] * 10, vocab_size=300)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains faster on one thread
    try:
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128))
        rows = [render(tok, [{"role": "user", "content": a}, {"role": "assistant", "content": b}]) for a, b in PAIRS]
        T = max(len(ids) for ids, _ in rows)
        x = torch.full((len(rows), T), tok.pad_id)
        y = torch.full((len(rows), T), -100)
        for r, (ids, mask) in enumerate(rows):
            x[r, : len(ids)] = torch.tensor(ids)
            y[r, : len(ids) - 1] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for _ in range(100):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    save_model(model, folder)
    tok.save(folder)


class LiveServer:
    """uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, app):
        self.app = app
        sock = socket.socket()
        # asyncio sets TCP_NODELAY only on the sockets it creates; without it each reply waits ~40 ms for a
        # delayed ACK (headers and body are written separately). Accepted sockets inherit it.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_chat")
    train_tiny_chat_model(folder)
    return folder


@pytest.fixture(scope="module", params=["continuous", "static"])
def server(model_dir, request):
    """Every test of the live server runs against both engines: the replies must not depend on it."""
    config = ServerConfig(model_name="tiny", batch_wait_ms=30, max_messages=6, max_n=4, engine=request.param)
    app = load_app(model_dir, "cpu", config)
    live = LiveServer(app)
    yield live
    live.close()


@pytest.fixture(scope="module")
def ref(model_dir):
    """The engine called directly: what a request should return when it runs alone."""
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    model = load_model(model_dir).eval()

    def alone(ids, max_new=40, chat=True):
        """(text, tokens, ended) of the greedy continuation of `ids`: a chat reply's text (`reply_text`) unless
        `chat` is False (a completion's text, every character of it)."""
        gen = generate(model, [ids], SamplingParams(max_new_tokens=max_new, temperature=0), tok.eos_id, tok.pad_id)
        n = int(gen.lengths[0])
        out = gen.tokens[0, :n].tolist()
        return reply_text(tok, out) if chat else tok.decode(out), n, bool(gen.ended[0])

    return tok, alone


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_openai_client_chat_non_streaming(client, ref):
    tok, alone = ref
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40)
    text, n, ended = alone(render_prompt(tok, messages))
    assert ended and text == "hi there! how can I help you today?"
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(render_prompt(tok, messages))
    assert r.usage.completion_tokens == n  # the end token included
    assert r.usage.total_tokens == r.usage.prompt_tokens + n
    assert r.object == "chat.completion" and r.model == "tiny"


def test_openai_client_chat_streaming(client, ref):
    tok, alone = ref
    messages = [{"role": "user", "content": "count to five"}]
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    text, n, _ = alone(render_prompt(tok, messages))
    assert "".join(content) == text and len(content) > 3  # token by token, not in one piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.prompt_tokens == len(render_prompt(tok, messages))
    assert chunks[-1].usage.completion_tokens == n


def test_openai_client_completion(client, ref):
    tok, alone = ref
    r = client.completions.create(model="tiny", prompt="the cat", temperature=0, max_tokens=6)
    ids = [tok.bos_id] + tok.encode("the cat")
    text, n, ended = alone(ids, max_new=6, chat=False)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == ("stop" if ended else "length")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    streamed = client.completions.create(model="tiny", prompt="the cat", temperature=0, max_tokens=6, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text


def test_stop_strings_and_length(client):
    messages = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, stop=["how", "!"])
    assert r.choices[0].message.content == "hi there" and r.choices[0].finish_reason == "stop"
    s = client.chat.completions.create(model="tiny", messages=messages, temperature=0, stop="how", stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == "hi there! "
    r = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_n_and_seed(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "say goodbye"}], temperature=1.5, max_tokens=12)
    a = client.chat.completions.create(n=3, seed=7, **kw)
    b = client.chat.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert 3 <= a.usage.completion_tokens <= 3 * 12
    greedy = client.chat.completions.create(n=2, **{**kw, "temperature": 0})
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_concurrent_requests_share_model_calls_and_match_alone(server, ref):
    tok, alone = ref
    questions = ["hello", "count to five", "what does the cat do?", "say goodbye", "hello there", "cat?",
                 "count to five", "something the model never saw"]
    batcher = server.app.state.batcher
    calls_before, steps_before = batcher.model_calls, batcher.steps
    start = threading.Barrier(len(questions))

    def ask(q):
        start.wait()
        body = {"messages": [{"role": "user", "content": q}], "temperature": 0, "max_tokens": 5 + len(q) % 30}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(len(questions)) as pool:
        replies = list(pool.map(ask, questions))
    if batcher.config.engine == "static":
        assert batcher.model_calls - calls_before < len(questions)  # requests shared engine calls
    else:  # requests shared decode steps
        assert batcher.steps - steps_before < sum(r["usage"]["completion_tokens"] for r in replies) - len(questions)
    for q, r in zip(questions, replies):
        text, n, ended = alone(render_prompt(tok, [{"role": "user", "content": q}]), max_new=5 + len(q) % 30)
        assert r["choices"][0]["message"]["content"] == text
        assert r["usage"]["completion_tokens"] == n
        assert r["choices"][0]["finish_reason"] == ("stop" if ended else "length")


def _msgs(k):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(k)]


BAD = [
    ({"messages": []}, 400, "at least 1 item", "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "'system', 'user' or 'assistant'", "messages.0.role"),
    ({"messages": [{"role": "user"}]}, 400, "Field required", "messages.0.content"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "at least 1", "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, 400, "maximum context length is 128",
     "max_tokens"),
    ({"messages": [{"role": "user", "content": "hello " * 200}]}, 400, "maximum context length is 128", "messages"),
    ({"messages": _msgs(7) + [{"role": "user", "content": "x"}]}, 400, "too many messages", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, 400, "n must be between 1 and 4", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 5}, 400, "n must be between 1 and 4", "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "greater than or equal", "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "greater than 0", "top_p"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must end with a user message", "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", "stop"),
    ({"prompt": "hi"}, 400, "Field required", "messages"),
]


@pytest.mark.parametrize("body,status,message,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_openai_errors(server, body, status, message, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert message in err["message"] and err["param"] == param
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"


def test_malformed_bodies_and_the_server_goes_on(server):
    url = server.url + "/v1/chat/completions"
    r = httpx.post(url, content=b'{"messages": [', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(url, content=b"[1, 2]", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi " * 300})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    # A client that walks away mid-stream frees its rows; the server keeps answering.
    body = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "temperature": 0}
    with httpx.stream("POST", url, json=body) as s:
        next(s.iter_lines())
    r = httpx.post(url, json={**body, "stream": False}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("hi there")


def test_models_health_and_schema(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["context_length"] == 128
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model_calls"] >= 1
    schema = httpx.get(server.url + "/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(schema["paths"])
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "New chat" in page.text


def test_sse_wire_format(server):
    body = {"messages": [{"role": "user", "content": "hello"}], "stream": True, "temperature": 0, "n": 2}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    texts = {0: "", 1: ""}
    for c in chunks:
        texts[c["choices"][0]["index"]] += c["choices"][0]["delta"].get("content", "")
    assert texts[0] == texts[1] == "hi there! how can I help you today?"


class _Tok:
    eos_id, stop_ids = 2, (2,)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_holds_back_a_possible_stop_string():
    out = TextStream(_Tok(), stop=["END"])
    got = [out.push(ord(c)) for c in "abEN"]
    assert "".join(d for d, _ in got) == "ab" and all(r is None for _, r in got)  # "EN" may start "END"
    assert out.push(ord("x")) == ("ENx", None)
    assert out.push(ord("E")) == ("", None)
    assert out.push(ord("N")) == ("", None)
    assert out.push(ord("D")) == ("", "stop") and out.text == "abENx" and out.n_tokens == 8
    end = TextStream(_Tok())
    assert end.push(ord("a")) == ("a", None) and end.push(2) == ("", "stop") and end.text == "a"


def test_plan_groups_by_sampling_and_respects_context():
    class M(torch.nn.Module):
        config = ModelConfig(vocab_size=10, block_size=32, n_layer=1, n_head=1, n_embd=8)

    b = Batcher(M(), None, ServerConfig(max_batch_size=4))

    def job(T, N, n=1, **kw):
        return Job([1] * T, SamplingParams(max_new_tokens=N, **kw), n, [], None)

    g1, g2, s1, s2, seeded, hot = (job(10, 10, temperature=0), job(5, 20, temperature=0, top_p=0.5),
                                   job(3, 3), job(4, 4), job(3, 3, seed=1), job(3, 3, n=2, temperature=0))
    long_prompt = job(20, 5, temperature=0)  # 20 + 20 > 32 with g2's budget: a call of its own
    batches = b.plan([g1, s1, g2, seeded, s2, long_prompt, hot])
    assert [g1, g2] in batches and [s1, s2] in batches and [seeded] in batches
    assert [long_prompt, hot] in batches
    assert sum(len(x) for x in batches) == 7


def test_completions_with_a_list_of_prompts(server, ref):
    tok, alone = ref
    body = {"prompt": ["the cat", "hello"], "n": 2, "temperature": 0, "max_tokens": 5}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    for k, prompt in enumerate(body["prompt"]):
        text, _, _ = alone([tok.bos_id] + tok.encode(prompt), max_new=5, chat=False)
        assert r["choices"][2 * k]["text"] == r["choices"][2 * k + 1]["text"] == text
    assert r["usage"]["prompt_tokens"] == sum(1 + len(tok.encode(p)) for p in body["prompt"])


@pytest.mark.parametrize("engine", ["continuous", "static"])
def test_a_failing_engine_call_is_a_500_and_the_server_goes_on(model_dir, engine):
    from fastapi.testclient import TestClient

    app = load_app(model_dir, "cpu", ServerConfig(engine=engine))
    model = app.state.batcher.model

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    body = {"messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 5}
    with TestClient(app, base_url="http://localhost") as c:
        model.forward = broken  # the instance attribute hides GPT.forward
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            lines = [line for line in s.iter_lines() if line]
        assert "out of memory (simulated)" in lines[-1] and '"error"' in lines[-1]
        del model.forward
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].startswith("hi there")
