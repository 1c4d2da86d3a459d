"""prepare: corpus files -> tokenizer + token shards, streamed, atomic, with clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from instructgpt.errors import UserError
from instructgpt.prepare import is_val, load_shards, prepare_command, token_dtype
from instructgpt.tokenizer import Tokenizer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TXT_DOCS = [f"Paragraph {i} of the story.\nIt has two lines, and 🙂 {i * 7}." for i in range(12)]
JSONL_DOCS = [f"Record number {i}: naïve café <|eos|> {i}" for i in range(12)] + ["multi\nline\n\nrecord"]
PARQUET_DOCS = [f"Row {i} from parquet — Grüße {i * i}" for i in range(9)]


def write_corpus(folder: Path) -> tuple[list[Path], list[str]]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder.mkdir(parents=True, exist_ok=True)
    txt = folder / "a.txt"
    txt.write_text("\n\n".join(TXT_DOCS) + "\n\n\n", encoding="utf-8")  # extra blank lines are separators
    jsonl = folder / "b.jsonl"
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(JSONL_DOCS)]
    jsonl.write_text("\n".join(lines[:5] + [""] + lines[5:]) + "\n", encoding="utf-8")  # a blank line
    parquet = folder / "c.parquet"
    pq.write_table(pa.table({"text": PARQUET_DOCS, "n": list(range(9))}), parquet, row_group_size=2)
    return [txt, jsonl, parquet], TXT_DOCS + JSONL_DOCS + PARQUET_DOCS


def documents(tok: Tokenizer, shards: list[np.memmap]) -> list[str]:
    """Decode shards back into documents: the text between end tokens."""
    ids = np.concatenate(shards).tolist() if shards else []
    assert not ids or ids[-1] == tok.eos_id
    docs, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eos_id:
            docs.append(tok.decode(ids[start:i]))
            start = i + 1
    return docs


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_round_trip(kind: str, tmp_path: Path) -> None:
    inputs, docs = write_corpus(tmp_path / "corpus")
    out = tmp_path / "run" / "data"
    prepare_command(inputs, out, tokenizer=kind, vocab_size=300, val_fraction=0.3, shard_tokens=64, seed=1)

    meta, train, val = load_shards(out)
    tok = Tokenizer.load(out / "tokenizer.json")
    assert tok.kind == kind and meta["tokenizer"] == "tokenizer.json" and meta["tokenizer_kind"] == kind
    assert meta["dtype"] == "uint16" and all(m.dtype == np.uint16 for m in train + val)
    assert meta["vocab_size"] == tok.vocab_size and meta["eos_id"] == tok.eos_id == 2
    expect_val = [d for d in docs if is_val(d, 1, 0.3)]
    expect_train = [d for d in docs if not is_val(d, 1, 0.3)]
    assert expect_val and expect_train
    assert documents(tok, train) == expect_train
    assert documents(tok, val) == expect_val
    assert meta["documents"] == {"train": len(expect_train), "val": len(expect_val)}
    assert meta["tokens"] == {"train": sum(map(len, train)), "val": sum(map(len, val))}
    assert len(train) > 1 and all(len(m) == 64 for m in train[:-1])  # several full shards
    assert meta["shards"]["train"] == [f"train_{i:03d}.bin" for i in range(len(train))]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]  # no temporary folder left
    # "<|eos|>" inside a document is text, never a document boundary
    assert all(int(t) >= 6 or int(t) == tok.eos_id for m in train + val for t in m)


def test_split_is_deterministic(tmp_path: Path) -> None:
    inputs, _ = write_corpus(tmp_path / "corpus")
    runs = []
    for name, seed in (("a", 0), ("b", 0), ("c", 5)):
        prepare_command(inputs, tmp_path / name, tokenizer="char", val_fraction=0.3, seed=seed)
        runs.append({p.name: p.read_bytes() for p in (tmp_path / name).iterdir() if p.suffix == ".bin"})
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]  # another seed, another split


def test_tokenizer_path_is_reused(tmp_path: Path) -> None:
    inputs, docs = write_corpus(tmp_path / "corpus")
    tok = Tokenizer.train_char(docs)
    tok.save(tmp_path / "tok")
    out = tmp_path / "data"
    prepare_command(inputs, out, tokenizer_path=tmp_path / "tok", val_fraction=0.0)
    assert (out / "tokenizer.json").read_text() == (tmp_path / "tok" / "tokenizer.json").read_text()
    meta, train, val = load_shards(out)
    assert documents(tok, train) == docs and val == [] and meta["tokens"]["val"] == 0


def test_unknown_character_names_the_document(tmp_path: Path) -> None:
    inputs, _ = write_corpus(tmp_path / "corpus")
    Tokenizer.train_char(TXT_DOCS).save(tmp_path / "tok")
    with pytest.raises(UserError, match=r"b\.jsonl:1: the char tokenizer has no token"):
        prepare_command(inputs, tmp_path / "data", tokenizer_path=tmp_path / "tok")
    assert not (tmp_path / "data").exists()


def test_dtype_choice(tmp_path: Path) -> None:
    assert token_dtype(300) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32
    # 66,000 distinct characters (no surrogates) make a char vocabulary too large for uint16
    chars = [chr(c) for c in range(0x100, 0x100 + 68_100) if not 0xD800 <= c <= 0xDFFF][:66_000]
    docs = ["".join(chars[i : i + 1000]) for i in range(0, len(chars), 1000)]
    corpus = tmp_path / "wide.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    prepare_command([corpus], tmp_path / "data", tokenizer="char", val_fraction=0.0)
    meta, train, _ = load_shards(tmp_path / "data")
    assert meta["vocab_size"] > 65535 and meta["dtype"] == "uint32" and train[0].dtype == np.uint32
    tok = Tokenizer.load(tmp_path / "data")
    assert documents(tok, train) == docs


def _bad_inputs(tmp_path: Path) -> list[tuple[Path, str]]:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    cases = []

    def add(name: str, content: bytes, match: str) -> None:
        (tmp_path / name).write_bytes(content)
        cases.append((tmp_path / name, match))

    add("bad.txt", b"fine\nalso fine\nbroken \xff here\n", r"bad\.txt:3: invalid UTF-8 at byte offset 22")
    add("bad_utf8.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n', r"bad_utf8\.jsonl:2: invalid UTF-8")
    add("notjson.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"notjson\.jsonl:2: not valid JSON")
    add("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r'notext\.jsonl:2: .*"text" field')
    add("list.jsonl", b'["text"]\n', r'list\.jsonl:1: .*"text" field')
    add("number.jsonl", b'{"text": "a"}\n\n{"text": 7}\n', r'number\.jsonl:3: field "text" must be a string')
    add("surrogate.jsonl", b'{"text": "ok"}\n{"text": "a\\ud800b"}\n',
        r'surrogate\.jsonl:2: field "text": not valid Unicode')
    add("dupkey.jsonl", b'{"text": "a", "text": "b"}\n', r'dupkey\.jsonl:1: not valid JSON: duplicate key "text"')
    add("nan.jsonl", b'{"text": "a", "score": NaN}\n', r"nan\.jsonl:1: not valid JSON: NaN is not a JSON number")
    add("deep.jsonl", b'{"text": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n",
        r"deep\.jsonl:1: not valid JSON: nested too deeply")
    add("notparquet.parquet", b"not a parquet file", r"notparquet\.parquet: not a readable parquet file")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "nocol.parquet")
    cases.append((tmp_path / "nocol.parquet", r'nocol\.parquet: no "text" column'))
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "null.parquet")
    cases.append((tmp_path / "null.parquet", r'null\.parquet: row 1: field "text" is null'))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    cases.append((tmp_path / "ints.parquet", r'ints\.parquet: column "text" must hold strings'))
    add("notes.md", b"# hi\n", r"unsupported file type '\.md'")
    cases.append((tmp_path / "missing.txt", r"input file not found: .*missing\.txt"))
    return cases


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_bad_inputs(kind: str, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    good = tmp_path / "in" / "good.txt"
    good.write_text("a good document\n")
    for path, match in _bad_inputs(tmp_path / "in"):
        with pytest.raises(UserError, match=match):
            prepare_command([good, path], tmp_path / "out", tokenizer=kind, vocab_size=300)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing half-written


def test_bad_arguments(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("text\n")
    with pytest.raises(UserError, match="no input files"):
        prepare_command([], tmp_path / "out")
    with pytest.raises(UserError, match="'bpe' or 'char'"):
        prepare_command([good], tmp_path / "out", tokenizer="word")
    with pytest.raises(UserError, match="val-fraction"):
        prepare_command([good], tmp_path / "out", val_fraction=1.0)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n')
    with pytest.raises(UserError, match="no documents with text"):
        prepare_command([empty], tmp_path / "out", tokenizer="char")


def test_existing_output_folder(tmp_path: Path, capsys) -> None:
    inputs, _ = write_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    out.mkdir()
    (out / "stray.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="not empty and holds no meta.json"):
        prepare_command(inputs, out, tokenizer="char")
    (out / "stray.bin").unlink()
    prepare_command(inputs, out, tokenizer="char")  # an empty folder is fine
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    prepare_command(inputs, out, tokenizer="char")  # a complete result is kept
    assert "already holds prepared shards" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    # ... but only for the same request: other settings or changed inputs are refused, not silently kept
    with pytest.raises(UserError, match=r"prepared with other tokenizer, vocab_size .*delete it"):
        prepare_command(inputs, out, tokenizer="bpe", vocab_size=300)
    with pytest.raises(UserError, match=r"prepared with other seed"):
        prepare_command(inputs, out, tokenizer="char", seed=1)
    inputs[0].write_text(inputs[0].read_text() + "\n\none more document\n")
    with pytest.raises(UserError, match=r"prepared with other inputs"):
        prepare_command(inputs, out, tokenizer="char")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


def test_a_byte_order_mark_is_not_text(tmp_path: Path) -> None:
    """Editors on Windows start UTF-8 files with a BOM (EF BB BF); it must not become a character of the first
    document (with the char tokenizer: a vocabulary entry), and a .jsonl's first line must still parse."""
    txt, jsonl = tmp_path / "bom.txt", tmp_path / "bom.jsonl"
    txt.write_bytes(b"\xef\xbb\xbfabc\n\nbad\n")
    jsonl.write_bytes(b'\xef\xbb\xbf{"text": "cab"}\n{"text": "dab"}\n')
    prepare_command([txt, jsonl], tmp_path / "data", tokenizer="char", val_fraction=0.0)
    meta, train, _ = load_shards(tmp_path / "data")
    tok = Tokenizer.load(tmp_path / "data")
    assert sorted(documents(tok, train)) == ["abc", "bad", "cab", "dab"]
    assert tok.token_to_id("\ufeff") is None and meta["vocab_size"] == 6 + 4  # the specials and a, b, c, d


def test_load_shards_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no meta.json in"):
        load_shards(tmp_path)
    inputs, _ = write_corpus(tmp_path / "corpus")
    out = tmp_path / "data"
    prepare_command(inputs, out, tokenizer="char", val_fraction=0.3)
    meta = json.loads((out / "meta.json").read_text())

    def with_meta(**changes) -> None:
        (out / "meta.json").write_text(json.dumps({**meta, **changes}))

    with_meta(dtype="uint32", vocab_size=70_000)  # as if the files were uint32
    with pytest.raises(UserError, match="dtype mismatch"):
        load_shards(out)
    with_meta(dtype="uint32")
    with pytest.raises(UserError, match="does not match vocab_size"):
        load_shards(out)
    with_meta(dtype="float32")
    with pytest.raises(UserError, match="not uint16 or uint32"):
        load_shards(out)
    with_meta(shards={"train": [], "val": meta["shards"]["val"]})
    with pytest.raises(UserError, match="no train shards"):
        load_shards(out)
    with_meta()
    (out / "val_000.bin").unlink()
    with pytest.raises(UserError, match="val_000.bin listed in .* is missing"):
        load_shards(out)
    (out / "meta.json").write_text("{")
    with pytest.raises(UserError, match="not a valid shard index"):
        load_shards(out)


def test_command_line_flags(tmp_path: Path) -> None:
    tyro = pytest.importorskip("tyro")
    inputs, docs = write_corpus(tmp_path / "corpus")
    args = ["--inputs", *map(str, inputs), "--out", str(tmp_path / "data"), "--tokenizer", "char"]
    tyro.cli(prepare_command, args=[*args, "--val-fraction", "0", "--shard-tokens", "1000", "--workers", "1"])
    meta, train, _ = load_shards(tmp_path / "data")
    assert meta["shard_tokens"] == 1000 and documents(Tokenizer.load(tmp_path / "data"), train) == docs


def test_tinyshakespeare(tmp_path: Path) -> None:
    path = SHARED_DATA / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent (CI puts shared/data beside the clone)")
    prepare_command([path], tmp_path / "data", tokenizer="char", val_fraction=0.1)
    meta, train, val = load_shards(tmp_path / "data")
    tok = Tokenizer.load(tmp_path / "data")
    assert 60 < meta["vocab_size"] < 80  # 65 characters + 6 specials
    text = path.read_text(encoding="utf-8")
    paragraphs = [p.strip("\n") for p in text.split("\n\n") if p.strip()]
    decoded = documents(tok, train) + documents(tok, val)
    assert sorted(decoded) == sorted(paragraphs)
    assert 0.05 < len(documents(tok, val)) / len(decoded) < 0.15


def test_progress_counts_every_byte(tmp_path: Path) -> None:
    from instructgpt.prepare import read_documents

    inputs, docs = write_corpus(tmp_path / "corpus")
    seen: list[int] = []
    texts = [text for path in inputs for text, _ in read_documents(path, seen.append)]
    assert texts == docs
    assert sum(seen) == sum(p.stat().st_size for p in inputs)
