"""Benchmark `prepare` on tinyshakespeare: tokenizer training time, then encoding throughput.

    python benchmarks/prepare.py [--data PATH] [--vocab-size 4096]

Prints one JSON line per tokenizer kind. Training is timed on its own (Tokenizer.train_*); the encoding
run is prepare_command with that tokenizer passed as --tokenizer-path, so mb_per_s is reading,
encoding and writing shards only.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

from instructgpt.prepare import load_shards, prepare_command, read_documents
from instructgpt.tokenizer import Tokenizer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def bench(kind: str, data: Path, vocab_size: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        texts = (text for text, _ in read_documents(data))
        tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size) if kind == "bpe" else Tokenizer.train_char(texts)
        train_s = time.perf_counter() - t0
        tok.save(Path(tmp) / "tok")

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            prepare_command([data], Path(tmp) / "data", tokenizer_path=Path(tmp) / "tok")
        encode_s = time.perf_counter() - t0
        meta, _, _ = load_shards(Path(tmp) / "data")
    mb = data.stat().st_size / 1e6
    return {
        "bench": "prepare",
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "mb": round(mb, 3),
        "train_s": round(train_s, 3),
        "encode_s": round(encode_s, 3),
        "mb_per_s": round(mb / encode_s, 3),
        "tokens": meta["tokens"]["train"] + meta["tokens"]["val"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    if not args.data.is_file():
        raise SystemExit(f"no corpus at {args.data}: pass --data")
    for kind in ("bpe", "char"):
        print(json.dumps(bench(kind, args.data, args.vocab_size)), flush=True)


if __name__ == "__main__":
    main()
