"""TRL's dataset formats in the readers of src/instructgpt/data.py: conversational prompt-completion, preference
with an explicit or an implicit prompt, and the unpaired (KTO) records that the readers refuse.

https://huggingface.co/docs/trl/dataset_formats"""

import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instructgpt.data import (
    Comparison,
    Example,
    Prompt,
    read_comparisons,
    read_examples,
    read_prompts,
    write_jsonl,
)
from instructgpt.errors import UserError


def jsonl(tmp_path: Path, *records: dict, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


S, U, A = msg("system", "Be brief."), msg("user", "What colour is the sky?"), msg("assistant", "Blue.")
U2, GOOD, BAD = msg("user", "And at night?"), msg("assistant", "Black."), msg("assistant", "Green.")


def round_trip(tmp_path: Path, items: list, read) -> list:
    """What `read` gives back for the items written with as_record()."""
    path = tmp_path / "round_trip.jsonl"
    write_jsonl(path, [x.as_record() for x in items])
    return list(read(path))


# -------------------------------------------------------------------------------------------- formats


def test_prompt_completion(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": [S, U], "completion": [A], "id": 1},  # conversational
        {"prompt": [U, A, U2], "completion": [GOOD, U2, BAD]},  # a completion of several turns
        {"prompt": "What colour is the sky?", "completion": [A]},
        {"prompt": "What colour is the sky?", "completion": "Blue."},  # standard
        {"messages": [S, U, A]},  # conversational language modelling
    )
    got = read_examples(path)
    assert got == [
        Example([S, U, A], {"id": 1}),
        Example([U, A, U2, GOOD, U2, BAD]),
        Example([U, A]),
        Example([U, A]),
        Example([S, U, A]),
    ]
    assert round_trip(tmp_path, got, read_examples) == got
    assert [p.messages for p in read_prompts(path)] == [[S, U], [U, A, U2], [U], [U], [S, U]]
    assert read_prompts(path)[0].meta == {"completion": [A], "id": 1}  # kept as a reference answer


def test_preference_with_explicit_prompt(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": [S, U], "chosen": [A], "rejected": [BAD], "score": 3},
        {"prompt": "What colour is the sky?", "chosen": [A], "rejected": [BAD]},
        {"prompt": [U], "chosen": "Blue.", "rejected": [BAD]},
        # the prompt repeated before each reply, as HuggingFaceH4/ultrafeedback_binarized writes it
        {"prompt": "What colour is the sky?", "chosen": [U, A], "rejected": [U, BAD]},
        {"prompt": [U, A, U2], "chosen": [U, A, U2, GOOD], "rejected": [BAD]},
    )
    got = read_comparisons(path)
    assert got == [
        Comparison([S, U], ["Blue.", "Green."], [0, 1], {"score": 3}),
        Comparison([U], ["Blue.", "Green."], [0, 1]),
        Comparison([U], ["Blue.", "Green."], [0, 1]),
        Comparison([U], ["Blue.", "Green."], [0, 1]),
        Comparison([U, A, U2], ["Black.", "Green."], [0, 1]),
    ]
    assert round_trip(tmp_path, got, read_comparisons) == got
    assert [p.messages for p in read_prompts(path)] == [c.prompt for c in got]


def test_preference_with_implicit_prompt(tmp_path):
    path = jsonl(
        tmp_path,
        {"chosen": [S, U, A, U2, GOOD], "rejected": [S, U, A, U2, BAD], "source": "x"},
        {"chosen": [U, A], "rejected": [U, BAD]},
    )
    got = read_comparisons(path)
    assert got == [
        Comparison([S, U, A, U2], ["Black.", "Green."], [0, 1], {"source": "x"}),
        Comparison([U], ["Blue.", "Green."], [0, 1]),
    ]
    assert round_trip(tmp_path, got, read_comparisons) == got
    assert read_prompts(path) == [Prompt([S, U, A, U2], {"source": "x"}), Prompt([U])]


def test_prompts_need_no_reply(tmp_path):
    """As with HH transcripts, an empty reply spoils the comparison but not its prompt."""
    empty = msg("assistant", " ")
    path = jsonl(tmp_path, {"chosen": [U, A], "rejected": [U, empty]}, {"prompt": [U], "chosen": [empty],
                                                                      "rejected": [BAD]})
    assert [p.messages for p in read_prompts(path)] == [[U], [U]]
    with pytest.raises(UserError, match=r'data\.jsonl:1: field "rejected\[1\]\.content": empty reply'):
        read_comparisons(path)


def test_unpaired_records_are_refused_but_give_prompts(tmp_path):
    path = jsonl(
        tmp_path,
        {"prompt": [U], "completion": [A], "label": True},
        {"prompt": "What colour is the sky?", "completion": "Green.", "label": False},
    )
    kto = r"data\.jsonl:1: field \"label\": .*TRL's unpaired preference \(KTO\) format"
    with pytest.raises(UserError, match=kto + r'.*"chosen", "rejected".*"completions", "ranking"'):
        read_comparisons(path)
    with pytest.raises(UserError, match=kto + r'.*remove "label"'):
        read_examples(path)
    assert read_prompts(path) == [Prompt([U], {"completion": [A], "label": True}),
                                  Prompt([U], {"completion": "Green.", "label": False})]
    # a label that is not TRL's boolean is a demonstration's metadata (a class, a source), as before
    classified = jsonl(tmp_path, {"prompt": "Topic?", "completion": "Sports", "label": 2}, name="c.jsonl")
    assert read_examples(classified) == [Example([msg("user", "Topic?"), msg("assistant", "Sports")], {"label": 2})]


def test_null_message_keys_are_absent(tmp_path):
    """A parquet table gives every message each key any message has; null (or no tool calls) means absent."""
    path = jsonl(tmp_path, {"messages": [{**U, "name": None, "tool_calls": None}, {**A, "tool_calls": []}]})
    assert read_examples(path) == [Example([U, A])]


def test_parquet_messages_with_keys_of_other_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    rows = [{"prompt": [U], "completion": [A]}, {"prompt": [{**U, "name": "ann"}], "completion": [BAD]}]
    pq.write_table(pa.Table.from_pylist(rows), path)  # row 1's messages get "name": null
    with pytest.warns(UserWarning, match="skipped 1"):
        got = read_examples(path, skip_invalid=True)
    assert got == [Example([U, A])]
    assert re.fullmatch(r'.*d\.parquet: row 2: field "prompt\[0\]\.name": unexpected key.*', got.report.errors[0])


def test_mixed_file(tmp_path):
    """Every format is detected per record: TRL's, HH transcripts and K-way rankings side by side."""
    hh = "\n\nHuman: What colour is the sky?\n\nAssistant: "
    path = jsonl(
        tmp_path,
        {"prompt": [U], "chosen": [A], "rejected": [BAD]},
        {"chosen": [U, A], "rejected": [U, BAD]},
        {"chosen": hh + "Blue.", "rejected": hh + "Green."},
        {"prompt": "What colour is the sky?", "chosen": "Blue.", "rejected": "Green."},
        {"prompt": [U], "completions": ["Green.", "Blue."], "ranking": [1, 0]},
    )
    got = read_comparisons(path)
    assert all(c.prompt == [U] for c in got)
    assert [[c.completions[i] for i in c.ranking] for c in got] == [["Blue.", "Green."]] * 5
    assert round_trip(tmp_path, got, read_comparisons) == got
    assert [p.messages for p in read_prompts(path)] == [[U]] * 5

    demos = jsonl(
        tmp_path,
        {"prompt": [U], "completion": [A]},
        {"prompt": "What colour is the sky?", "completion": "Blue.<|endoftext|>"},
        {"messages": [U, A]},
        {"instruction": "What colour is the sky?", "output": "Blue."},
        {"question": "What colour is the sky?", "answer": "Blue."},
        name="demos.jsonl",
    )
    assert read_examples(demos) == [Example([U, A])] * 5


# -------------------------------------------------------------------------------- the same comparison


conversation = st.lists(st.sampled_from(["system", "user", "assistant"]), max_size=4).map(
    lambda roles: [msg(r, f"{r} {i}") for i, r in enumerate(roles)] + [msg("user", "last question")]
)
reply = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12).filter(str.strip)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=conversation, chosen=reply, rejected=reply)
def test_every_layout_of_one_comparison_reads_the_same(tmp_path, prompt, chosen, rejected):
    """The slow twin of the prompt extraction: the comparison built by hand equals what each layout reads."""
    c, r = msg("assistant", chosen), msg("assistant", rejected)
    layouts = [
        {"prompt": prompt, "chosen": chosen, "rejected": rejected},
        {"prompt": prompt, "chosen": [c], "rejected": [r]},
        {"prompt": prompt, "chosen": [*prompt, c], "rejected": [*prompt, r]},
        {"chosen": [*prompt, c], "rejected": [*prompt, r]},
        {"prompt": prompt, "completions": [rejected, chosen], "ranking": [1, 0]},
    ]
    want = Comparison(prompt, [chosen, rejected], [0, 1])
    got = read_comparisons(jsonl(tmp_path, *layouts))
    assert got[:4] == [want] * 4
    assert [got[4].completions[i] for i in got[4].ranking] == [chosen, rejected]
    assert [p.messages for p in read_prompts(jsonl(tmp_path, *layouts, name="p.jsonl"))] == [prompt] * 5
    assert read_examples(jsonl(tmp_path, {"prompt": prompt, "completion": [c]}, name="e.jsonl")) == [
        Example([*prompt, c])
    ]


# ------------------------------------------------------------------------------------------ bad input

BAD_RECORDS = [
    # (reader, record on line 2, message expected after "data.jsonl:2: ")
    (read_examples, {"prompt": [U], "completion": [U2, A]},
     r'field "completion\[0\]\.role": expected the completion to start with the assistant\'s reply'),
    (read_examples, {"prompt": [U], "completion": [A, U2]},
     r'field "completion": expected the last message to be from the assistant, got one from the user'),
    (read_examples, {"prompt": [U], "completion": [msg("assistant", "")]},
     r'field "completion\[0\]\.content": empty reply'),
    (read_examples, {"prompt": [U], "completion": A},
     r'field "completion": expected a string, got object \(or a list of messages\)'),
    (read_examples, {"prompt": [U], "completion": []}, r'field "completion": expected at least one message'),
    (read_examples, {"prompt": [U, A], "completion": [GOOD]},
     r'field "prompt": expected the last message to be from the user'),
    (read_examples, {"prompt": [U], "completion": [{"role": "assistant", "content": [{"type": "text"}]}]},
     r'field "completion\[0\]\.content": expected a string, got list'),
    (read_examples, {"prompt": [U], "completion": [{"role": "tool", "content": "42"}, A]},
     r'field "completion\[0\]\.role": unknown role "tool"'),
    (read_examples, {"messages": [U, {**A, "tool_calls": [{"type": "function"}]}]},
     r'field "messages\[1\]\.tool_calls": tool calls are not supported'),
    (read_examples, {"messages": [{**U, "name": "ann", "tool_calls": [{}]}, A]},
     r'field "messages\[0\]\.tool_calls": tool calls are not supported'),
    (read_prompts, {"prompt": [{**U, "name": "ann"}]},
     r'field "prompt\[0\]\.name": unexpected key: a message holds only "role" and "content"'),
    (read_examples, {"prompt": [U], "completion": [A], "label": False},
     r'field "label": a record with "prompt", "completion" and "label" is TRL\'s unpaired preference \(KTO\)'),
    (read_comparisons, {"prompt": [U], "completion": [A], "label": True},
     r'field "label": .*\(KTO\) format.*give a paired file \("prompt", "chosen", "rejected"\) or a K-way one'),
    # explicit prompt
    (read_comparisons, {"prompt": [U], "chosen": [A, GOOD], "rejected": [BAD]},
     r'field "chosen": ends with more than one assistant message; a comparison ranks one reply'),
    (read_comparisons, {"prompt": [U], "chosen": [A], "rejected": [U, BAD, GOOD]},
     r'field "rejected": ends with more than one assistant message'),
    (read_comparisons, {"prompt": [U], "chosen": [A, U2, GOOD], "rejected": [BAD]},
     r'field "chosen": expected the reply alone \(one assistant message\) or the prompt\'s messages followed '
     r"by it; chosen\[0\] differs from the prompt's message 0"),
    (read_comparisons, {"prompt": [S, U], "chosen": [A], "rejected": [U, BAD]},
     r'field "rejected": expected the reply alone .*; rejected\[0\] differs from the prompt\'s message 0'),
    (read_comparisons, {"prompt": [U], "chosen": [A], "rejected": [U, A, U, BAD]},
     r'field "rejected": .*; "rejected" has 3 message\(s\) before its reply and the prompt has 1'),
    (read_comparisons, {"prompt": [U], "chosen": [U], "rejected": [BAD]},
     r'field "chosen": expected the last message to be from the assistant'),
    (read_comparisons, {"prompt": [U], "chosen": [{"role": "assistant", "content": 5}], "rejected": [BAD]},
     r'field "chosen\[0\]\.content": expected a string, got int'),
    (read_comparisons, {"prompt": [U], "chosen": A, "rejected": [BAD]},
     r'field "chosen": expected a string, got object \(or a list of messages\)'),
    (read_comparisons, {"prompt": [U], "chosen": [A]}, r'field "rejected": missing'),
    # implicit prompt
    (read_comparisons, {"chosen": [S, U, A, U2, GOOD], "rejected": [S, U, BAD, U2, GOOD]},
     r'field "rejected": the conversations of "chosen" and "rejected" must share every message but the last '
     r"reply; rejected\[2\] differs from chosen\[2\]"),
    (read_comparisons, {"chosen": [U, A, U2, GOOD], "rejected": [U2, BAD]},
     r'field "rejected": .*; rejected\[0\] differs from chosen\[0\]'),
    (read_comparisons, {"chosen": [U, A, U2, GOOD], "rejected": [U, BAD]},
     r'field "rejected": .*; "rejected" has 1 message\(s\) before its reply and "chosen" has 3'),
    (read_comparisons, {"chosen": [U, A, GOOD], "rejected": [U, BAD]},
     r'field "chosen": ends with more than one assistant message'),
    (read_comparisons, {"chosen": [U, GOOD], "rejected": [U, A, BAD]},
     r'field "rejected": ends with more than one assistant message'),
    (read_comparisons, {"chosen": [U, A, U2], "rejected": [U, BAD]},
     r'field "chosen": expected the last message to be from the assistant, got one from the user'),
    (read_comparisons, {"chosen": [A], "rejected": [BAD]},
     r'field "chosen": without a "prompt" field the conversation must hold the prompt'),
    (read_comparisons, {"chosen": [S, A], "rejected": [S, BAD]},
     r'field "chosen": without a "prompt" field the conversation must hold the prompt, ending with a user'),
    (read_comparisons, {"chosen": [msg("user", " "), A], "rejected": [msg("user", " "), BAD]},
     r'field "chosen\[0\]\.content": empty prompt'),
    (read_comparisons, {"chosen": [U, A], "rejected": "\n\nHuman: Hi\n\nAssistant: Hello"},
     r'field "rejected": expected a list of messages, got string'),
    (read_comparisons, {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": [U, BAD]},
     r'field "chosen": expected a list of messages, got string'),
    (read_comparisons, {"rejected": [U, BAD]}, r'field "chosen": missing'),
    (read_comparisons, {"chosen": [U, A], "rejected": [U, msg("assistant", "")]},
     r'field "rejected\[1\]\.content": empty reply'),
    (read_prompts, {"chosen": [U, A], "rejected": [U2, BAD]}, r'field "rejected": .*rejected\[0\] differs'),
]
GOOD_RECORD = {
    read_examples: {"prompt": [U], "completion": [A]},
    read_comparisons: {"prompt": [U], "chosen": [A], "rejected": [BAD]},
    read_prompts: {"chosen": [U, A], "rejected": [U, BAD]},
}


@pytest.mark.parametrize("reader,record,expected", BAD_RECORDS, ids=[str(i) for i in range(len(BAD_RECORDS))])
def test_bad_record_names_file_line_and_field(tmp_path, reader, record, expected):
    good = GOOD_RECORD[reader]
    path = jsonl(tmp_path, good, record, good)
    with pytest.raises(UserError, match=r"data\.jsonl:2: " + expected):
        reader(path)
    with pytest.warns(UserWarning, match=r"skipped 1 invalid record\(s\) of 3"):
        kept = reader(path, skip_invalid=True)
    assert len(kept) == 2 and re.match(r".*data\.jsonl:2: " + expected, kept.report.errors[0])
