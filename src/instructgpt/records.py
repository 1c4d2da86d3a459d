"""Records from a user's file, whatever its container: JSON Lines (optionally gzipped), a JSON array or an
object holding one, or parquet; each with its location (file:line, or file:record N) for error messages.
A malformed record is yielded as its error, so the caller decides whether to stop or skip it; an error that
concerns the whole file is raised. `data` turns the records into examples, comparisons and prompts.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def type_name(value: Any) -> str:
    """A JSON value's type as a user reads it: string, int, list, object, null, ..."""
    names = {str: "string", bool: "bool", int: "int", float: "float", list: "list", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


RawRecord = tuple[int, str, "dict | UserError"]


def raw_records(path: str | Path) -> Iterator[RawRecord]:
    """Yield (number, location, record or its error); raise errors that concern the whole file.

    The location is what messages start with: "file:line" (JSONL, JSON) or "file: row N" (parquet).
    """
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise UserError(f"{name}: no such file")
    if p.is_dir():
        raise UserError(f"{name}: is a folder; expected a .jsonl, .json or .parquet file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_records(p, name)
        return
    data = p.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if not data.strip():
        raise UserError(f"{name}: the file is empty")
    if suffix in JSONL_SUFFIXES:
        yield from _jsonl_records(data, name)
        return
    if suffix != ".json" and not data.lstrip().startswith(b"["):
        yield from _jsonl_records(data, name)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    yield from _json_records(text, data, name)


def _jsonl_records(data: bytes, name: str) -> Iterator[RawRecord]:
    count = 0
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        count += 1
        loc = f"{name}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield number, loc, UserError(f"{loc}: not valid UTF-8 (byte {e.start + 1} of the line)")
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield number, loc, UserError(f"{loc}: not valid JSON: {e.msg} (column {e.colno})")
            continue
        if not isinstance(record, dict):
            yield number, loc, UserError(f"{loc}: expected a JSON object, got {type_name(record)}")
            continue
        yield number, loc, record
    if count == 0:
        raise UserError(f"{name}: the file is empty")


_DECODER = json.JSONDecoder()


_RECORD_KEYS = (
    "messages",
    "prompt",
    "completion",
    "chosen",
    "rejected",
    "instruction",
    "question",
    "completions",
)


_WS = re.compile(r"[ \t\n\r]*")


def _json_records(text: str, data: bytes, name: str) -> Iterator[RawRecord]:
    """A JSON list of records, one object holding one list of records, or one record.

    The document is scanned value by value (`raw_decode`) so that each record's line is known.
    """
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            yield from _jsonl_records(data, name)
            return
        raise UserError(f"{name}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(doc, list):
        records = _scan_array(text, _WS.match(text, 0).end())
    elif isinstance(doc, dict) and any(k in doc for k in _RECORD_KEYS):  # a single record
        records = iter([(_WS.match(text, 0).end(), doc)])
    elif isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = ", ".join(f'"{k}"' for k in lists) or "none"
            raise UserError(
                f"{name}: expected a list of records, or an object holding exactly one list of records; "
                f"this object holds these lists: {found}"
            )
        records = _scan_array(text, _find_member(text, lists[0]))
    else:
        raise UserError(f"{name}:1: expected a JSON list of records or an object, got {type_name(doc)}")
    count = 0
    for pos, record in records:
        count += 1
        number = text.count("\n", 0, pos) + 1
        loc = f"{name}:{number}"
        if isinstance(record, dict):
            yield number, loc, record
        else:
            yield number, loc, UserError(f"{loc}: expected a JSON object, got {type_name(record)}")
    if count == 0:
        raise UserError(f"{name}: no records (an empty list)")


def _scan_array(text: str, pos: int) -> Iterator[tuple[int, Any]]:
    """Yield (start offset, value) of each element of the JSON array that starts at text[pos] ("[")."""
    pos = _WS.match(text, pos + 1).end()
    if text[pos] == "]":
        return
    while True:
        value, end = _DECODER.raw_decode(text, pos)
        yield pos, value
        pos = _WS.match(text, end).end()
        if text[pos] == "]":
            return
        pos = _WS.match(text, pos + 1).end()  # skip the comma (the document already parsed)


def _find_member(text: str, key: str) -> int:
    """The offset of the value of a top-level member of the JSON object at the start of text."""
    pos = _WS.match(text, 0).end() + 1  # after "{"
    while True:
        pos = _WS.match(text, pos).end()
        name, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end() + 1  # after ":"
        pos = _WS.match(text, pos).end()
        if name == key:
            return pos
        _, pos = _DECODER.raw_decode(text, pos)
        pos = _WS.match(text, pos).end() + 1  # after ","


def _parquet_records(p: Path, name: str) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(
            f"{name}: reading parquet needs pyarrow: pip install 'instructgpt[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        rows = pq.read_table(p).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for a file that is not parquet
        raise UserError(f"{name}: not a readable parquet file: {e}") from None
    if not rows:
        raise UserError(f"{name}: the file is empty (no rows)")
    for number, row in enumerate(rows, start=1):
        # A table has every column in every row: a column a record does not have reads as null.
        yield number, f"{name}: row {number}", {k: v for k, v in row.items() if v is not None}
