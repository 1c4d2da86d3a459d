"""Every reader of a user's file, fed malformed files: deeply nested JSON, lone surrogates, byte-order marks,
NaN and Infinity, duplicate keys, truncated lines, wrong types. Each mistake is a `UserError` whose message
starts with the file and the line of the record that holds it (and can be printed: no surrogate leaks into
it); never a RecursionError, TypeError or UnicodeEncodeError. A byte-order mark at the start of a file is not a
mistake: the file reads as it would without one.

Readers: `data.read_examples`, `read_comparisons`, `read_prompts` (JSONL and JSON files), prepare's
`read_documents` (.jsonl and .txt), and `records.read_json_file` (the run's own markers: the file is named)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructgpt.data import read_comparisons, read_examples, read_prompts
from instructgpt.errors import UserError
from instructgpt.prepare import read_documents
from instructgpt.records import parse_json, read_json_file

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# A good record of each reader, and the fields it reads (a wrong type in any of them is an error).
GOOD = {
    "examples": ({"prompt": "What is 2 + 2?", "completion": "4."}, ("prompt", "completion")),
    "comparisons": ({"prompt": "Say hi.", "chosen": "Hi.", "rejected": "No."}, ("prompt", "chosen", "rejected")),
    "prompts": ({"prompt": "Name a colour."}, ("prompt",)),
    "documents": ({"text": "A document of the corpus."}, ("text",)),
}
READERS = {"examples": read_examples, "comparisons": read_comparisons, "prompts": read_prompts,
           "documents": lambda path: list(read_documents(path))}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def corrupt(kind: str, record: dict, fields: tuple[str, ...], data: st.DataObject) -> str:
    """One line holding `record` with one mistake of the given kind."""
    key = data.draw(st.sampled_from(fields))
    text = json.dumps(record)
    if kind == "deep":  # past what Python's json can parse (also under hypothesis, which raises the recursion limit)
        return text[:-1] + f', "extra": {nested(data.draw(st.integers(20_000, 100_000)))}}}'
    if kind == "deep_field":  # parseable, but nested where a string belongs
        return json.dumps({**record, key: "@"}).replace('"@"', nested(data.draw(st.integers(1, 900))))
    if kind == "surrogate":
        code = data.draw(st.integers(0xD800, 0xDFFF))
        at = data.draw(st.integers(0, len(record[key])))
        value = json.dumps(record[key][:at])[:-1] + f"\\u{code:04x}" + json.dumps(record[key][at:])[1:]
        return json.dumps({**record, key: "@"}).replace('"@"', value)
    if kind == "surrogate_key":
        return text[:-1] + f', "k\\u{data.draw(st.integers(0xD800, 0xDFFF)):04X}": 1}}'
    if kind == "nan":
        constant = data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]))
        return text[:-1] + f', "score": {constant}}}'
    if kind == "duplicate":
        return text[:-1] + f", {json.dumps(key)}: {json.dumps(record[key])}}}"
    if kind == "truncated":
        return text[:data.draw(st.integers(1, len(text) - 1))]
    if kind == "wrong_type":
        value = data.draw(st.sampled_from(["7", "3.5", "null", "true", "{}", '{"a": 1}']))
        return json.dumps({**record, key: "@"}).replace('"@"', value)
    if kind == "bom_inside":  # a BOM is a mark at the start of a file; on line 2 it is a stray character
        return "\ufeff" + text
    raise AssertionError(kind)


KINDS = ["deep", "deep_field", "surrogate", "surrogate_key", "nan", "duplicate", "truncated", "wrong_type",
         "bom_inside"]
# In prepare's corpus records only "text" is read: other keys may hold anything valid.
ERRORS_IN_DOCUMENTS = {"deep", "surrogate", "surrogate_key", "nan", "duplicate", "truncated", "wrong_type",
                       "bom_inside", "deep_field"}


def check_error(read, path: Path, line: int) -> str:
    with pytest.raises(UserError) as e:
        read(path)
    message = str(e.value)
    message.encode("utf-8")  # printable: no lone surrogate in the message itself
    assert message.startswith(f"{path}:{line}:"), message[:300]
    return message


@FUZZ
@given(reader=st.sampled_from(sorted(READERS)), kind=st.sampled_from(KINDS), data=st.data())
def test_a_malformed_jsonl_line_is_an_error_at_its_line(tmp_path: Path, reader: str, kind: str,
                                                        data: st.DataObject) -> None:
    record, fields = GOOD[reader]
    n = data.draw(st.integers(2, 6))
    bad = data.draw(st.integers(2, n))  # line 1 stays good (a BOM there would be the file's mark)
    lines = [corrupt(kind, record, fields, data) if i == bad else json.dumps(record) for i in range(1, n + 1)]
    path = tmp_path / f"{reader}-{kind}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = check_error(READERS[reader], path, bad)
    if kind.startswith("surrogate"):
        assert "not valid Unicode" in message
    if kind in ("nan", "duplicate", "deep"):
        assert "not valid JSON" in message


@FUZZ
@given(reader=st.sampled_from(["examples", "comparisons", "prompts"]),
       kind=st.sampled_from([k for k in KINDS if k not in ("truncated", "bom_inside")]),
       holder=st.booleans(), data=st.data())
def test_a_malformed_record_in_a_json_file_is_an_error_at_its_line(tmp_path: Path, reader: str, kind: str,
                                                                   holder: bool, data: st.DataObject) -> None:
    """A JSON list (or an object holding one), one record per line: the error names the record's line."""
    record, fields = GOOD[reader]
    n = data.draw(st.integers(1, 5))
    bad = data.draw(st.integers(0, n - 1))
    items = [corrupt(kind, record, fields, data) if i == bad else json.dumps(record) for i in range(n)]
    head = '{"data": [' if holder else "["
    path = tmp_path / f"{reader}-{kind}.json"
    path.write_text(head + "\n" + ",\n".join(items) + "\n" + ("]}" if holder else "]") + "\n", encoding="utf-8")
    check_error(READERS[reader], path, bad + 2)


@FUZZ
@given(reader=st.sampled_from(["examples", "comparisons", "prompts"]), cut=st.floats(0.05, 0.95))
def test_a_torn_json_file_is_an_error_naming_a_line(tmp_path: Path, reader: str, cut: float) -> None:
    record, _ = GOOD[reader]
    text = "[\n" + ",\n".join(json.dumps(record) for _ in range(4)) + "\n]\n"
    path = tmp_path / f"{reader}.json"
    path.write_text(text[:int(len(text) * cut)], encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(str(path)) + r":\d+: not valid JSON"):
        READERS[reader](path)


@pytest.mark.parametrize("reader,suffix", [(r, s) for r in sorted(READERS) for s in (".jsonl", ".json")
                                           if (r, s) != ("documents", ".json")])  # corpora: .txt, .jsonl, .parquet
def test_a_byte_order_mark_at_the_start_is_not_a_mistake(tmp_path: Path, reader: str, suffix: str) -> None:
    record, _ = GOOD[reader]
    lines = [json.dumps(record), json.dumps(record)]
    text = "\n".join(lines) + "\n" if suffix == ".jsonl" else "[" + ", ".join(lines) + "]\n"
    plain, marked = tmp_path / f"plain{suffix}", tmp_path / f"marked{suffix}"
    plain.write_text(text, encoding="utf-8")
    marked.write_bytes(b"\xef\xbb\xbf" + text.encode())
    got, want = READERS[reader](marked), READERS[reader](plain)
    if reader == "documents":  # where each document came from names the file
        got, want = [t for t, _ in got], [t for t, _ in want]
    assert got == want


def test_a_byte_order_mark_starts_no_document_of_a_txt_corpus(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"\xef\xbb\xbfFirst document.\n\nSecond.\n")
    assert [t for t, _ in read_documents(path)] == ["First document.", "Second."]


def test_wrong_types_and_nesting_in_a_txt_corpus_are_text(tmp_path: Path) -> None:
    """A .txt corpus is text: brackets and "NaN" in it are words, not JSON."""
    path = tmp_path / "corpus.txt"
    path.write_text(nested(5000) + " NaN {\"a\": 1, \"a\": 2}\n", encoding="utf-8")
    assert [t for t, _ in read_documents(path)] == [nested(5000) + ' NaN {"a": 1, "a": 2}']


@FUZZ
@given(kind=st.sampled_from(["deep", "surrogate", "surrogate_key", "nan", "duplicate", "truncated", "wrong_type"]),
       data=st.data())
def test_a_malformed_marker_is_an_error_naming_it(tmp_path: Path, kind: str, data: st.DataObject) -> None:
    """The run's own files (done.json, pipeline.json, results.json) read with read_json_file: a torn or edited
    file is a UserError naming it (and its line, when the JSON does not parse)."""
    record = {"stage": "rm", "val_accuracy": 0.61}
    path = tmp_path / "done.json"
    path.write_text(corrupt(kind, record, ("stage",), data), encoding="utf-8")
    if kind == "wrong_type":  # valid JSON: the caller checks the types it needs
        assert isinstance(read_json_file(path), dict)
        return
    with pytest.raises(UserError) as e:
        read_json_file(path)
    assert str(e.value).startswith(f"{path}:") and str(e.value).encode("utf-8")


def test_parse_json_is_json_loads_on_valid_json() -> None:
    """The strict reader's twin: on JSON without the refused constructs it gives what json.loads gives."""
    for text in ['{"a": [1, 2.5, "x\\u00e9", null, true, {"b": {}}]}', '"\\ud83d\\ude00"', "[]", "-0.0", "1e400"]:
        assert parse_json(text, "t") == json.loads(text)
