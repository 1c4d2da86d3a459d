"""Readers of users' instruction, preference and prompt files (src/instructgpt/data.py)."""

import itertools
import json
import math
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructgpt.data import (
    Comparison,
    Example,
    Prompt,
    gsm8k_final_answer,
    iter_records,
    read_comparisons,
    read_examples,
    read_prompts,
    write_jsonl,
)
from instructgpt.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def real(name: str) -> Path:
    path = DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} is absent (CI puts shared/ beside the repository clone)")
    return path


def jsonl(tmp_path: Path, *records, name: str = "data.jsonl") -> Path:
    """Write records (dicts, or raw strings written as they are) one per line."""
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def hh(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


U = {"role": "user", "content": "Hi"}
A = {"role": "assistant", "content": "Hello!"}


# ------------------------------------------------------------------------------------------ real data


def test_hh_rlhf_every_record_parses_or_is_reported():
    path = real("hh_rlhf_harmless_1600.jsonl")
    with pytest.warns(UserWarning, match="skipped 5 invalid"):
        comparisons = read_comparisons(path, skip_invalid=True)
    assert (len(comparisons), comparisons.report.skipped, comparisons.report.kept) == (1595, 5, 1595)
    # 4 records whose chosen reply is empty, 1 whose transcripts do not share their first turns
    lines = [int(re.search(r":(\d+): ", e).group(1)) for e in comparisons.report.errors]
    assert lines == [87, 517, 926, 1104, 1255]
    assert all('field "chosen": empty reply' in e for e in comparisons.report.errors[:4])
    assert "share every turn but the last" in comparisons.report.errors[4]
    for c in comparisons:
        assert c.prompt[-1]["role"] == "user" and c.prompt[0]["role"] == "user"
        assert len(c.completions) == 2 and c.ranking == [0, 1] and c.meta == {}
        assert all(m["content"] == m["content"].strip() for m in c.prompt)
        assert not any("\n\nHuman:" in x or "\n\nAssistant:" in x for x in c.completions)
    first = comparisons[0]
    assert first.prompt[0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert first.prompt[-1]["content"] == "okay some of these do not have anything to do with pens"
    assert first.completions[0].startswith("No, sorry!")

    with pytest.raises(UserError, match=r"hh_rlhf_harmless_1600\.jsonl:87: field \"chosen\": empty reply"):
        read_comparisons(path)
    with pytest.warns(UserWarning, match="skipped 1 invalid"):
        prompts = read_prompts(path, skip_invalid=True)  # an empty chosen reply does not spoil the prompt
    assert len(prompts) == 1599 and prompts[0].messages == first.prompt


def test_gsm8k_every_record():
    examples = read_examples(real("gsm8k_train.jsonl"))
    assert len(examples) == 7473 and examples.report.skipped == 0
    first = examples[0]
    assert first.messages[0]["content"].startswith("Natalia sold clips to 48")
    assert first.messages[1]["content"].endswith("#### 72")  # the answer as given
    finals = [gsm8k_final_answer(e.messages[-1]["content"]) for e in examples]
    assert finals[0] == "72"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", f) for f in finals), [f for f in finals if "," in f][:3]
    prompts = read_prompts(real("gsm8k_train.jsonl"))
    assert len(prompts) == 7473 and prompts[0].meta["answer"].endswith("#### 72")


def test_t0_every_record_loses_its_end_marker():
    examples = read_examples(real("t0_ag_news_classify.jsonl"))
    assert len(examples) == 200
    replies = {e.messages[-1]["content"] for e in examples}
    assert replies <= {"World", "Sports", "Business", "Science and technology", "Sci/Tech"}, replies
    assert all("<|endoftext|>" not in e.messages[-1]["content"] for e in examples)
    assert len(read_prompts(real("t0_ag_news_classify.jsonl"))) == 200


# -------------------------------------------------------------------------------------------- formats


def test_sft_formats(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": "2+2?", "completion": "4", "id": 7},
        {"prompt": "Topic?", "completion": "Sports<|endoftext|>"},
        {"prompt": [{"role": "system", "content": "Be brief."}, U], "completion": "Hello!"},
        {"messages": [{"role": "system", "content": "S"}, U, A], "family": "chat"},
        {"instruction": "Reverse it.", "input": "abc", "output": "cba"},
        {"instruction": "Say hi.", "input": "  ", "output": "hi"},
        {"instruction": "Say hi.", "output": "hi"},
        {"question": "1+1?", "answer": "1+1=2\n#### 2"},
    )
    e = read_examples(path)
    assert e[0] == Example([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], {"id": 7})
    assert e[1].messages[-1]["content"] == "Sports"
    assert [m["role"] for m in e[2].messages] == ["system", "user", "assistant"]
    assert e[3].messages[-1] == A and e[3].meta == {"family": "chat"}
    assert e[4].messages[0]["content"] == "Reverse it.\n\nabc"
    assert e[5].messages[0]["content"] == e[6].messages[0]["content"] == "Say hi."
    assert e[7].messages == [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "1+1=2\n#### 2"},
    ]
    assert e.report.skipped == 0


def test_comparison_formats(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": "Q", "chosen": "good", "rejected": "bad", "source": "x"},
        {"prompt": [U], "chosen": "good", "rejected": "bad"},
        {"chosen": hh("Hi", "Hello", "Joke?", "A pun."), "rejected": hh("Hi", "Hello", "Joke?", "No.")},
        {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
    )
    c = read_comparisons(path)
    assert c[0] == Comparison([{"role": "user", "content": "Q"}], ["good", "bad"], [0, 1], {"source": "x"})
    assert c[1].prompt == [U]
    assert c[2].prompt == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Joke?"},
    ]
    assert c[2].completions == ["A pun.", "No."]
    assert c[3].ranking == [2, 0, 1] and c[3].pairs() == [(2, 0), (2, 1), (0, 1)]


def test_prompt_formats(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": "Q1", "id": 1},
        {"messages": [U]},
        {"messages": [U, A, U]},
        {"messages": [U, A]},  # a demonstration: the reply is dropped
        {"prompt": "Q2", "completion": "A2"},
        {"instruction": "Do.", "input": "this", "output": "done"},
        {"question": "1+1?", "answer": "#### 2"},
        {"chosen": hh("Hi", "Hello"), "rejected": hh("Hi", "Go away")},
        {"prompt": "Q3", "completions": ["a", "b"], "ranking": [1, 0]},
    )
    p = read_prompts(path)
    assert p[0] == Prompt([{"role": "user", "content": "Q1"}], {"id": 1})
    assert p[1].messages == [U] and p[2].messages == [U, A, U] and p[3].messages == [U]
    assert p[4].meta == {"completion": "A2"}  # kept as a reference answer
    assert p[5].messages[0]["content"] == "Do.\n\nthis" and p[5].meta == {"output": "done"}
    assert p[6].meta == {"answer": "#### 2"}
    assert p[7].messages == [{"role": "user", "content": "Hi"}] and p[7].meta == {}
    assert p[8].meta == {"completions": ["a", "b"], "ranking": [1, 0]}


def test_json_layouts_report_the_line_of_each_record(tmp_path):
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": 3}]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records, indent=2))
    assert [n for n, _ in iter_records(listed)] == [2, 6]
    with pytest.raises(UserError, match=r'list\.json:6: field "completion": expected a string, got int'):
        read_examples(listed)

    held = tmp_path / "held.json"
    held.write_text(json.dumps({"version": 2, "data": records}, indent=2))
    with pytest.raises(UserError, match=r'held\.json:8: field "completion"'):
        read_examples(held)
    held.write_text(json.dumps({"version": 2, "data": records[:1]}))
    assert read_examples(held)[0].messages[-1]["content"] == "b"

    single = tmp_path / "one.json"
    single.write_text(json.dumps({"messages": [U, A]}))
    assert read_examples(single)[0].messages == [U, A]

    lines = jsonl(tmp_path, *records[:1], records[:1][0], name="hf.json")  # JSON lines named .json
    assert len(read_examples(lines)) == 2

    two = tmp_path / "two.json"
    two.write_text(json.dumps({"train": records, "test": records}))
    with pytest.raises(UserError, match=r'two\.json: .*exactly one list.*"train", "test"'):
        read_examples(two)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [
        {"messages": [U, A], "prompt": None, "completion": None},
        {"messages": None, "prompt": "Q", "completion": "A"},
        {"messages": None, "prompt": "Q", "completion": " "},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(UserError, match=r'd\.parquet: row 3: field "completion": empty reply'):
        read_examples(path)
    with pytest.warns(UserWarning):
        e = read_examples(path, skip_invalid=True)
    assert [x.messages for x in e] == [
        [U, A],
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
    ]
    assert e[0].meta == {} and e.report.skipped == 1


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes the import fail
    with pytest.raises(UserError, match=r"d\.parquet: reading parquet needs pyarrow"):
        read_prompts(path)


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("So 1,000 + 234 = 1,234\n#### 1,234 ") == "1234"
    assert gsm8k_final_answer("#### -5") == "-5"
    with pytest.raises(UserError, match="####"):
        gsm8k_final_answer("no final answer")


# ------------------------------------------------------------------------------------------ bad input

BAD = [
    # (reader, line written, message expected after "data.jsonl:2: ")
    (read_examples, "{not json", r"not valid JSON"),
    (read_examples, '["a list"]', r"expected a JSON object, got list"),
    (
        read_examples,
        {"foo": 1},
        r'the record \(keys: "foo"\) is not a known demonstration format; expected one of: \{"prompt", "completion"\}',
    ),
    (
        read_comparisons,
        {"foo": 1},
        r'the record \(keys: "foo"\) is not a known comparison format; expected one of: .*HH',
    ),
    (
        read_prompts,
        {"foo": 1},
        r'the record \(keys: "foo"\) is not a known prompt format; expected one of: \{"prompt"\}',
    ),
    (read_examples, {"prompt": "Q"}, r'field "completion": missing'),
    (read_examples, {"instruction": "Q"}, r'field "output": missing'),
    (read_comparisons, {"prompt": "Q", "chosen": "a"}, r'field "rejected": missing'),
    (read_examples, {"prompt": "Q", "completion": 3}, r'field "completion": expected a string, got int'),
    (read_examples, {"question": "Q", "answer": None}, r'field "answer": expected a string, got null'),
    (read_examples, {"messages": "hi"}, r'field "messages": expected a list of messages, got string'),
    (
        read_examples,
        {"instruction": "Q", "input": 1, "output": "o"},
        r'field "input": expected a string, got int',
    ),
    (
        read_comparisons,
        {"prompt": 5, "chosen": "a", "rejected": "b"},
        r'field "prompt": expected a string or',
    ),
    (read_examples, {"prompt": "Q", "completion": "  \n"}, r'field "completion": empty reply'),
    (read_examples, {"prompt": "Q", "completion": "<|endoftext|>"}, r'field "completion": empty reply'),
    (
        read_examples,
        {"messages": [U, {"role": "assistant", "content": ""}]},
        r'field "messages\[1\]\.content": empty',
    ),
    (read_comparisons, {"prompt": "Q", "chosen": "", "rejected": "b"}, r'field "chosen": empty reply'),
    (read_comparisons, {"prompt": "Q", "chosen": "a", "rejected": " "}, r'field "rejected": empty reply'),
    (read_comparisons, {"chosen": hh("Q", "a"), "rejected": hh("Q", "")}, r'field "rejected": empty reply'),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a", " "], "ranking": [0, 1]},
        r'field "completions\[1\]": empty',
    ),
    (
        read_examples,
        {"messages": [{"role": "bot", "content": "x"}, A]},
        r'field "messages\[0\]\.role": unknown role "bot"; expected one of "system", "user", "assistant"',
    ),
    (read_examples, {"messages": [U, {"role": "assistant"}]}, r'field "messages\[1\]\.content": missing'),
    (
        read_examples,
        {"messages": [U]},
        r'field "messages": expected the last message to be from the assistant',
    ),
    (read_examples, {"messages": []}, r'field "messages": expected at least one message'),
    (read_prompts, {"messages": [A]}, r'field "messages": a prompt must end with a user message'),
    (
        read_comparisons,
        {"prompt": [U, A], "chosen": "a", "rejected": "b"},
        r'field "prompt": expected the last',
    ),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a", "b"], "ranking": [0, 0]},
        r'field "ranking": expected a permutation of range\(2\)',
    ),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a", "b"], "ranking": [1]},
        r'field "ranking": expected a permutation of range\(2\)',
    ),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a", "b", "c"], "ranking": [0, 1, 3]},
        r'field "ranking": expected a permutation of range\(3\)',
    ),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a", "b"], "ranking": [True, 0]},
        r'field "ranking": expected a',
    ),
    (
        read_comparisons,
        {"prompt": "Q", "completions": ["a"], "ranking": [0]},
        r'field "completions": expected at least 2 completions to rank, got 1',
    ),
    (read_comparisons, {"prompt": "Q", "completions": ["a", "b"]}, r'field "ranking": missing'),
    (
        read_comparisons,
        {"chosen": hh("Q", "a"), "rejected": hh("P", "b")},
        r'fields "chosen" and "rejected": .*share every turn.*turn 1 differs',
    ),
    (
        read_comparisons,
        {"chosen": hh("Q", "a", "R"), "rejected": hh("Q", "b")},
        r'field "chosen": the transcript must',
    ),
    (read_comparisons, {"chosen": "no turns", "rejected": hh("Q", "b")}, r'field "chosen": expected a transcript'),
]


@pytest.mark.parametrize("reader,line,expected", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_record_names_file_line_and_field(tmp_path, reader, line, expected):
    good = {"prompt": "Q", "completion": "A", "chosen": "a", "rejected": "b"}
    if reader is read_comparisons:
        good = {"prompt": "Q", "chosen": "a", "rejected": "b"}
    elif reader is read_examples:
        good = {"prompt": "Q", "completion": "A"}
    path = jsonl(tmp_path, good, line, good)
    with pytest.raises(UserError, match=r"data\.jsonl:2: " + expected):
        reader(path)
    # skipped and counted with skip_invalid
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record\(s\) of 3"):
        records = reader(path, skip_invalid=True)
    assert len(records) == 2 and records.report.skipped == 1
    assert re.search(r"data\.jsonl:2: " + expected, records.report.errors[0])
    # nothing left after skipping is still an error
    only_bad = jsonl(tmp_path, line, line, name="bad.jsonl")
    with pytest.raises(UserError, match=r"bad\.jsonl: no valid records \(2 invalid; the first: .*bad\.jsonl:1: "):
        reader(only_bad, skip_invalid=True)


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


def test_invalid_utf8_names_the_line(tmp_path):
    good = json.dumps({"prompt": "Q", "completion": "A"}).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "\xff\xfe", "completion": "A"}\n')
    with pytest.raises(UserError, match=r"data\.jsonl:3: not valid UTF-8"):
        read_examples(path)
    with pytest.warns(UserWarning):
        assert len(read_examples(path, skip_invalid=True)) == 2
    as_json = tmp_path / "data.json"
    as_json.write_bytes(b'[\n{"prompt": "Q", "completion": "A"},\n{"prompt": "\xff", "completion": "A"}\n]')
    with pytest.raises(UserError, match=r"data\.json:3: not valid UTF-8"):
        read_examples(as_json, skip_invalid=True)  # a whole-file error: nothing can be skipped


@pytest.mark.parametrize("content", ["", "\n  \n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / ("e.json" if content == "[]" else "e.jsonl")
    path.write_text(content)
    for reader in (read_examples, read_comparisons, read_prompts):
        with pytest.raises(UserError, match=r"e\.jsonl?: (the file is empty|no records)"):
            reader(path, skip_invalid=True)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(UserError, match=r"nope\.jsonl: no such file"):
        read_examples(tmp_path / "nope.jsonl")
    with pytest.raises(UserError, match="is a folder"):
        read_prompts(tmp_path)


def test_invalid_json_document_is_not_skippable(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n{"prompt": "Q", "completion": "A"},\n{"prompt": \n]')
    with pytest.raises(UserError, match=r"d\.json:4: not valid JSON"):
        read_examples(path, skip_invalid=True)


def test_iter_records_numbers_lines_and_skips_blank_ones(tmp_path):
    path = jsonl(tmp_path, {"a": 1}, "", {"b": 2}, "not json")
    it = iter_records(path)
    assert next(it) == (1, {"a": 1}) and next(it) == (3, {"b": 2})
    with pytest.raises(UserError, match=r"data\.jsonl:4: not valid JSON"):
        next(it)


# ----------------------------------------------------------------------------------------- write_jsonl


def test_write_jsonl_round_trip_and_atomic(tmp_path):
    path = tmp_path / "sub" / "out.jsonl"
    write_jsonl(path, [{"prompt": "é", "completion": "ü"}])
    assert path.read_text(encoding="utf-8") == '{"prompt": "é", "completion": "ü"}\n'

    def crashing():
        yield {"prompt": "new", "completion": "x"}
        raise RuntimeError("crash while writing")

    with pytest.raises(RuntimeError):
        write_jsonl(path, crashing())
    assert read_examples(path)[0].messages[0]["content"] == "é"  # the old file survives whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]  # no temporary file left
    with pytest.raises(ValueError):
        write_jsonl(path, [{"reward": math.nan}])  # NaN is not JSON
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.jsonl"]


# ------------------------------------------------------------------------------------------ properties

text = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20).filter(str.strip)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 9).flatmap(lambda k: st.permutations(list(range(k)))))
def test_pairs_are_all_pairs_consistent_with_the_ranking(ranking):
    k = len(ranking)
    c = Comparison([U], [str(i) for i in range(k)], ranking)
    pairs = c.pairs()
    assert len(pairs) == math.comb(k, 2) == len(set(pairs))
    position = {index: rank for rank, index in enumerate(ranking)}
    assert all(position[w] < position[lo] for w, lo in pairs)
    assert {frozenset(p) for p in pairs} == {frozenset(p) for p in itertools.combinations(range(k), 2)}


@settings(max_examples=25, deadline=None)
@given(
    prompt=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), text), max_size=3),
    last=text,
    completions=st.lists(text, min_size=2, max_size=5),
    data=st.data(),
)
def test_records_written_read_back_equal(tmp_path_factory, prompt, last, completions, data):
    messages = [{"role": r, "content": c} for r, c in prompt] + [{"role": "user", "content": last}]
    ranking = data.draw(st.permutations(list(range(len(completions)))))
    comparison = Comparison(messages, completions, ranking, {"id": data.draw(st.integers())})
    example = Example([*messages, {"role": "assistant", "content": completions[0]}], {"family": "f"})
    folder = tmp_path_factory.mktemp("rt")
    write_jsonl(folder / "c.jsonl", [comparison.as_record()])
    write_jsonl(folder / "e.jsonl", [example.as_record()])
    write_jsonl(folder / "p.jsonl", [Prompt(messages).as_record()])
    assert read_comparisons(folder / "c.jsonl") == [comparison]
    assert read_examples(folder / "e.jsonl") == [example]
    assert read_prompts(folder / "p.jsonl") == [Prompt(messages)]
    assert read_prompts(folder / "e.jsonl")[0].messages == messages
