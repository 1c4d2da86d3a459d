"""Load test of `instructgpt serve`: many concurrent clients against servers this script starts itself,
one per engine (continuous batching, then the static batcher), with the same requests.

    python benchmarks/serve_load.py [--model DIR] [--requests 200] [--clients 32] [--min-tokens 8]
                                    [--max-tokens 256] [--engines continuous static]

Localhost only and bounded: a fixed number of requests, each with a timeout, and a time limit on each
engine's run. Without --model, a random 4-layer, 128-wide GPT (vocab 512, context 512) is built in a
temporary folder; random weights rarely produce the end token, so nearly every reply runs to its
max_tokens and tokens/s measures the engine. Request i asks for a max_tokens between --min-tokens and
--max-tokens (powers of two, in a fixed mixed order), so rows end at very different steps: what
continuous batching is for. Every fourth request streams (SSE) and one in three samples at temperature
0.8 (the rest are greedy). Prints one JSON line per engine: requests sent, answered, failed and lost (no
answer within the limits), p50/p99 latency, completion tokens per second of wall time, engine calls and
decode steps (from /health); then one line with the continuous engine's ratios to the static one.
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
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=4, n_head=4, n_embd=128, block_size=512)), folder)
    tok.save(folder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def token_budgets(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi, in an order that mixes short and long (8, 256, 16, 128, 32, 64, ...)."""
    ks = [lo]
    while ks[-1] * 2 <= hi:
        ks.append(ks[-1] * 2)
    return [ks[i // 2] if i % 2 == 0 else ks[-1 - i // 2] for i in range(len(ks))]


def request_body(i: int, budgets: list[int]) -> dict:
    words = " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(3 + i % 10))
    return {"messages": [{"role": "user", "content": f"tell me about {words}"}],
            "max_tokens": budgets[i % len(budgets)],
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


async def load(base: str, n_requests: int, n_clients: int, budgets: list[int], timeout: float) -> dict:
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
                n = await one(client, url, request_body(i, budgets))  # `tokens += await` would race
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


def run_engine(args, model: Path, engine: str, budgets: list[int]) -> dict:
    """Start a server with `engine`, send the load, stop it; the result line."""
    deadline = time.time() + args.time_limit
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, "-m", "instructgpt.cli", "serve", str(model), "--host", "127.0.0.1", "--port",
           str(port), "--device", args.device, "--engine", engine, "--max-batch-size", str(args.max_batch_size),
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
        before = httpx.get(base + "/health").json()
        try:
            stats = asyncio.run(asyncio.wait_for(
                load(base, args.requests, args.clients, budgets, args.request_timeout),
                timeout=max(1.0, deadline - time.time())))
        except asyncio.TimeoutError:
            stats = {"answered": 0, "failed": 0, "timed_out": True}
        health = httpx.get(base + "/health", timeout=10).json()
    finally:
        server.terminate()
        server.wait(10)
    calls = health["model_calls"] - before["model_calls"]
    return {"engine": engine, "requests": args.requests, "clients": args.clients, "max_tokens": budgets, **stats,
            "lost": args.requests - stats["answered"] - stats["failed"], "model_calls": calls,
            "decode_steps": health["steps"] - before["steps"], "device": args.device, "threads": args.threads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a model folder (default: a random 4-layer model)")
    ap.add_argument("--engines", nargs="+", default=["continuous", "static"], choices=["continuous", "static"])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-batch-size", type=int, default=32)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--request-timeout", type=float, default=300.0)
    ap.add_argument("--time-limit", type=float, default=600.0, help="each engine's run, server start included")
    args = ap.parse_args()
    if not (1 <= args.requests <= 10_000 and 1 <= args.clients <= 256 and 1 <= args.min_tokens <= args.max_tokens):
        raise SystemExit("--requests must be in [1, 10000], --clients in [1, 256], 1 <= --min-tokens <= --max-tokens")
    budgets = token_budgets(args.min_tokens, args.max_tokens)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "model"
            build_model(model)
        for engine in args.engines:
            results[engine] = run_engine(args, model, engine, budgets)
            print(json.dumps(results[engine]), flush=True)
    if {"continuous", "static"} <= set(results):
        c, s = results["continuous"], results["static"]
        if c.get("p99_ms") and s.get("p99_ms"):
            print(json.dumps({"tokens_per_s_continuous_vs_static": round(c["tokens_per_s"] / s["tokens_per_s"], 2),
                              "p99_static_vs_continuous": round(s["p99_ms"] / c["p99_ms"], 2),
                              "p50_static_vs_continuous": round(s["p50_ms"] / c["p50_ms"], 2)}))
    if any(r["failed"] or r["lost"] for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
