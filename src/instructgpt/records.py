"""Records from a user's file, whatever its container: JSON Lines, a JSON array or an object holding one, or
parquet; each with its location (file:line, or file: row N) for error messages. A malformed record is yielded
as its error, so the caller decides whether to stop or skip it; an error that concerns the whole file is
raised. `data` turns the records into examples, comparisons and prompts.

JSON is read more strictly than Python's `json` module does by default: a duplicate key (where `json` keeps
the last value silently), NaN and Infinity (not JSON) and a string with a lone UTF-16 surrogate (valid JSON,
but not text any tokenizer can take) are errors that name the file, the line and the field. `parse_json` and
`read_json_file` give every other reader of JSON (prepare's corpora, the run's own markers) the same rules.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .errors import UserError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ------------------------------------------------------------------------------------------ strict JSON


class _Refused(ValueError):
    """JSON that Python's `json` accepts and this reader does not: a duplicate key, NaN or Infinity."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Refused(f"duplicate key {json.dumps(key)[:60]} in an object")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


_STRICT = json.JSONDecoder(object_pairs_hook=_unique_keys, parse_constant=_no_constant)
_PLAIN = json.JSONDecoder()
# A lone surrogate can only come from a \uD800-\uDFFF escape (UTF-8 cannot encode one), so only text that
# has such an escape needs its strings checked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(text: str, name: str, line: int | None = None) -> Any:
    """One JSON value (a line of a JSONL file, or a whole small file), read strictly (see the module
    docstring); a `UserError` at "name:line" otherwise (for a whole file, the line of the mistake when known)."""
    at = name if line is None else f"{name}:{line}"
    try:
        value = _STRICT.decode(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{name}:{e.lineno if line is None else line}: not valid JSON: {e.msg} "
                        f"(column {e.colno})") from None
    except _Refused as e:
        raise UserError(f"{at}: not valid JSON: {e}") from None
    except RecursionError:
        raise UserError(f"{at}: not valid JSON: nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and (bad := lone_surrogate(value)) is not None:
        raise _unicode_error(at, bad)
    return value


def read_json_file(path: str | Path) -> Any:
    """The value of a whole JSON file (a stage's marker, the pipeline's manifest, results): a torn or edited
    file is a `UserError` that names it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    return parse_json(text, str(path))


def file_digest(path: str | Path) -> str:
    """A fingerprint of a file's bytes (BLAKE2b, 128 bits, hex), read in blocks: what a cache or a marker keys
    on to notice that a model or a data file changed."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def lone_surrogate(value: Any) -> str | None:
    """The field path ("messages[1].content") of the first string or key in a JSON value that holds a lone
    surrogate, "" for the value itself, or None when every string is valid Unicode. Iterative: a value nested
    as deep as `json` allows must not hit the recursion limit here."""
    stack: list[tuple[str, Any]] = [("", value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if not _valid_unicode(v):
                return path
        elif isinstance(v, list):
            stack.extend((f"{path}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, dict):
            for key in v:
                if not _valid_unicode(key):
                    return f"{path}.{ascii(key)[1:-1]}" if path else ascii(key)[1:-1]
            stack.extend((f"{path}.{k}" if path else k, x) for k, x in reversed(list(v.items())))
    return None


def _valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode_error(loc: str, path: str) -> UserError:
    field = f' field "{path}":' if path else ""
    return UserError(f"{loc}:{field} not valid Unicode (a lone surrogate such as \\ud800, which no text can "
                     "hold)")


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
    if suffix in JSONL_SUFFIXES:  # line by line: a large file is never held in memory whole
        with open(p, "rb") as f:
            yield from _jsonl_records(f, name)
        return
    data = p.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    if not data.strip():
        raise UserError(f"{name}: the file is empty")
    if suffix != ".json" and not data.lstrip().startswith(b"["):
        yield from _jsonl_records(data.split(b"\n"), name)
        return
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{name}:{line}: not valid UTF-8 (byte {e.start + 1} of the file)") from None
    yield from _json_records(text, data, name)


def _jsonl_records(lines: Iterable[bytes], name: str) -> Iterator[RawRecord]:
    count = 0
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
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
            record = parse_json(line, name, number)
        except UserError as e:
            yield number, loc, e
            continue
        if not isinstance(record, dict):
            yield number, loc, UserError(f"{loc}: expected a JSON object, got {type_name(record)}")
            continue
        yield number, loc, record
    if count == 0:
        raise UserError(f"{name}: the file is empty")


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
        doc = _STRICT.decode(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines in a .json file
            yield from _jsonl_records(data.split(b"\n"), name)
            return
        raise UserError(f"{name}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise UserError(f"{name}:{_deepest_line(text)}: not valid JSON: nested too deeply") from None
    except _Refused as e:  # like a document that does not parse: not skippable, at the record that has it
        raise UserError(f"{name}:{_refused_line(text)}: not valid JSON: {e}") from None
    if isinstance(doc, dict) and not any(k in doc for k in _RECORD_KEYS):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            found = ", ".join(json.dumps(k) for k in lists) or "none"
            raise UserError(
                f"{name}: expected a list of records, or an object holding exactly one list of records; "
                f"this object holds these lists: {found}"
            )
    elif not isinstance(doc, (dict, list)):
        raise UserError(f"{name}:1: expected a JSON list of records or an object, got {type_name(doc)}")
    check_unicode = _SURROGATE_ESCAPE.search(text) is not None
    count, number, counted = 0, 1, 0
    for pos, record in _records_of(text, doc):
        count += 1
        number += text.count("\n", counted, pos)  # from the previous record on: linear in the file
        counted = pos
        loc = f"{name}:{number}"
        if not isinstance(record, dict):
            yield number, loc, UserError(f"{loc}: expected a JSON object, got {type_name(record)}")
        elif check_unicode and (bad := lone_surrogate(record)) is not None:
            yield number, loc, _unicode_error(loc, bad)
        else:
            yield number, loc, record
    if count == 0:
        raise UserError(f"{name}: no records (an empty list)")


def _records_of(text: str, doc: Any) -> Iterator[tuple[int, Any]]:
    """(start offset, value) of each record of a parsed JSON document: the elements of a list, of the one list
    an object holds, or the object itself when it is one record."""
    start = _WS.match(text, 0).end()
    if isinstance(doc, list):
        return _scan_array(text, start)
    lists = [k for k, v in doc.items() if isinstance(v, list)] if isinstance(doc, dict) else []
    if isinstance(doc, dict) and not any(k in doc for k in _RECORD_KEYS) and len(lists) == 1:
        return _scan_array(text, _find_member(text, lists[0]))
    return iter([(start, doc)])


def _refused_line(text: str) -> int:
    """The line of the first record that strict reading refuses (the document's first line when it is the
    container itself, e.g. a duplicate key beside the list of records)."""
    for pos, _ in _records_of(text, _PLAIN.decode(text)):
        try:
            _STRICT.raw_decode(text, pos)
        except _Refused:
            return text.count("\n", 0, pos) + 1
    return text.count("\n", 0, _WS.match(text, 0).end()) + 1


def _deepest_line(text: str) -> int:
    """The line on which a JSON text is first nested deepest: where `json` gave up with a RecursionError."""
    depth = deepest = 0
    line = 1
    for m in re.finditer(r'"(?:[^"\\\n]|\\.)*"|[\[{]|[\]}]|\n', text):
        token = m.group()
        if token == "\n":
            line += 1
        elif token in "[{":
            depth += 1
            if depth > deepest:
                deepest, where = depth, line
        elif token in "]}":
            depth -= 1
    return where if deepest else 1


def _scan_array(text: str, pos: int) -> Iterator[tuple[int, Any]]:
    """Yield (start offset, value) of each element of the JSON array that starts at text[pos] ("[")."""
    pos = _WS.match(text, pos + 1).end()
    if text[pos] == "]":
        return
    while True:
        value, end = _PLAIN.raw_decode(text, pos)
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
        name, pos = _PLAIN.raw_decode(text, pos)
        pos = _WS.match(text, pos).end() + 1  # after ":"
        pos = _WS.match(text, pos).end()
        if name == key:
            return pos
        _, pos = _PLAIN.raw_decode(text, pos)
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
