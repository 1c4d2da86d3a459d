"""Corpus -> tokenizer + token shards for pretraining.

Reads .txt (documents separated by blank lines), .jsonl (one {"text": ...} per line) and .parquet (a
`text` column, read one row group at a time) files as a stream: neither the corpus nor its tokens are
ever held in memory whole. Writes one folder (`RUN/data` in the run layout):

    out/tokenizer.json     the tokenizer of the shards (trained here, or a copy of --tokenizer-path)
    out/train_000.bin ...  token ids, numpy memmap (uint16 if vocab_size <= 65535, else uint32), each
    out/val_000.bin ...    document followed by <|eos|>; a shard holds at most shard_tokens tokens
    out/meta.json          dtype, vocab_size, eos_id, tokens/documents/shard files per split, tokenizer file

Documents go to train or val by a seeded hash of their text: deterministic, independent of file order,
and a duplicated document never lands in both splits.

The folder appears complete or not at all: everything is written into `out.tmp-*` and renamed at the end.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from .errors import UserError
from .records import parse_json, read_json_file, type_name
from .tokenizer import Tokenizer

SUFFIXES = (".txt", ".jsonl", ".parquet")
META = "meta.json"
SPLITS = ("train", "val")
_CHUNK_CHARS = 1 << 20  # encode about 1 MB of text per encode_batch call: enough to keep all cores busy
_CHUNK_DOCS = 8192

OnBytes = Callable[[int], None]
Document = tuple[str, str]  # (text, where it came from, e.g. "corpus.jsonl:12", for error messages)


# -- reading documents --------------------------------------------------------------------------


def _decode(raw: bytes, path: Path, line: int, offset: int) -> str:
    skip = len(codecs.BOM_UTF8) if line == 1 and raw.startswith(codecs.BOM_UTF8) else 0  # a mark, not text
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}:{line}: invalid UTF-8 at byte offset {offset + skip + e.start} ({e.reason})"
                        ) from None


class _Batched:
    """Reports bytes read in steps of 64 KiB: a progress-bar update per line would cost more than reading."""

    def __init__(self, on_bytes: OnBytes):
        self.on_bytes, self.pending = on_bytes, 0

    def __call__(self, n: int) -> None:
        self.pending += n
        if self.pending >= 1 << 16:
            self.on_bytes(self.pending)
            self.pending = 0

    def __enter__(self) -> _Batched:
        return self

    def __exit__(self, *exc) -> None:
        self.on_bytes(self.pending)
        self.pending = 0


def _read_txt(path: Path, on_bytes: OnBytes) -> Iterator[Document]:
    lines: list[str] = []
    first = 0
    offset = 0
    with open(path, "rb") as f, _Batched(on_bytes) as on_bytes:
        for n, raw in enumerate(f, start=1):
            line = _decode(raw, path, n, offset)
            offset += len(raw)
            on_bytes(len(raw))
            if line.strip():
                if not lines:
                    first = n
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\r\n"), f"{path}:{first}"
                lines = []
    if lines:
        yield "".join(lines).rstrip("\r\n"), f"{path}:{first}"


def _read_jsonl(path: Path, on_bytes: OnBytes) -> Iterator[Document]:
    offset = 0
    with open(path, "rb") as f, _Batched(on_bytes) as on_bytes:
        for n, raw in enumerate(f, start=1):
            line = _decode(raw, path, n, offset)
            offset += len(raw)
            on_bytes(len(raw))
            if not line.strip():
                continue
            record = parse_json(line, str(path), n)  # duplicate keys, NaN, lone surrogates: file:line errors
            if not isinstance(record, dict) or "text" not in record:
                raise UserError(f'{path}:{n}: expected a JSON object with a "text" field')
            if not isinstance(record["text"], str):
                raise UserError(f'{path}:{n}: field "text" must be a string, got {type_name(record["text"])}')
            yield record["text"], f"{path}:{n}"


def _read_parquet(path: Path, on_bytes: OnBytes) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: .parquet needs pyarrow (pip install 'instructgpt[parquet]')") from None
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({e})") from None
    schema = pf.schema_arrow
    if "text" not in schema.names:
        raise UserError(f'{path}: no "text" column (columns: {schema.names})')
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f'{path}: column "text" must hold strings, has type {kind}')
    groups = max(pf.num_row_groups, 1)
    size = path.stat().st_size
    row = 0
    for g in range(pf.num_row_groups):
        for text in pf.read_row_group(g, columns=["text"]).column("text").to_pylist():
            if text is None:
                raise UserError(f'{path}: row {row}: field "text" is null')
            yield text, f"{path} row {row}"
            row += 1
        on_bytes(size * (g + 1) // groups - size * g // groups)  # bytes of the file, spread over groups


def read_documents(path: Path, on_bytes: OnBytes | None = None) -> Iterator[Document]:
    """Yield (text, where) for each document of a .txt, .jsonl or .parquet file, streaming."""
    path = Path(path)
    on_bytes = on_bytes or (lambda n: None)
    if not path.is_file():
        raise UserError(f"input file not found: {path}")
    readers = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    if path.suffix not in readers:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected one of {SUFFIXES}")
    yield from readers[path.suffix](path, on_bytes)


def _texts(paths: Iterable[Path], on_bytes: OnBytes) -> Iterator[str]:
    for path in paths:
        for text, _ in read_documents(path, on_bytes):
            if text:
                yield text


# -- splitting and writing ----------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves the disk and memory of the shards whenever the ids fit in it."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def is_val(text: str, seed: int, val_fraction: float) -> bool:
    """The split of a document: a seeded hash of its text, uniform in [0, 1), compared to val_fraction."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


class _ShardWriter:
    """Appends token ids to split_000.bin, split_001.bin, ..., at most shard_tokens per file."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.files: list[str] = []
        self.tokens = 0
        self.documents = 0
        self._file = None
        self._in_shard = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None or self._in_shard == self.shard_tokens:
                self._next_shard()
            take = min(len(ids), self.shard_tokens - self._in_shard)
            ids[:take].tofile(self._file)
            self._in_shard += take
            self.tokens += take
            ids = ids[take:]

    def _next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.files):03d}.bin"
        self._file = open(self.folder / name, "wb")  # closed by close()
        self.files.append(name)
        self._in_shard = 0

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _encode_chunk(tok: Tokenizer, chunk: list[Document]) -> list[list[int]]:
    try:
        return tok.encode_batch([text for text, _ in chunk])
    except UserError:
        for text, where in chunk:  # find the document to blame
            try:
                tok.encode(text)
            except UserError as e:
                raise UserError(f"{where}: {e}") from None
        raise


def _chunks(paths: Iterable[Path], on_bytes: OnBytes) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for path in paths:
        for text, where in read_documents(path, on_bytes):
            chunk.append((text, where))
            chars += len(text)
            if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
                yield chunk
                chunk, chars = [], 0
    if chunk:
        yield chunk


def _progress():
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _write_shards(
    tmp: Path, inputs: list[Path], tok: Tokenizer, val_fraction: float, seed: int, shard_tokens: int
) -> dict:
    dtype = token_dtype(tok.vocab_size)
    writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens) for split in SPLITS}
    skipped = 0
    total = sum(p.stat().st_size for p in inputs)
    try:
        with _progress() as progress:
            task = progress.add_task("tokenizing", total=total)
            for chunk in _chunks(inputs, lambda n: progress.advance(task, n)):
                buffers: dict[str, list[int]] = {split: [] for split in SPLITS}
                for (text, _), ids in zip(chunk, _encode_chunk(tok, chunk)):
                    if not text:
                        skipped += 1
                        continue
                    split = "val" if is_val(text, seed, val_fraction) else "train"
                    buffers[split] += ids
                    buffers[split].append(tok.eos_id)
                    writers[split].documents += 1
                for split, buf in buffers.items():
                    writers[split].write(np.asarray(buf, dtype=dtype))
    finally:
        for w in writers.values():
            w.close()
    return {
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": "tokenizer.json",
        "tokenizer_kind": tok.kind,
        "tokens": {s: w.tokens for s, w in writers.items()},
        "documents": {s: w.documents for s, w in writers.items()},
        "shards": {s: w.files for s, w in writers.items()},
        "empty_documents_skipped": skipped,
        "shard_tokens": shard_tokens,
        "val_fraction": val_fraction,
        "seed": seed,
        "inputs": [str(p) for p in inputs],
    }


def _check_args(inputs: list[Path], tokenizer: str, val_fraction: float, shard_tokens: int) -> None:
    if not inputs:
        raise UserError("no input files: pass --inputs FILE [FILE ...] (.txt, .jsonl or .parquet)")
    for p in inputs:
        if not p.is_file():
            raise UserError(f"input file not found: {p}")
        if p.suffix not in SUFFIXES:
            raise UserError(f"{p}: unsupported file type {p.suffix!r}; expected one of {SUFFIXES}")
    if tokenizer not in ("bpe", "char"):
        raise UserError(f"--tokenizer must be 'bpe' or 'char', got {tokenizer!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens must be positive, got {shard_tokens}")


def _request(inputs: list[Path], tokenizer: str, vocab_size: int, tokenizer_path: Path | None, val_fraction: float,
             shard_tokens: int, seed: int) -> dict:
    """What a prepared folder is made from (kept in meta.json): an existing folder is reused only for the same."""
    trained = tokenizer_path is None
    return {"inputs": [[str(p.resolve()), p.stat().st_size] for p in inputs],
            "tokenizer": tokenizer if trained else str(Path(tokenizer_path).resolve()),
            "vocab_size": vocab_size if trained and tokenizer == "bpe" else None,
            "val_fraction": val_fraction, "shard_tokens": shard_tokens, "seed": seed}


def _check_same_request(out: Path, request: dict) -> None:
    meta = read_json_file(out / META)
    made = meta.get("request") if isinstance(meta, dict) else None
    if made is None:  # prepared before meta.json recorded its request: kept, as it always was
        return
    changed = [k for k in request if made.get(k) != request[k]]
    if changed:
        raise UserError(f"--out {out} holds shards prepared with other {', '.join(changed)} (see {out / META}); "
                        "delete it to prepare again, or choose another --out")


def prepare_command(
    inputs: list[Path],
    out: Path,
    tokenizer: str = "bpe",
    vocab_size: int = 4096,
    tokenizer_path: Path | None = None,
    val_fraction: float = 0.05,
    shard_tokens: int = 50_000_000,
    seed: int = 0,
    workers: int = 0,
) -> None:
    """Tokenize a corpus into train/val token shards for pretraining.

    Writes OUT/tokenizer.json, OUT/train_000.bin ..., OUT/val_000.bin ... and OUT/meta.json (OUT is
    normally RUN/data). Each document is followed by <|eos|>. Refuses a non-empty OUT, unless it already
    holds a complete result of the same inputs (paths and sizes) and settings, which is then left as it is.

    Args:
        inputs: corpus files: .txt (documents split on blank lines), .jsonl ({"text": ...}), .parquet ("text").
        out: the folder to create.
        tokenizer: "bpe" trains a byte-level BPE on the inputs, "char" one token per character.
        vocab_size: vocabulary size of the BPE tokenizer, special tokens included.
        tokenizer_path: a tokenizer.json (or its folder) to use instead of training; copied to OUT.
        val_fraction: fraction of documents for the validation split (chosen by a seeded hash).
        shard_tokens: the most tokens in one shard file.
        seed: seed of the train/val split.
        workers: tokenizer threads, 0 for all cores (effective before the library's first parallel call).
    """
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    _check_args(inputs, tokenizer, val_fraction, shard_tokens)
    request = _request(inputs, tokenizer, vocab_size, tokenizer_path, val_fraction, shard_tokens, seed)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if (out / META).is_file():
            _check_same_request(out, request)
            print(f"{out} already holds prepared shards ({META} present): nothing to do; delete it to redo")
            return
        raise UserError(f"--out {out} exists, is not empty and holds no {META}: refusing to write into it")
    if workers > 0:
        os.environ["RAYON_NUM_THREADS"] = str(workers)  # read when the library first starts its threads
        os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        # 1. the tokenizer: loaded, or trained on a first streamed pass over the corpus
        if tokenizer_path is not None:
            tok = Tokenizer.load(tokenizer_path)
        else:
            with _progress() as progress:
                total = sum(p.stat().st_size for p in inputs)
                task = progress.add_task(f"training {tokenizer} tokenizer", total=total)
                texts = _texts(inputs, lambda n: progress.advance(task, n))
                if tokenizer == "bpe":
                    tok = Tokenizer.train_bpe(texts, vocab_size=vocab_size)
                else:
                    tok = Tokenizer.train_char(texts)
        tok.save(tmp / "tokenizer.json")

        # 2. the shards: a second streamed pass, encoded a chunk of documents at a time
        meta = _write_shards(tmp, inputs, tok, val_fraction, seed, shard_tokens) | {"request": request}
        if meta["tokens"]["train"] == 0:
            raise UserError(f"no documents with text in {[str(p) for p in inputs]}")
        if meta["tokens"]["val"] == 0 and val_fraction > 0:
            print(f"warning: no document fell into the validation split (val_fraction={val_fraction})")
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

        # 3. publish: the complete folder appears at once
        if out.is_dir():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t, v = meta["tokens"]["train"], meta["tokens"]["val"]
    print(f"wrote {out}: {t:,} train, {v:,} val tokens; vocab {tok.vocab_size} ({tok.kind}), {meta['dtype']}")


# -- reading shards -----------------------------------------------------------------------------


def load_shards(data_dir: str | Path) -> tuple[dict, list[np.memmap], list[np.memmap]]:
    """Open the shards written by prepare_command as read-only memmaps: (meta, train, val)."""
    data_dir = Path(data_dir)
    meta_file = data_dir / META
    if not meta_file.is_file():
        raise UserError(f"no {META} in {data_dir}: run `instructgpt prepare --out {data_dir}` first")
    try:
        meta = json.loads(meta_file.read_text())
        dtype = np.dtype(meta["dtype"])
        shards, tokens = meta["shards"], meta["tokens"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{meta_file} is not a valid shard index ({e!r})") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise UserError(f"{meta_file}: dtype {dtype} is not uint16 or uint32")
    if dtype != token_dtype(meta.get("vocab_size", 0)):
        raise UserError(
            f"{meta_file}: dtype {dtype} does not match vocab_size {meta.get('vocab_size')} "
            f"(expected {token_dtype(meta.get('vocab_size', 0))})"
        )
    if not shards.get("train"):
        raise UserError(f"no train shards listed in {meta_file}")
    out: dict[str, list[np.memmap]] = {}
    for split in SPLITS:
        maps = []
        for name in shards.get(split, []):
            file = data_dir / name
            if not file.is_file():
                raise UserError(f"shard {file} listed in {meta_file} is missing")
            size = file.stat().st_size
            if size % dtype.itemsize:
                raise UserError(f"{file}: {size} bytes is not a whole number of {dtype} tokens")
            maps.append(np.memmap(file, dtype=dtype, mode="r"))
        found = sum(len(m) for m in maps)
        if found != tokens.get(split, 0):
            raise UserError(
                f"{data_dir}: {split} shards hold {found} {dtype} tokens but {META} says "
                f"{tokens.get(split, 0)}: dtype mismatch or truncated files"
            )
        out[split] = maps
    return meta, out["train"], out["val"]


def read_meta(data: Path) -> dict:
    """meta.json of a prepared data folder, with the vocabulary checked against the shard dtype."""
    if not data.is_dir():
        raise UserError(f"--data {data}: no such folder (run `instructgpt prepare --out {data}` first)")
    meta_file = data / "meta.json"
    if not meta_file.is_file():
        raise UserError(f"--data {data} holds no meta.json and no token shards: "
                        f"run `instructgpt prepare --out {data}` first")
    try:
        meta = json.loads(meta_file.read_text())
        dtype, vocab_size = np.dtype(meta["dtype"]), int(meta["vocab_size"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{meta_file} is not a valid shard index ({e!r})") from None
    if dtype.kind != "u":
        raise UserError(f"{meta_file}: shard dtype {dtype} is not an unsigned integer type")
    if vocab_size < 1 or vocab_size - 1 > np.iinfo(dtype).max:
        raise UserError(f"{meta_file}: vocab_size {vocab_size} does not fit the shard dtype {dtype} "
                        f"(ids up to {np.iinfo(dtype).max}): the shards cannot hold this vocabulary")
    return meta
