"""Fuzz and soak `instructgpt serve`: a real uvicorn server this script starts on 127.0.0.1.

    python benchmarks/soak.py [--bodies 3000] [--clients 256] [--requests 2000] [--time-limit 540]

A random 2-layer model (context 128) and its tokenizer are saved to a temporary folder and served by
`instructgpt serve` in a subprocess on a free port. Three phases, each printing one JSON line:

1. fuzz: --bodies hostile or careless request bodies (tests/test_serve_faults.py's `fuzz_request`:
   wrong types, huge and tiny numbers, lone surrogates, bad encodings, deep nesting, oversized bodies and
   stop strings) from 8 concurrent clients, while /health is polled every 0.1 s. Reports the status
   counts, the 5xx count and transport errors (must be 0; a body over 4 times the size limit is refused
   by closing the connection unread, counted as closed_oversize) and how /health answered throughout.
2. soak: --requests requests from --clients concurrent clients, mixed: non-streaming, streaming,
   clients that disconnect mid-stream or give up on a non-streaming reply, slow readers. A 503 (queue
   full) is retried after its Retry-After. Reports requests served, lost (no complete answer, not given
   up on purpose: must be 0), p50/p99 latency, the server's RSS when ready, after a warm-up (300 fuzz
   bodies and 200 soak requests: the start), after the fuzz and at the end (must stay within 10% of the
   start), and the queued rows left once every client is done (must be 0).
   The server's log must hold no traceback (an error no handler answered).
3. probe (the audit's F1): a request with four hostile stop strings at the length cap on every row,
   then a 2-token request 50 ms behind it; reports how long the second one waited (must be < 0.5 s).

Bounded: counts are capped, every request has a timeout and the whole run a time limit; only 127.0.0.1.
Exits 1 when a "must" fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_serve_faults import check_reply, fuzz_request  # noqa: E402  (the one fuzzer, shared with the tests)

from instructgpt.checkpoint import save_model  # noqa: E402
from instructgpt.model import GPT, ModelConfig  # noqa: E402
from instructgpt.tokenizer import Tokenizer  # noqa: E402

OVERSIZE = 4 * 4 * 2**20  # 4 x the server's default --max-body-bytes: bodies the server does not read to the end
WORDS = "the cat sat on a mat while seven blue birds sang héllo wörld 日本語 emoji 😀 rivers and red houses".split()


def build_model(folder: Path) -> None:
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tok = Tokenizer.train_bpe(texts, vocab_size=400)
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=128)), folder)
    tok.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def pct(values: list[float], p: float) -> float | None:
    values = sorted(values)
    return round(1000 * values[min(len(values) - 1, int(p * len(values)))], 1) if values else None


# -- 1. fuzz ----------------------------------------------------------------------------------------


def poll_health(base: str, stop: threading.Event, health: dict) -> None:
    """/health every 0.1 s from a thread of its own, so that the fuzzer's own work does not delay it."""
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                r = client.get(base + "/health")
                ok = r.status_code == 200 and r.json()["status"] == "ok"
            except httpx.HTTPError:
                ok = False
            health["polls"] += 1
            health["not_ok"] += not ok
            health["max_ms"] = max(health["max_ms"], round(1000 * (time.perf_counter() - t0), 1))
            stop.wait(0.1)


async def fuzz(base: str, n_bodies: int, seed: int, deadline: float) -> dict:
    rng = random.Random(seed)
    statuses: dict[str, int] = {}
    problems: list[str] = []
    sent = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < n_bodies and time.time() < deadline:
            sent += 1
            path, headers, data = fuzz_request(rng)
            method = "GET" if path == "/v1/models" else "POST"
            try:
                r = await client.request(method, base + path, content=data,
                                         headers={k: v for k, v in headers.items() if v})
                key = str(r.status_code)
                problem = check_reply(r)
            except httpx.TransportError as e:
                if len(data) > OVERSIZE:  # refused unread: the server closes rather than read 4x its limit
                    key, problem = "closed_oversize", None
                else:
                    key, problem = type(e).__name__, f"{type(e).__name__}: {e}"
            statuses[key] = statuses.get(key, 0) + 1
            if problem:
                problems.append(f"{path} {data[:120]!r}: {problem}")

    health = {"polls": 0, "not_ok": 0, "max_ms": 0.0}
    stop = threading.Event()
    poller = threading.Thread(target=poll_health, args=(base, stop, health), daemon=True)
    poller.start()
    # Keep-alive shorter than the server's 5 s: a pooled connection the server is closing at that very moment
    # would fail a request that was never read.
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(keepalive_expiry=2.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(8)))
        wall = time.perf_counter() - t0
    stop.set()
    poller.join(15)
    fivexx = sum(v for k, v in statuses.items() if k.startswith("5"))
    return {"phase": "fuzz", "bodies_sent": sent, "statuses": dict(sorted(statuses.items())), "5xx": fivexx,
            "transport_errors": sum(v for k, v in statuses.items() if not k.isdigit() and k != "closed_oversize"),
            "problems": len(problems), "first_problems": problems[:3], "health_polls": health["polls"],
            "health_not_ok": health["not_ok"], "health_max_ms": health["max_ms"], "wall_s": round(wall, 1)}


# -- 2. soak ----------------------------------------------------------------------------------------

KINDS = ["plain"] * 4 + ["stream"] * 3 + ["drop_stream", "give_up", "slow_reader"]


def soak_body(rng: random.Random, kind: str) -> dict:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(1, 8)))
    body = {"messages": [{"role": "user", "content": words}], "max_tokens": rng.randrange(4, 48),
            "temperature": rng.choice([0.0, 0.7, 1.0]), "n": rng.choice([1, 1, 1, 2])}
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS)[:3], "ab" * rng.randrange(1, 100)]
    if rng.random() < 0.1:
        body["logprobs"] = True
    body["stream"] = kind in ("stream", "drop_stream", "slow_reader")
    return body


async def one(client: httpx.AsyncClient, url: str, body: dict, kind: str, rng: random.Random) -> str:
    """'served', 'gave_up' (on purpose) or raises; a 503 raises Busy with its Retry-After."""
    if kind == "give_up":
        try:
            await asyncio.wait_for(client.post(url, json=body), timeout=rng.uniform(0.01, 0.3))
            return "served"
        except asyncio.TimeoutError:
            return "gave_up"
    if not body["stream"]:
        r = await client.post(url, json=body)
        if r.status_code == 503:
            raise Busy(float(r.headers.get("retry-after", "1")))
        r.raise_for_status()
        assert r.json()["choices"], r.text
        return "served"
    async with client.stream("POST", url, json=body) as r:
        if r.status_code == 503:
            raise Busy(float(r.headers.get("retry-after", "1")))
        r.raise_for_status()
        lines = 0
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                return "served"
            if line.startswith("data: "):
                lines += 1
                if '"error"' in line:
                    raise RuntimeError(line)
                if kind == "drop_stream" and lines >= rng.randrange(1, 4):
                    return "gave_up"
                if kind == "slow_reader":
                    await asyncio.sleep(rng.uniform(0.01, 0.05))
    raise RuntimeError("the stream ended without [DONE]")


class Busy(Exception):
    def __init__(self, retry_after: float):
        self.retry_after = retry_after


async def soak(base: str, n_requests: int, n_clients: int, timeout: float, seed: int, deadline: float) -> dict:
    url = base + "/v1/chat/completions"
    rng = random.Random(seed)
    counts = {"served": 0, "gave_up": 0, "lost": 0, "busy_retries": 0}
    latencies: list[float] = []
    failures: list[str] = []
    next_i = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i
        while next_i < n_requests and time.time() < deadline:
            i, next_i = next_i, next_i + 1
            kind = KINDS[i % len(KINDS)]
            body = soak_body(rng, kind)
            t0 = time.perf_counter()
            for _attempt in range(20):
                try:
                    outcome = await asyncio.wait_for(one(client, url, body, kind, rng), timeout)
                    break
                except Busy as b:
                    counts["busy_retries"] += 1
                    await asyncio.sleep(b.retry_after)
                except Exception as e:  # counted and reported, never hidden
                    outcome = "lost"
                    failures.append(f"{kind}: {type(e).__name__}: {e}"[:300])
                    break
            else:
                outcome = "lost"
                failures.append(f"{kind}: still busy after 20 tries")
            counts[outcome] += 1
            if outcome == "served":
                latencies.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    return {"requests": sum(counts[k] for k in ("served", "gave_up", "lost")), **counts, "failures": failures[:3],
            "p50_ms": pct(latencies, 0.5), "p99_ms": pct(latencies, 0.99), "wall_s": round(wall, 1)}


# -- 3. probe ---------------------------------------------------------------------------------------


async def probe(base: str) -> dict:
    """The 2-token request's wait behind a request whose 8 rows each carry four stop strings at the cap
    built to be costly to match, and behind the same request without stop strings (the engine's share)."""
    hostile = ["a" * 255 + "b", "ab" * 128, "\ufffd" * 256, "é" * 256]
    body = {"prompt": ["the cat", "hello"], "n": 4, "temperature": 1.0, "max_tokens": 60, "seed": 1}
    small = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, "temperature": 0}
    out = {"phase": "probe_f1", "rows": 8, "max_tokens": 60}
    async with httpx.AsyncClient(timeout=60) as client:
        over = await client.post(base + "/v1/completions", json={**body, "stop": [*hostile[:3], "a" * 257]})
        out["over_cap_status"] = over.status_code
        for name, stop in (("no_stop", None), ("hostile", hostile)):
            t_big = time.perf_counter()
            big = asyncio.create_task(client.post(base + "/v1/completions", json={**body, "stop": stop}))
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            r = await client.post(base + "/v1/chat/completions", json=small)
            out[f"{name}_small_waited_s"] = round(time.perf_counter() - t0, 3)
            b = await big
            out[f"{name}_request_s"] = round(time.perf_counter() - t_big, 3)
            out[f"{name}_status"] = (b.status_code, r.status_code)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bodies", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (1: no OpenMP spinning)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-log", type=Path, help="keep the server's stderr in this file")
    ap.add_argument("--time-limit", type=float, default=540.0, help="the whole run, server start included")
    args = ap.parse_args()
    if not (1 <= args.bodies <= 50_000 and 1 <= args.clients <= 512 and 1 <= args.requests <= 20_000):
        raise SystemExit("--bodies must be in [1, 50000], --clients in [1, 512], --requests in [1, 20000]")

    deadline = time.time() + args.time_limit
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "model"
        build_model(model)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "instructgpt.cli", "serve", str(model), "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu", "--max-batch-size", "32", "--max-queued-rows", "256"]
        log = open(Path(tmp) / "server.log", "w+b")  # a file, not a pipe: a full pipe would block the server
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with status {server.returncode}: "
                                     f"{(Path(tmp) / 'server.log').read_text()[-2000:]}")
                if time.time() > deadline:
                    raise SystemExit("the server did not start within --time-limit")
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            rss_ready = rss_mb(server.pid)
            # Warm-up: a short pass of both phases, so that "start" is the server's working size (the
            # allocator keeps the high-water mark of the few-MB bodies the fuzzer sends): growth from
            # there to the end is what a leak would show.
            asyncio.run(fuzz(base, 300, args.seed + 1, deadline))
            warm = asyncio.run(soak(base, 200, 64, args.request_timeout, args.seed + 1, deadline))
            rss_start = rss_mb(server.pid)
            results.append(asyncio.run(fuzz(base, args.bodies, args.seed, deadline)))
            rss_after_fuzz = rss_mb(server.pid)
            soaked = asyncio.run(soak(base, args.requests, args.clients, args.request_timeout, args.seed, deadline))
            time.sleep(0.5)  # the rows of the last clients that left are freed at the engine's next step
            health = httpx.get(base + "/health", timeout=10).json()
            rss_end = rss_mb(server.pid)
            results.append({"phase": "soak", "clients": args.clients, **soaked, "warmup_requests": warm["requests"],
                            "rss_ready_mb": rss_ready, "rss_start_mb": rss_start, "rss_after_fuzz_mb": rss_after_fuzz,
                            "rss_end_mb": rss_end, "rss_end_over_start": round(rss_end / rss_start, 3),
                            "rss_end_over_ready": round(rss_end / rss_ready, 3),
                            "queued_rows_after": health["queued_rows"], "health_after": health["status"]})
            results.append(asyncio.run(probe(base)))
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
            log.close()
        server_log = (Path(tmp) / "server.log").read_text(errors="replace")
        if args.server_log:
            args.server_log.write_text(server_log)
    results[-1]["server_log_tracebacks"] = server_log.count("Traceback")
    for r in results:
        print(json.dumps(r), flush=True)
    fz, sk, pr = results
    must = {"no_unhandled_errors": pr["server_log_tracebacks"] == 0,
            "no_5xx": fz["5xx"] == 0 and fz["transport_errors"] == 0, "health_ok": fz["health_not_ok"] == 0,
            "no_lost": sk["lost"] == 0, "memory": sk["rss_end_over_start"] <= 1.10,
            "no_rows_left": sk["queued_rows_after"] == 0, "probe": pr["hostile_small_waited_s"] < 0.5}
    print(json.dumps({"phase": "verdict", **must, "timed_out": time.time() > deadline}), flush=True)
    if not all(must.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
