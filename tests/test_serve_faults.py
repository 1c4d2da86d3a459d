"""The server against hostile and careless clients: stop strings, body fuzzing, auth and Host checks,
disconnects, a full queue, a stuck engine and shutdown. `fuzz_request` is also the fuzzer of
benchmarks/soak.py, which sends thousands of its bodies to a real server."""

import asyncio
import json
import random
import threading
import time

import httpx
import pytest
import torch
from test_serve import LiveServer

import instructgpt.serve as serve
from instructgpt.chat import TextStream, render_prompt
from instructgpt.generate import SamplingParams, generate
from instructgpt.model import GPT, ModelConfig
from instructgpt.openai_api import APIError, host_allowed
from instructgpt.serve import Batcher, ServerConfig, create_app, serve_command
from instructgpt.tokenizer import SPECIAL_TOKENS, Tokenizer

SAMPLES = ["hello", "héllo wörld", "日本語のテキスト", "emoji 😀🎉 ok", "<|eos|><|assistant|>", "tab\tnew\nline",
           "\x00\x1b[2J\x9b", "the cat sat on the mat"]


def tiny_model(block_size: int = 64, seed: int = 0) -> tuple[GPT, Tokenizer]:
    """Random weights and a byte-level BPE that has merged some multi-byte characters."""
    tok = Tokenizer.train_bpe(SAMPLES * 20, vocab_size=330)
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=block_size))
    return model.eval(), tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Timings here are of the server, not of OpenMP: on a loaded 2-core machine two threads spinning at
    every barrier of a tiny model's ops made one engine step 100 times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.fixture
def live(tiny):
    servers = []

    def start(**config):
        model, tok = tiny
        app = create_app(model, tok, ServerConfig(model_name="tiny", **config))
        servers.append(LiveServer(app))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def chat(content="hello", **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], **kw}


def slowed(model, seconds: float, gate: threading.Event | None = None) -> list[int]:
    """Make every forward pass of `model` take `seconds` (and wait for `gate`); returns a list whose
    length counts the passes."""
    calls, forward = [], model.forward

    def slow(*args, **kwargs):
        calls.append(1)
        if gate is not None:
            gate.wait(30)
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slow
    return calls


def unslow(model) -> None:
    del model.forward  # the instance attribute hid the class's forward


# -- F1 and F12: TextStream ---------------------------------------------------------------------------


def slow_text(tok: Tokenizer, ids: list[int], stop: list[str]) -> tuple[str, str, int]:
    """The obviously right twin of TextStream: decode every id so far at every token; the text is final
    up to its trailing U+FFFD (an unfinished character) and ends where a stop string first starts."""
    for n, token in enumerate(ids, 1):
        if token == tok.eos_id:
            return tok.decode(ids[: n - 1]), "stop", n
        final = tok.decode(ids[:n]).rstrip("\ufffd")
        hits = [final.find(s) for s in stop if s in final]
        if hits:
            return final[: min(hits)], "stop", n
    return tok.decode(ids), "length", len(ids)


def fast_text(tok: Tokenizer, ids: list[int], stop: list[str]) -> tuple[str, str, int, TextStream]:
    out, sent = TextStream(tok, stop), []
    for token in ids:
        delta, reason = out.push(token)
        sent.append(delta)
        if reason:
            break
    else:
        sent.append(out.finish_length())
        reason = "length"
    return "".join(sent), reason, out.n_tokens, out


def random_ids(rng: random.Random, tok: Tokenizer) -> list[int]:
    """Ids as a model might produce them: pieces of real text (characters split over byte tokens),
    random tokens (lone continuation bytes, special tokens), sometimes the end token."""
    ids: list[int] = []
    while len(ids) < rng.randrange(1, 80):
        kind = rng.random()
        if kind < 0.5:
            ids += tok.encode(rng.choice(SAMPLES))
        elif kind < 0.9:
            ids += [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 6))]
        else:
            ids.append(tok.eos_id)
    return ids


def test_text_stream_matches_a_full_redecode_on_random_ids(tiny):
    _, tok = tiny
    rng = random.Random(0)
    stops_hit = 0
    for _ in range(400):
        ids = random_ids(rng, tok)
        full = tok.decode(ids).replace("\ufffd", "")
        stop = []
        for _ in range(rng.randrange(4)):  # pieces of the text itself, so that they are found
            if full:
                i = rng.randrange(len(full))
                stop.append(full[i : i + rng.randrange(1, 6)])
        stop += rng.sample(["é", "ö", "😀", "at", "zzz"], rng.randrange(2))
        text, reason, n, out = fast_text(tok, ids, stop)
        assert (text, reason, n) == slow_text(tok, ids, stop), (ids, stop)
        assert out.text == text
        stops_hit += reason == "stop" and tok.eos_id not in ids[:n]
    assert stops_hit > 50  # the stop strings were exercised, not just the end of the ids


def test_text_stream_windows_stay_short_on_invalid_bytes(tiny):
    _, tok = tiny
    lone = tok.encode("é")[-1:]  # a continuation byte on its own: invalid UTF-8, one U+FFFD each
    ids = lone * 300 + tok.encode("ok 😀 done") + lone * 3 + tok.encode("é")
    decoded = []

    class Spy:  # the tokenizer, recording how many ids each decode gets
        eos_id, stop_ids = tok.eos_id, tok.stop_ids

        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)

    text, reason, n, _ = fast_text(Spy(), ids, [])
    assert (text, reason, n) == slow_text(tok, ids, [])
    assert text.endswith("ok 😀 done\ufffd\ufffd\ufffdé")
    assert max(decoded) <= TextStream.max_window + 2


def test_text_stream_keeps_sentencepiece_spaces():
    """Metaspace decoders drop the first token's leading space: the window's context token makes the
    difference exact (decoding each token alone would lose every space)."""
    from tokenizers import AddedToken, SentencePieceBPETokenizer

    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator(["hello world foo bar, héllo wörld"] * 20, vocab_size=200, show_progress=False)
    raw = sp._tokenizer
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok = Tokenizer(raw)
    for sentence in ["hello world foo bar", "bar, héllo wörld hello"]:
        ids = tok.encode(sentence)
        assert "".join(tok.decode([i]) for i in ids) != sentence  # the trap is real
        assert fast_text(tok, ids, [])[0] == sentence == slow_text(tok, ids, [])[0]
        assert fast_text(tok, ids, ["o f"])[:2] == slow_text(tok, ids, ["o f"])[:2]


class CharTok:
    eos_id, stop_ids = 2, (2,)

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def test_text_stream_cost_does_not_grow_with_stop_length_or_reply():
    """The audit's probe: one 50,000-character stop string cost 88 ms per token (quadratic) and the
    reply was re-decoded in full at every token. Here 2,000 tokens against four such stop strings,
    one of which is almost matched all along, take well under a second."""
    stop = ["a" * 49_999 + "b", "ab" * 25_000, "x" * 50_000, "\u00e9" * 50_000]
    out = TextStream(CharTok(), stop)
    t0 = time.perf_counter()
    sent = "".join(out.push(ord("a"))[0] for _ in range(2000))
    elapsed = time.perf_counter() - t0
    assert sent == "" and out.text == "a" * 2000  # all held back: it may still become the first stop string
    assert elapsed < 1.0, f"{elapsed:.2f} s for 2,000 tokens"
    assert out.push(ord("c")) == ("a" * 2000 + "c", None)


def test_f1_probe_hostile_stop_strings_do_not_stall_other_requests(live):
    """Four stop strings at the cap on every row of a long request, then a 2-token request behind it."""
    srv = live(max_stop_chars=256, batch_wait_ms=1)
    hostile = ["a" * 255 + "b", "ab" * 128, "\ufffd" * 256, "é" * 256]
    body = {"prompt": ["the cat", "hello"], "n": 4, "temperature": 1.0, "max_tokens": 60, "stop": hostile}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.post("/v1/completions", json={**body, "stop": [*hostile[:3], "a" * 257]}).status_code == 400
        done = []
        t = threading.Thread(target=lambda: done.append(c.post("/v1/completions", json=body)))
        t.start()
        time.sleep(0.05)
        t0 = time.perf_counter()
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2, temperature=0), timeout=30)
        waited = time.perf_counter() - t0
        t.join(30)
    assert r.status_code == 200 and done[0].status_code == 200, done[0].text
    assert waited < 0.5, f"the 2-token request waited {waited:.2f} s"


# -- the fuzzer ----------------------------------------------------------------------------------------

KEYS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
        "stop", "seed", "stream", "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice",
        "response_format", "logit_bias", "echo", "best_of", "suffix", "presence_penalty", "user", "🙂", ""]
INTS = [0, 1, -1, 2, 3, 7, 64, 2**31, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**30)]
FLOATS = [0.0, -0.0, 1e-40, 5e-324, 1e-6, 1e-5, 0.5, 1.0, 1.999, 2.0, 2.5, -1.0, 1e308]


def fuzz_text(rng: random.Random) -> str:
    k = rng.randrange(9)
    if k == 0:
        return ""
    if k == 1:
        return rng.choice(["\ud800", "\udfff", "a\udc80b"]) + rng.choice(SAMPLES)  # lone surrogates
    if k == 2:
        return rng.choice(SAMPLES) * rng.choice([2, 60, 3_000, 40_000])
    if k == 3:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 20)))
    return rng.choice(SAMPLES)


def fuzz_value(rng: random.Random, depth: int = 0):
    k = rng.randrange(11)
    if k == 0:
        return None
    if k == 1:
        return rng.random() < 0.5
    if k == 2:
        return rng.choice(INTS)
    if k == 3:
        return rng.choice(FLOATS)
    if k == 4 and depth < 4:
        return [fuzz_value(rng, depth + 1) for _ in range(rng.randrange(6))]
    if k == 5 and depth < 4:
        return {rng.choice(KEYS): fuzz_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if k == 6:
        return [fuzz_text(rng) for _ in range(rng.choice([0, 1, 2, 4, 5, 70]))]
    if k == 7:
        return fuzz_messages(rng)
    return fuzz_text(rng)


def fuzz_messages(rng: random.Random) -> list:
    out = []
    for _ in range(rng.choice([0, 1, 1, 2, 3, 5, 70])):
        role = rng.choice(["user", "assistant", "system"]) if rng.random() < 0.9 else fuzz_value(rng, 3)
        content = fuzz_text(rng) if rng.random() < 0.85 else fuzz_value(rng, 3)
        out.append({"role": role, "content": content} if rng.random() < 0.95 else fuzz_value(rng, 3))
    if out and isinstance(out[-1], dict) and rng.random() < 0.8:
        out[-1]["role"] = "user"
    return out


def fuzz_request(rng: random.Random) -> tuple[str, dict, bytes]:
    """(path, headers, body) of one hostile or careless request; most are near a valid one."""
    path = rng.choice(["/v1/chat/completions"] * 5 + ["/v1/completions"] * 4 + ["/v1/models", "/v1/nope"])
    body: dict = ({"messages": [{"role": "user", "content": rng.choice(SAMPLES)}]} if "chat" in path
                  else {"prompt": rng.choice(SAMPLES)})
    body["max_tokens"] = rng.choice([1, 2, 4, 8])
    for _ in range(rng.randrange(5)):
        key = rng.choice(KEYS)
        if key == "stop":
            piece = rng.choice(SAMPLES)[: rng.randrange(1, 4)]  # repeated up to, and past, the length cap
            body[key] = [fuzz_text(rng) if rng.random() < 0.3 else piece * rng.choice([1, 64, 100, 300])
                         for _ in range(rng.choice([1, 2, 4, 5]))]
        elif key in ("seed", "n", "top_k", "max_tokens", "best_of", "logprobs", "top_logprobs"):
            body[key] = rng.choice(INTS) if rng.random() < 0.8 else fuzz_value(rng)
        elif key in ("temperature", "top_p", "presence_penalty"):
            body[key] = rng.choice(FLOATS) if rng.random() < 0.8 else fuzz_value(rng)
        elif key == "messages":
            body[key] = fuzz_messages(rng)
        else:
            body[key] = fuzz_value(rng)
    if isinstance(body.get("n"), int) and body["n"] > 2 and rng.random() < 0.7:
        body["n"] = 2  # keep most valid requests small: the fuzzer is about parsing, not generating
    kinds = ["text/plain", "", "application/json; charset=utf-16", "application/x-www-form-urlencoded"]
    headers = {"content-type": rng.choice(["application/json"] * 12 + kinds)}
    k = rng.random()
    data = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if k < 0.65:
        pass
    elif k < 0.70:
        data = data[: rng.randrange(len(data))]
    elif k < 0.75:
        number = rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-0", "1" * 5000, "0.0000000000001e-400"])
        data = data[:-1] + b', "temperature": ' + number.encode() + b"}"
    elif k < 0.80:
        depth = rng.choice([50, 1000, 100_000])
        data = data[:-1] + b', "messages": ' + b"[" * depth + b"]" * depth + b"}"
    elif k < 0.85:
        data = json.dumps(body, ensure_ascii=False).encode(rng.choice(["utf-16", "utf-32", "latin-1"]), "replace")
    elif k < 0.88:
        data = b"\xef\xbb\xbf" + data
    elif k < 0.92:
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    elif k < 0.95:
        data = rng.choice([b"", b"null", b"[]", b'"x"', b"{}", b"1", b'{"messages": null}', b'{"prompt": {}}'])
    else:
        data = data[:-1] + b', "stream": true, "stream": false, "n": 1, "n": 2}'  # duplicate keys
    if rng.random() < 0.1:
        body["stream"] = True
        data = json.dumps(body).encode()
    return path, headers, data


def check_reply(r: httpx.Response) -> str | None:
    """What is wrong with a reply to a fuzzed request, or None: never a 5xx, errors in OpenAI's shape,
    streams that end with [DONE] or an error that is not the server's."""
    if r.status_code >= 500:
        return f"{r.status_code}: {r.text[:300]}"
    if r.status_code >= 400:
        err = r.json().get("error", {})
        return None if set(err) == {"message", "type", "param", "code"} else f"error shape: {r.text[:300]}"
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line for line in r.text.splitlines() if line.startswith("data: ")]
        if events and events[-1] == "data: [DONE]":
            return None
        if events and '"server_error"' not in events[-1]:
            return None
        return f"stream: {r.text[-300:]}"
    return None


def send(client: httpx.Client, path: str, headers: dict, data: bytes) -> httpx.Response:
    method = "GET" if path == "/v1/models" else "POST"
    return client.request(method, path, headers={k: v for k, v in headers.items() if v}, content=data)


def test_fuzzed_bodies_get_no_5xx_and_health_stays_ok(live):
    srv = live(max_n=4, max_batch_size=8, batch_wait_ms=1)
    rng = random.Random(1234)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for i in range(300):
            path, headers, data = fuzz_request(rng)
            try:
                r = send(c, path, headers, data)
            except httpx.TransportError:
                # A body over 4x the limit is refused by closing the connection before it is read.
                assert len(data) > 4 * ServerConfig.max_body_bytes, (i, path, data[:300])
                continue
            problem = check_reply(r)
            assert problem is None, (i, path, data[:300], problem)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if i % 50 == 0:
                assert c.get("/health").json()["status"] == "ok"
        assert c.get("/health").status_code == 200
    assert statuses.get(200, 0) > 30 and statuses.get(400, 0) > 60  # both sides were exercised
    assert {413, 415} & set(statuses)


# -- F3: limits before the work ------------------------------------------------------------------------


def test_body_size_limit_and_json_only(live):
    srv = live(max_body_bytes=2000)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat("x" * 3000))
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no Content-Length: the limit counts what arrives
            for _ in range(10):
                yield b" " * 500

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        for ctype in ("text/plain", None):
            r = c.post("/v1/chat/completions", content=json.dumps(chat()).encode(),
                       headers={"content-type": ctype} if ctype else {})
            assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"
        assert c.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_long_prompts_are_refused_before_tokenizing_and_off_the_event_loop(live, monkeypatch):
    srv = live()
    threads, encode = [], Tokenizer.encode

    def spy(self, text):
        threads.append(threading.current_thread())
        return encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", spy)
    t0 = time.perf_counter()
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hello " * 500_000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert time.perf_counter() - t0 < 2 and not threads  # 3 MB refused without tokenizing it
    assert httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 1}).status_code == 200
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=1))
    assert r.status_code == 200 and threads and all(t is not srv.thread for t in threads)


# -- F4: API key, Host ---------------------------------------------------------------------------------


def test_api_key_is_required_on_v1_only(live):
    srv = live(api_key="s3cret")
    for auth in (None, "Bearer wrong", "s3cret", "Basic s3cret", "Bearer s3cret2"):
        headers = {"Authorization": auth} if auth else {}
        r = httpx.get(srv.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.post(srv.url + "/v1/chat/completions", json=chat()).status_code == 401
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/").status_code == 200
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
    assert client.chat.completions.create(model="tiny", messages=chat()["messages"], max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_host_allow_list(live):
    srv = live()
    port = srv.url.rsplit(":", 1)[1]
    for host, ok in [(f"127.0.0.1:{port}", True), (f"localhost:{port}", True), (f"[::1]:{port}", True),
                     ("LOCALHOST", True), ("evil.example", False), (f"evil.example:{port}", False),
                     ("127.0.0.1.evil.example", False), ("", False)]:
        r = httpx.get(srv.url + "/health", headers={"Host": host})
        assert (r.status_code == 200) == ok, host
        if not ok:
            assert r.json()["error"]["code"] == "invalid_host"
    assert host_allowed("api.example.com:80", ["*.example.com"])
    assert not host_allowed("example.com.evil", ["*.example.com"])
    anyone = live(allowed_hosts=("*",))
    assert httpx.get(anyone.url + "/health", headers={"Host": "evil.example"}).status_code == 200


def test_serve_command_key_hosts_and_warning(monkeypatch, tmp_path, tiny, capsys):
    import uvicorn

    from instructgpt.checkpoint import save_model

    model, tok = tiny
    save_model(model, tmp_path)
    tok.save(tmp_path)
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    monkeypatch.setenv("INSTRUCTGPT_API_KEY", "from-env")
    serve_command(tmp_path, device="cpu")
    config = apps[-1].state.config
    assert config.api_key == "from-env" and set(config.allowed_hosts) == {"localhost", "127.0.0.1", "[::1]"}
    assert "warning" not in capsys.readouterr().err
    monkeypatch.delenv("INSTRUCTGPT_API_KEY")
    serve_command(tmp_path, host="0.0.0.0", device="cpu")
    assert apps[-1].state.config.api_key is None and apps[-1].state.config.allowed_hosts == ("*",)
    assert "no --api-key" in capsys.readouterr().err
    serve_command(tmp_path, host="0.0.0.0", device="cpu", api_key="k", allowed_hosts=("box.lan",))
    assert apps[-1].state.config.allowed_hosts == ("box.lan",) and "warning" not in capsys.readouterr().err


# -- F8, F11: input hygiene and OpenAI compatibility -----------------------------------------------------


def test_client_mistakes_are_400s_and_the_connection_survives(live, tiny):
    model, tok = tiny
    srv = live()
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        cases = [
            (chat(seed=2**64), "seed"), (chat(seed=-(2**63) - 1), "seed"),
            (chat("a\ud800b"), "messages.0.content"), ({"prompt": "\udfff"}, "prompt"),
            (chat(stop=["ok", "\ud800"]), "stop"), (chat(top_logprobs=2, logprobs=True), "top_logprobs"),
            ({"prompt": "hi", "logprobs": 3}, "logprobs"), (chat(tools=[{"type": "function"}]), "tools"),
            (chat(response_format={"type": "json_object"}), "response_format"),
            (chat(logit_bias={"5": 10}), "logit_bias"),
            ({"prompt": "hi", "echo": True}, "echo"), ({"prompt": "hi", "best_of": 3}, "best_of"),
            (chat(presence_penalty=0.5), "presence_penalty"), (chat(temperature="hot"), "temperature"),
        ]
        for body, param in cases:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            r = c.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
            assert r.status_code == 400, (body, r.text)
            assert r.json()["error"]["param"] == param, (body, r.text)
        r = c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}], '
                   b'"temperature": NaN}', headers={"content-type": "application/json"})
        assert r.status_code == 400 and "finite" in r.json()["error"]["message"]
        # Neutral values of the refused fields pass; seeds over the whole range torch takes.
        for body in (chat(max_tokens=2, seed=2**64 - 1, tools=[], tool_choice="none", response_format={"type": "text"},
                          presence_penalty=0, logit_bias={}), chat(max_tokens=2, seed=-1)):
            assert c.post("/v1/chat/completions", json=body).status_code == 200
        # A temperature too small to divide by decodes greedily.
        tiny_t = c.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=1e-40)).json()
        greedy = c.post("/v1/chat/completions", json=chat(max_tokens=8, temperature=0)).json()
        assert tiny_t["choices"][0]["message"] == greedy["choices"][0]["message"]


def test_an_unexpected_error_is_a_json_500_and_keeps_the_connection(live, monkeypatch):
    srv = live()

    def broken(*args, **kwargs):
        raise KeyError("boom")

    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/health").status_code == 200
        monkeypatch.setattr(serve, "render_prompt", broken)
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers.get("connection") != "close"
        monkeypatch.undo()
        assert c.post("/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200


def test_logprobs_are_the_engines(live, tiny):
    model, tok = tiny
    srv = live()
    messages = chat("héllo wörld")["messages"]
    gen = generate(model, [render_prompt(tok, messages)], SamplingParams(max_new_tokens=12, temperature=0),
                   tok.eos_id, tok.pad_id)
    n = int(gen.lengths[0])
    expected = [t for t in gen.tokens[0, :n].tolist() if t != tok.eos_id]
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True)
    got = r.choices[0].logprobs.content
    assert len(got) == len(expected)
    assert [x.logprob for x in got] == pytest.approx(gen.logprobs[0, : len(expected)].tolist(), abs=1e-5)
    assert [x.token for x in got] == [tok.decode([t], skip_special_tokens=False) for t in expected]
    s = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0, logprobs=True,
                                       stream=True)
    streamed = [x.logprob for c in s if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert streamed == [x.logprob for x in got]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=messages, temperature=5)
    c = client.completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, logprobs=0)
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) <= 6
    assert lp.text_offset == sorted(lp.text_offset) and all(o <= len(c.choices[0].text) for o in lp.text_offset)


# -- F2, F9, F10: cancellation, backpressure, health, shutdown -----------------------------------------


ENGINES = ["continuous", "static"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("streaming", [False, True])
def test_a_client_that_leaves_is_cancelled(live, tiny, streaming, engine):
    model, _ = tiny
    srv = live(batch_wait_ms=1, engine=engine)
    calls = slowed(model, 0.02)
    body = chat(max_tokens=50, temperature=0, stream=streaming)  # 50 tokens would take over a second
    try:
        if streaming:
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
                next(r.iter_lines())
                time.sleep(0.1)
        else:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=0.3)
        time.sleep(0.2)
        seen = len(calls)
        time.sleep(0.3)
        assert len(calls) == seen < 40  # the engine stopped soon after the client left
        t0 = time.perf_counter()
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2)).status_code == 200
        assert time.perf_counter() - t0 < 0.5
    finally:
        unslow(model)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_request_joins_the_running_batch_and_streams_at_once(live, tiny, engine):
    """The continuous engine admits a short request at the next step and streams it while a long one
    runs; the static engine makes it wait for the long one (the difference this checks)."""
    model, tok = tiny
    srv = live(batch_wait_ms=1, engine=engine)
    long_len = int(generate(model, [render_prompt(tok, chat()["messages"])], SamplingParams(max_new_tokens=50,
                            temperature=0), tok.stop_ids, tok.pad_id).lengths[0])
    assert long_len == 50  # the long request does run long
    calls = slowed(model, 0.02)  # 50 tokens: over a second
    ends = {}
    try:
        def ask_long():
            r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=50, temperature=0), timeout=30)
            ends["long"] = (time.perf_counter(), r.status_code)

        t = threading.Thread(target=ask_long)
        t.start()
        while len(calls) < 5:
            time.sleep(0.005)
        # Log-probabilities make every token a chunk (this model's replies are special tokens, no text).
        body = chat("héllo wörld", max_tokens=3, temperature=0, stream=True, logprobs=True)
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=30) as r:
            for line in r.iter_lines():
                if '"logprobs": {' in line:
                    ends.setdefault("first", time.perf_counter())
        ends["short"] = time.perf_counter()
        t.join(30)
    finally:
        unslow(model)
    assert ends["long"][1] == 200 and "first" in ends
    if engine == "continuous":
        assert ends["short"] < ends["long"][0] - 0.3
    else:
        assert ends["first"] > ends["long"][0]


def test_a_requests_choices_share_one_prefill(live, tiny, monkeypatch):
    model, tok = tiny
    srv = live()
    batch = srv.app.state.batcher.engine.batch
    prefilled, prefill = [], batch.prefill
    monkeypatch.setattr(batch, "prefill", lambda slots, prompts, *a: prefilled.append(len(prompts))
                        or prefill(slots, prompts, *a))
    body = chat("the cat sat on the mat", n=4, max_tokens=12, temperature=0, logprobs=True)

    def replies(body) -> set[tuple]:
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert len(r["choices"]) == 4
        return {tuple(x["token"] for x in c["logprobs"]["content"]) for c in r["choices"]}

    greedy = replies(body)
    assert prefilled == [1]
    ids = render_prompt(tok, body["messages"])
    alone = generate(model, [ids], SamplingParams(max_new_tokens=12, temperature=0), tok.stop_ids, tok.pad_id)
    want = [t for t in alone.token_lists()[0] if t not in tok.stop_ids]  # no log-probability for an end token
    assert greedy == {tuple(tok.decode([t], skip_special_tokens=False) for t in want)}
    assert len(replies({**body, "temperature": 1.0, "seed": 3})) > 1 and prefilled == [1, 1]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_full_queue_is_a_503_with_retry_after(live, tiny, engine):
    model, _ = tiny
    srv = live(max_batch_size=2, max_n=2, max_queued_rows=2, batch_wait_ms=1, engine=engine)
    calls = slowed(model, 0.02)
    try:
        first = []
        t = threading.Thread(target=lambda: first.append(
            httpx.post(srv.url + "/v1/chat/completions", json=chat(n=2, max_tokens=30), timeout=30)))
        t.start()
        while not calls:
            time.sleep(0.01)
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=30)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        assert httpx.get(srv.url + "/health").json()["queued_rows"] == 2
        t.join(30)
        assert first[0].status_code == 200
        assert httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=30).status_code == 200
    finally:
        unslow(model)


@pytest.mark.parametrize("engine", ENGINES)
def test_health_reports_a_stuck_engine_and_a_dead_batcher(live, tiny, engine):
    model, _ = tiny
    srv = live(stall_after_s=0.3, batch_wait_ms=1, engine=engine)
    gate = threading.Event()
    slowed(model, 0.0, gate)
    try:
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["batcher_alive"] and h.json()["stalled_s"] == 0
        t = threading.Thread(target=lambda: httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2),
                                                       timeout=30))
        t.start()
        time.sleep(0.6)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 503 and h.json()["status"] == "unhealthy" and h.json()["stalled_s"] >= 0.3
        gate.set()
        t.join(30)
        h = httpx.get(srv.url + "/health")
        assert h.status_code == 200 and h.json()["last_step_age_s"] < 5
    finally:
        gate.set()
        unslow(model)
    # A bug that kills the model loop: the request that met it is answered, and /health says so.
    batcher = srv.app.state.batcher

    def broken(jobs):
        raise RuntimeError("bug in the batcher (simulated)")

    if engine == "static":
        batcher.plan = broken
    else:
        batcher.admit = broken
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2), timeout=10)
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and not h.json()["batcher_alive"]
    r = httpx.post(srv.url + "/v1/chat/completions", json=chat(max_tokens=2))
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error"


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_cancels_jobs_and_waits_a_bounded_time(tiny, engine):
    model, tok = tiny
    calls = slowed(model, 0.05)

    async def scenario():
        batcher = Batcher(model, tok, ServerConfig(stop_timeout_s=2, engine=engine))
        await batcher.start()
        params = SamplingParams(max_new_tokens=60, temperature=0)
        jobs = batcher.submit([[tok.bos_id, 7, 8]], [params], 2, [])
        while not calls:
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        await batcher.stop()
        stopped = time.perf_counter() - t0
        events = []
        while not jobs[0].events.empty():
            events.append(jobs[0].events.get_nowait())
        return stopped, events

    try:
        stopped, events = asyncio.run(scenario())
    finally:
        unslow(model)
    assert stopped < 1.0 and len(calls) < 20  # 60 steps of 50 ms were asked for
    assert any(isinstance(e, APIError) and e.status == 503 for e in events)
