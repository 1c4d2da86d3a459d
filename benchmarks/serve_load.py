"""Load test of `instructgpt serve`: many concurrent clients against a server this script starts itself.

    python benchmarks/serve_load.py [--model DIR] [--requests 200] [--clients 32] [--max-tokens 32]

Localhost only and bounded: a fixed number of requests, each with a timeout, and a time limit on the
whole run. Without --model, a random 4-layer, 128-wide GPT (vocab 512, context 256) is built in a temporary
folder; random weights rarely produce the end token, so nearly every reply runs to --max-tokens and
tokens/s measures the engine. Every fourth request streams (SSE) and one in three samples at temperature
0.8 (the rest are greedy), so the batcher sees mixed groups. Prints one JSON line: requests sent,
answered, failed and lost (no answer within the limits), p50/p99 latency, completion tokens per second of
wall time, and how many engine calls served them (from /health).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from instructgpt.checkpoint import save_model
from instructgpt.model import GPT, ModelConfig
from instructgpt.tokenizer import Tokenizer

WORDS = "the cat sat on a mat while seven blue birds sang about rivers mountains and small red houses".split()


def build_model(folder: Path) -> None:
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) for i in range(200)]
    tok = Tokenizer.train_bpe(texts, vocab_size=512)
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=256)), folder)
    tok.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body(i: int, max_tokens: int) -> dict:
    words = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3 + i % 10))
    return {"messages": [{"role": "user", "content": f"tell me about {words}"}], "max_tokens": max_tokens,
            "temperature": 0.8 if i % 3 == 0 else 0.0, "stream": i % 4 == 0,
            "stream_options": {"include_usage": True}}


async def one(client: httpx.AsyncClient, url: str, body: dict) -> int:
    """Completion tokens of one answered request; raises on any failure."""
    if not body["stream"]:
        r = await client.post(url, json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]
    usage, done = None, False
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                usage = chunk.get("usage") or usage
    if not done or usage is None:
        raise RuntimeError("the stream ended without [DONE] and usage")
    return usage["completion_tokens"]


async def load(base: str, n_requests: int, n_clients: int, max_tokens: int, timeout: float) -> dict:
    url = base + "/v1/chat/completions"
    latencies: list[float] = []
    tokens, failures = 0, []
    next_i = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal next_i, tokens
        while next_i < n_requests:
            i, next_i = next_i, next_i + 1
            t0 = time.perf_counter()
            try:
                n = await one(client, url, request_body(i, max_tokens))  # `tokens += await` would race
                tokens += n
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted and reported, never hidden
                failures.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(n_clients)))
        wall = time.perf_counter() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None

    return {"answered": len(latencies), "failed": len(failures), "failures": failures[:3], "p50_ms": pct(0.50),
            "p99_ms": pct(0.99), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a model folder (default: a random 4-layer model)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--request-timeout", type=float, default=60.0)
    ap.add_argument("--time-limit", type=float, default=300.0, help="the whole run, server start included")
    args = ap.parse_args()
    if not (1 <= args.requests <= 10_000 and 1 <= args.clients <= 256):
        raise SystemExit("--requests must be in [1, 10000] and --clients in [1, 256]")

    deadline = time.time() + args.time_limit
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "model"
            build_model(model)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "instructgpt.cli", "serve", str(model), "--host", "127.0.0.1", "--port",
               str(port), "--device", args.device, "--max-batch-size", str(args.max_batch_size),
               "--batch-wait-ms", str(args.batch_wait_ms), "--max-n", str(min(8, args.max_batch_size)),
               "--max-queued-rows", str(max(256, args.max_batch_size))]
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the server exited with status {server.returncode}")
                if time.time() > deadline:
                    raise SystemExit("the server did not start within --time-limit")
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            calls_before = httpx.get(base + "/health").json()["model_calls"]
            try:
                stats = asyncio.run(asyncio.wait_for(
                    load(base, args.requests, args.clients, args.max_tokens, args.request_timeout),
                    timeout=max(1.0, deadline - time.time())))
            except asyncio.TimeoutError:
                stats = {"answered": 0, "failed": 0, "timed_out": True}
            health = httpx.get(base + "/health", timeout=10).json()
        finally:
            server.terminate()
            server.wait(10)
    calls = health["model_calls"] - calls_before
    result = {"requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens, **stats,
              "lost": args.requests - stats["answered"] - stats["failed"], "model_calls": calls,
              "requests_per_call": round(args.requests / max(calls, 1), 2), "device": args.device,
              "threads": args.threads}
    print(json.dumps(result))
    if result["failed"] or result["lost"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
