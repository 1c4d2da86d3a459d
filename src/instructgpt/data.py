"""Read users' instruction, preference and prompt files into one normalised form.

Every stage that starts from a user's file reads it through this module, so each supported layout is
parsed in one place and every mistake in a file is reported the same way: a `UserError` whose message
names the file, the line (1-based) and the field, e.g. ``data.jsonl:7: field "completion": expected a
string, got int``.

Files: JSONL (one record per line; blank lines are ignored), JSON (a list of records, one object holding
one list of records, or a single record) and parquet (one record per row, needs `pyarrow`). The layout is
chosen by the suffix (``.jsonl``/``.ndjson``, ``.json``, ``.parquet``); a ``.json`` file that is really
JSON lines (as `datasets` writes them) is read as JSON lines; any other suffix is read as a JSON list if
it starts with ``[`` and as JSON lines otherwise. Records in JSON files are located by the line they start
on, parquet rows by their row number.

The record format is detected per record from its keys:

demonstrations (`read_examples`)
    ``{"prompt", "completion"}``: prompt (a string or a list of messages ending with a user message) and
    the assistant's reply: a string, or (TRL's conversational prompt-completion) a list of messages that
    starts and ends with an assistant message. A trailing ``<|endoftext|>`` on a string completion (T0 /
    self-instruct data) is removed: the chat template adds its own end token. With a boolean ``"label"``
    it is TRL's unpaired preference (KTO) format, refused: a completion labelled false is no demonstration.
    ``{"messages": [...]}``: OpenAI-style chat (and TRL's conversational language modelling), roles
    ``system``/``user``/``assistant``, ending with the assistant's reply.
    ``{"instruction", "input", "output"}``: Alpaca; the user says the instruction, followed by
    ``"\\n\\n"`` and the input when the input is present and not blank.
    ``{"question", "answer"}``: GSM8K; the answer is the reply as given (see `gsm8k_final_answer`).

comparisons (`read_comparisons`)
    ``{"prompt", "chosen", "rejected"}``: two replies, K = 2, ranking ``[0, 1]``. A reply is a string or
    (TRL's conversational preference) a list of messages: the one assistant reply, which may follow a
    repeat of the prompt's messages (as some datasets write it).
    ``{"chosen", "rejected"}`` without a prompt: two whole conversations that share every message but the
    last assistant reply, the shared messages being the prompt: Anthropic HH ``"\\n\\nHuman: ...\\n\\nAssistant: ..."``
    transcripts (turns stripped of the whitespace that the format puts around them) or lists of messages
    (TRL's implicit prompt). A conversation must end with exactly one assistant message: we rank one reply.
    ``{"prompt", "completions", "ranking"}``: K >= 2 replies ranked best to worst.
    TRL's unpaired ``{"prompt", "completion", "label"}`` (KTO) records are refused: the reward model and
    DPO learn from replies ranked against each other.

prompts (`read_prompts`)
    ``{"prompt"}`` (string or messages), ``{"messages"}`` ending with a user message, or any record
    above, TRL's unpaired (KTO) ones included: its prompt part is taken (a ``messages`` list ending with
    the assistant's reply loses that reply).

A message is ``{"role", "content"}`` with a string content. Any other key of a message (``"name"``,
``"tool_calls"``) is refused unless it is null or an empty list (a parquet table gives every message every
key that any message has). Keys a record's format does not use are passed through in ``meta``. A prompt's
``meta`` keeps everything that was not needed to build the prompt (a completion, a GSM8K answer), which
evaluation can use as reference.

JSON is read strictly (see `records`): a duplicate key, NaN or Infinity, JSON nested deeper than Python can
parse, and a string with a lone surrogate (``"\\ud800"``, which no tokenizer can take) make a record invalid.

Invalid records: by default the first one raises `UserError`. With ``skip_invalid=True`` each invalid
record is skipped and the reader's result (a `Records`, which is a list) carries a `ReadReport` in its
``report`` attribute with the count and the message of each skipped record; a `UserWarning` also says
how many were skipped, so that skipping is never silent. Errors about the whole file (missing, empty, a
JSON document that does not parse) are raised either way, and so is a file with no valid record left.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from .errors import UserError
from .records import raw_records, type_name

ROLES = ("system", "user", "assistant")
END_OF_TEXT = "<|endoftext|>"  # T0 / self-instruct completions end with GPT-2's end token, as text

SFT_FORMATS = (
    '{"prompt", "completion"} (strings or TRL message lists), {"messages": [...]} ending with an assistant message, '
    'Alpaca {"instruction", "input" (optional), "output"}, GSM8K {"question", "answer"}'
)
COMPARISON_FORMATS = (
    '{"prompt", "chosen", "rejected"} (strings or TRL message lists), {"chosen", "rejected"} without a prompt '
    "(Anthropic HH transcripts, or TRL message lists that share all but the last reply), "
    '{"prompt", "completions": [...], "ranking": [...]}'
)
PROMPT_FORMATS = (
    '{"prompt"}, {"messages": [...]}, or any demonstration or comparison record '
    f"({SFT_FORMATS}; {COMPARISON_FORMATS})"
)


# --------------------------------------------------------------------------------------------- records


@dataclass
class Example:
    """One SFT demonstration."""

    messages: list[dict]  # [{"role", "content"}, ...] ending with the assistant's reply
    meta: dict = field(default_factory=dict)  # the record's other keys ("id", "family", ...)

    def as_record(self) -> dict:
        """The record in the ``{"messages": [...]}`` format, which reads back into an equal `Example`."""
        return {**self.meta, "messages": self.messages}


@dataclass
class Comparison:
    """K >= 2 replies to one prompt, ranked by a labeler."""

    prompt: list[dict]  # messages ending with a user message
    completions: list[str]  # the K replies
    ranking: list[int]  # a permutation of range(K): completion indices from best to worst
    meta: dict = field(default_factory=dict)

    def pairs(self) -> list[tuple[int, int]]:
        """All C(K, 2) (winner, loser) pairs of completion indices implied by the ranking.

        InstructGPT (section 3.5) trains the reward model on every pair of one ranking together.
        """
        r = self.ranking
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]

    def as_record(self) -> dict:
        """The record in the K-way format, which reads back into an equal `Comparison`."""
        return {**self.meta, "prompt": self.prompt, "completions": self.completions, "ranking": self.ranking}


@dataclass
class Prompt:
    """A prompt for generation (collect, PPO, evaluation)."""

    messages: list[dict]  # ending with a user message
    meta: dict = field(default_factory=dict)

    def as_record(self) -> dict:
        """The record in the ``{"messages": [...]}`` format, which reads back into an equal `Prompt`."""
        return {**self.meta, "messages": self.messages}


@dataclass
class ReadReport:
    """What a reader kept and skipped."""

    path: str
    kept: int  # records returned
    skipped: int  # invalid records skipped (only with skip_invalid=True)
    errors: list[str] = field(default_factory=list)  # the message of each skipped record, in file order


T = TypeVar("T")


class Records(list[T], Generic[T]):
    """A list of records with the `ReadReport` of the file they were read from in ``report``."""

    report: ReadReport


# ---------------------------------------------------------------------------------------------- readers


def read_examples(path: str | Path, skip_invalid: bool = False) -> Records[Example]:
    """Read SFT demonstrations; see the module docstring for the formats."""
    return _read(path, _example, skip_invalid)


def read_comparisons(path: str | Path, skip_invalid: bool = False) -> Records[Comparison]:
    """Read ranked comparisons; see the module docstring for the formats."""
    return _read(path, _comparison, skip_invalid)


def read_prompts(path: str | Path, skip_invalid: bool = False) -> Records[Prompt]:
    """Read prompts from any supported record; see the module docstring for the formats."""
    return _read(path, _prompt, skip_invalid)


def iter_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (number, record): the line a record starts on (JSONL, JSON) or its row (parquet), from 1.

    Raises `UserError` at the first line that is not valid UTF-8, not valid JSON or not a JSON object.
    """
    for number, _, record in raw_records(path):
        if isinstance(record, UserError):
            raise record
        yield number, record


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    """Write one JSON object per line, atomically: a temporary file in the same folder, then a rename.

    A crash leaves either the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for record in records:
                if not isinstance(record, dict):
                    raise TypeError(f"write_jsonl writes dicts, got {type(record).__name__}")
                # allow_nan=False: NaN is not JSON, and a NaN reward must fail here, not in the next stage
                f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def gsm8k_final_answer(answer: str) -> str:
    """The final answer of a GSM8K worked answer: the text after ``####``, stripped, commas removed."""
    head, sep, tail = answer.rpartition("####")
    if not sep:
        raise UserError(f'GSM8K answer has no "####" before the final answer: {answer[-80:]!r}')
    return tail.strip().replace(",", "")


def _read(path: str | Path, parse: Callable[[dict, str], T], skip_invalid: bool) -> Records[T]:
    out: Records[T] = Records()
    errors: list[str] = []
    # Whole-file errors come out of the generator, outside the try, so they are never skipped.
    for _, loc, record in raw_records(path):
        try:
            if isinstance(record, UserError):
                raise record
            out.append(parse(record, loc))
        except UserError as e:
            if not skip_invalid:
                raise
            errors.append(str(e))
    if not out:
        first = f"; the first: {errors[0]}" if errors else ""
        raise UserError(f"{path}: no valid records ({len(errors)} invalid{first})")
    if errors:
        warnings.warn(
            f"{path}: skipped {len(errors)} invalid record(s) of {len(out) + len(errors)}; the first: {errors[0]}",
            UserWarning,
            stacklevel=3,
        )
    out.report = ReadReport(path=str(path), kept=len(out), skipped=len(errors), errors=errors)
    return out


# ------------------------------------------------------------------------------------ record formats


def _example(rec: dict, loc: str) -> Example:
    if "messages" in rec:
        messages = _messages(rec, "messages", loc, last="assistant")
        return Example(messages, _meta(rec, "messages"))
    if "instruction" in rec or "output" in rec:
        user = _alpaca_user(rec, loc)
        reply = _string(rec, "output", loc, reply=True)
        return Example([_msg("user", user), _msg("assistant", reply)], _meta(rec, "instruction", "input", "output"))
    if "question" in rec or "answer" in rec:
        question = _string(rec, "question", loc)
        answer = _string(rec, "answer", loc, reply=True)
        return Example([_msg("user", question), _msg("assistant", answer)], _meta(rec, "question", "answer"))
    if "completion" in rec or ("prompt" in rec and not _is_comparison(rec)):
        if isinstance(rec.get("label"), bool):
            raise _unpaired(loc, 'demonstrations are replies to learn from: keep the records labelled true and '
                            'remove "label"')
        prompt = _prompt_value(rec, "prompt", loc)
        return Example([*prompt, *_completion(rec, loc)], _meta(rec, "prompt", "completion"))
    raise _no_format(rec, loc, "demonstration", SFT_FORMATS)


def _comparison(rec: dict, loc: str) -> Comparison:
    if "completions" in rec or "ranking" in rec:
        prompt = _prompt_value(rec, "prompt", loc)
        completions = _completions(rec, loc)
        ranking = _ranking(rec, len(completions), loc)
        return Comparison(prompt, completions, ranking, _meta(rec, "prompt", "completions", "ranking"))
    if "chosen" in rec or "rejected" in rec:
        prompt, chosen, rejected = _pair(rec, loc, need_replies=True)
        return Comparison(prompt, [chosen, rejected], [0, 1], _meta(rec, "prompt", "chosen", "rejected"))
    if "completion" in rec and "label" in rec:
        raise _unpaired(loc, 'the reward model and DPO learn from replies ranked against each other: give a '
                        'paired file ("prompt", "chosen", "rejected") or a K-way one ("prompt", "completions", '
                        '"ranking")')
    raise _no_format(rec, loc, "comparison", COMPARISON_FORMATS)


def _prompt(rec: dict, loc: str) -> Prompt:
    if "messages" in rec:
        messages = _messages(rec, "messages", loc, last=None)
        if messages[-1]["role"] == "assistant":  # a demonstration: its prompt is what precedes the reply
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise _field_error(loc, "messages", "a prompt must end with a user message (before any final reply)")
        _check_user(messages[-1]["content"], "messages", loc)
        return Prompt(messages, _meta(rec, "messages"))
    if "prompt" in rec:
        return Prompt(_prompt_value(rec, "prompt", loc), _meta(rec, "prompt"))
    if "instruction" in rec:
        return Prompt([_msg("user", _alpaca_user(rec, loc))], _meta(rec, "instruction", "input"))
    if "question" in rec:
        return Prompt([_msg("user", _string(rec, "question", loc))], _meta(rec, "question"))
    if "chosen" in rec or "rejected" in rec:
        prompt, _, _ = _pair(rec, loc, need_replies=False)
        return Prompt(prompt, _meta(rec, "chosen", "rejected"))
    raise _no_format(rec, loc, "prompt", PROMPT_FORMATS)


def _is_comparison(rec: dict) -> bool:
    return any(k in rec for k in ("chosen", "rejected", "completions", "ranking"))


def _alpaca_user(rec: dict, loc: str) -> str:
    instruction = _string(rec, "instruction", loc)
    _check_user(instruction, "instruction", loc)
    extra = rec.get("input")
    if extra is not None and not isinstance(extra, str):
        raise _field_error(loc, "input", f"expected a string, got {type_name(extra)}")
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


def _completion(rec: dict, loc: str) -> list[dict]:
    """The reply of a prompt-completion record: a string, or messages from the assistant first and last."""
    if isinstance(rec.get("completion"), list):
        messages = _messages(rec, "completion", loc, last="assistant")
        if messages[0]["role"] != "assistant":
            raise _field_error(loc, "completion[0].role", "expected the completion to start with the assistant's "
                               f"reply to the prompt, got a message from the {messages[0]['role']}")
        return messages
    text = _string(rec, "completion", loc, lists=True)
    if text.endswith(END_OF_TEXT):
        text = text[: -len(END_OF_TEXT)]
    _check_reply(text, "completion", loc)
    return [_msg("assistant", text)]


def _unpaired(loc: str, why: str) -> UserError:
    return _field_error(loc, "label", 'a record with "prompt", "completion" and "label" is TRL\'s unpaired '
                        f"preference (KTO) format, one reply judged good or bad alone; {why}")


def _pair(rec: dict, loc: str, need_replies: bool) -> tuple[list[dict], str, str]:
    """The prompt and the two replies of a {"chosen", "rejected"} record (see the module docstring)."""
    if "prompt" in rec:
        prompt = _prompt_value(rec, "prompt", loc)
        chosen = _reply(rec, "chosen", loc, prompt, need_replies, given=True)
        return prompt, chosen, _reply(rec, "rejected", loc, prompt, need_replies, given=True)
    if not any(isinstance(rec.get(k), list) for k in ("chosen", "rejected")):
        return _hh(rec, loc, need_replies)
    prompt, chosen = _final_reply(rec, "chosen", loc, need_replies)  # implicit: the prompt is what precedes it
    if not prompt or prompt[-1]["role"] != "user":
        raise _field_error(loc, "chosen", "without a \"prompt\" field the conversation must hold the prompt, "
                           "ending with a user message, before the assistant's reply")
    _check_user(prompt[-1]["content"], f"chosen[{len(prompt) - 1}].content", loc)
    return prompt, chosen, _reply(rec, "rejected", loc, prompt, need_replies, given=False)


def _reply(rec: dict, key: str, loc: str, prompt: list[dict], need_reply: bool, given: bool) -> str:
    """A reply of a comparison: a string (only beside a given "prompt") or a conversation whose messages
    before its one final assistant reply are `prompt` (or none, beside a given "prompt")."""
    if given and not isinstance(rec.get(key), list):
        return _string(rec, key, loc, reply=need_reply, lists=True)
    before, reply = _final_reply(rec, key, loc, need_reply)
    if before == prompt or (given and not before):
        return reply
    at = next((i for i, (a, b) in enumerate(zip(before, prompt)) if a != b), None)
    if given:
        rule = "expected the reply alone (one assistant message) or the prompt's messages followed by it"
        ref, other = f"the prompt's message {at}", "the prompt"
    else:
        rule = 'the conversations of "chosen" and "rejected" must share every message but the last reply'
        ref, other = f"chosen[{at}]", '"chosen"'
    where = (f"{key}[{at}] differs from {ref}" if at is not None
             else f'"{key}" has {len(before)} message(s) before its reply and {other} has {len(prompt)}')
    raise _field_error(loc, key, f"{rule}; {where}")


def _final_reply(rec: dict, key: str, loc: str, need_reply: bool) -> tuple[list[dict], str]:
    """(the messages before the final assistant message, its content) of the conversation in rec[key]."""
    messages = _messages(rec, key, loc, last="assistant", reply=need_reply)
    if len(messages) > 1 and messages[-2]["role"] == "assistant":
        raise _field_error(loc, key, "ends with more than one assistant message; a comparison ranks one reply, "
                           "so each conversation must end with exactly one")
    return messages[:-1], messages[-1]["content"]


# Anthropic HH: "\n\nHuman: ...\n\nAssistant: ..."; a final "Assistant:" may have no space after it.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):(?: |\Z)")
_HH_ROLE = {"Human": "user", "Assistant": "assistant"}


def _hh(rec: dict, loc: str, need_replies: bool) -> tuple[list[dict], str, str]:
    """Split two HH transcripts into their shared prompt and the two last assistant replies."""
    chosen = _hh_turns(rec, "chosen", loc)
    rejected = _hh_turns(rec, "rejected", loc)
    if chosen[:-1] != rejected[:-1]:
        at = next((i for i, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b), None)
        where = f"turn {at + 1} differs" if at is not None else "they have a different number of turns"
        raise UserError(
            f'{loc}: fields "chosen" and "rejected": the two transcripts must share every turn but the last '
            f"assistant reply; {where} ({len(chosen)} and {len(rejected)} turns)"
        )
    prompt = chosen[:-1]
    if not prompt or prompt[-1]["role"] != "user":
        raise UserError(f'{loc}: fields "chosen" and "rejected": the shared turns must end with a Human turn')
    _check_user(prompt[-1]["content"], "chosen", loc)
    if need_replies:
        _check_reply(chosen[-1]["content"], "chosen", loc)
        _check_reply(rejected[-1]["content"], "rejected", loc)
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def _hh_turns(rec: dict, key: str, loc: str) -> list[dict]:
    text = _string(rec, key, loc)
    if text.startswith(("Human:", "Assistant:")):  # some copies drop the leading blank line
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise _field_error(loc, key, f'expected a transcript starting with "\\n\\nHuman: ", got {text[:40]!r}')
    turns = [_msg(_HH_ROLE[role], content.strip()) for role, content in zip(parts[1::2], parts[2::2])]
    if not turns or turns[-1]["role"] != "assistant":
        raise _field_error(loc, key, 'the transcript must end with an "Assistant:" turn')
    return turns


# ------------------------------------------------------------------------------------- field checks


def _msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def _meta(rec: dict, *used: str) -> dict:
    return {k: v for k, v in rec.items() if k not in used}


def _string(rec: dict, key: str, loc: str, reply: bool = False, lists: bool = False) -> str:
    if key not in rec:
        raise _field_error(loc, key, "missing")
    value = rec[key]
    if not isinstance(value, str):
        also = " (or a list of messages)" if lists else ""
        raise _field_error(loc, key, f"expected a string, got {type_name(value)}{also}")
    if reply:
        _check_reply(value, key, loc)
    return value


def _check_reply(text: str, key: str, loc: str) -> None:
    if not text.strip():
        raise _field_error(loc, key, "empty reply (empty or whitespace-only)")


def _check_user(text: str, key: str, loc: str) -> None:
    if not text.strip():
        raise _field_error(loc, key, "empty prompt (the last user message is empty or whitespace-only)")


def _prompt_value(rec: dict, key: str, loc: str) -> list[dict]:
    """A prompt given as a string (one user message) or as messages ending with a user message."""
    if key not in rec:
        raise _field_error(loc, key, "missing")
    value = rec[key]
    if isinstance(value, str):
        _check_user(value, key, loc)
        return [_msg("user", value)]
    if isinstance(value, list):
        return _messages(rec, key, loc, last="user")
    raise _field_error(loc, key, f"expected a string or a list of messages, got {type_name(value)}")


def _messages(rec: dict, key: str, loc: str, last: str | None, reply: bool = True) -> list[dict]:
    """Validate a list of {"role", "content"} messages ending with one from `last` (any when None); with
    `reply`, a last assistant message must not be empty."""
    if key not in rec:
        raise _field_error(loc, key, "missing")
    value = rec[key]
    if not isinstance(value, list):
        raise _field_error(loc, key, f"expected a list of messages, got {type_name(value)}")
    if not value:
        raise _field_error(loc, key, "expected at least one message, got an empty list")
    out = []
    for i, m in enumerate(value):
        name = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise _field_error(loc, name, f'expected an object with "role" and "content", got {type_name(m)}')
        # A parquet table gives every message each key that any message has: null there means absent.
        extra = [k for k, v in m.items() if k not in ("role", "content") and v is not None and v != []]
        if extra:
            k = "tool_calls" if "tool_calls" in extra else extra[0]
            why = ("tool calls are not supported: a message is text from the system, the user or the assistant"
                   if k == "tool_calls" else 'unexpected key: a message holds only "role" and "content"')
            raise _field_error(loc, f"{name}.{k}", why)
        role, content = m.get("role"), m.get("content")
        if role is None:
            raise _field_error(loc, f"{name}.role", "missing")
        if role not in ROLES:
            raise _field_error(
                loc, f"{name}.role", f"unknown role {_short(role)}; expected one of {', '.join(map(_short, ROLES))}"
            )
        if content is None:
            raise _field_error(loc, f"{name}.content", "missing")
        if not isinstance(content, str):
            raise _field_error(loc, f"{name}.content", f"expected a string, got {type_name(content)}")
        out.append(_msg(role, content))
    if last is not None and out[-1]["role"] != last:
        raise _field_error(
            loc, key, f"expected the last message to be from the {last}, got one from the {out[-1]['role']}"
        )
    if last == "assistant" and reply:
        _check_reply(out[-1]["content"], f"{key}[{len(out) - 1}].content", loc)
    if last == "user":
        _check_user(out[-1]["content"], f"{key}[{len(out) - 1}].content", loc)
    return out


def _completions(rec: dict, loc: str) -> list[str]:
    if "completions" not in rec:
        raise _field_error(loc, "completions", "missing")
    value = rec["completions"]
    if not isinstance(value, list):
        raise _field_error(loc, "completions", f"expected a list of strings, got {type_name(value)}")
    if len(value) < 2:
        raise _field_error(loc, "completions", f"expected at least 2 completions to rank, got {len(value)}")
    for i, c in enumerate(value):
        if not isinstance(c, str):
            raise _field_error(loc, f"completions[{i}]", f"expected a string, got {type_name(c)}")
        _check_reply(c, f"completions[{i}]", loc)
    return list(value)


def _ranking(rec: dict, k: int, loc: str) -> list[int]:
    if "ranking" not in rec:
        raise _field_error(loc, "ranking", "missing")
    value = rec["ranking"]
    if not isinstance(value, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in value):
        raise _field_error(loc, "ranking", f"expected a list of completion indices, got {_short(value)}")
    if sorted(value) != list(range(k)):
        raise _field_error(
            loc,
            "ranking",
            f"expected a permutation of range({k}) (indices best to worst), got {_short(value)}",
        )
    return list(value)


def _field_error(loc: str, key: str, msg: str) -> UserError:
    return UserError(f'{loc}: field "{key}": {msg}')


def _no_format(rec: dict, loc: str, what: str, formats: str) -> UserError:
    keys = ", ".join(f'"{k}"' for k in rec) or "none"
    return UserError(f"{loc}: the record (keys: {keys}) is not a known {what} format; expected one of: {formats}")


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


# -------------------------------------------------------------------------------------------- files


# Keys that make a top-level JSON object one record rather than a holder of a list of records.


def ended_flags(c: Comparison) -> list[bool] | None:
    """The comparison's "ended" flags (one per completion; all True when absent), or None if malformed."""
    ended = c.meta.get("ended")
    if ended is None:
        return [True] * len(c.completions)
    if not isinstance(ended, list) or len(ended) != len(c.completions) or not all(isinstance(e, bool) for e in ended):
        return None
    return list(ended)


def _ended_error(path: Path) -> UserError:
    """The file:line of the first record whose "ended" field does not fit its completions."""
    for number, rec in iter_records(path):
        if "ended" not in rec:
            continue
        k = len(rec["completions"]) if isinstance(rec.get("completions"), list) else 2
        e = rec["ended"]
        if not isinstance(e, list) or len(e) != k or not all(isinstance(x, bool) for x in e):
            return UserError(f'{path}:{number}: field "ended": expected a list of {k} booleans (one per '
                             f"completion: did the reply end with the end token), got {json.dumps(e)[:80]}")
    return UserError(f'{path}: a record has a malformed "ended" field')


def read_rankings(paths: list[Path], skip_invalid: bool = False) -> list[Comparison]:
    """Comparisons from every file (rankings, pairs, Anthropic HH), with their optional "ended" flags
    checked; errors name the file, the line and the field."""
    comps: list[Comparison] = []
    for p in paths:
        got = read_comparisons(p, skip_invalid=skip_invalid)
        if any(ended_flags(c) is None for c in got):
            raise _ended_error(Path(p))
        comps.extend(got)
    return comps


def split_comparisons(comps: list[Comparison], val_fraction: float, seed: int
                      ) -> tuple[list[Comparison], list[Comparison]]:
    """(train, validation): a seeded random `val_fraction` of the prompts is held out."""
    order = np.random.default_rng([seed, 13]).permutation(len(comps))
    n_val = max(1, int(round(len(comps) * val_fraction))) if val_fraction > 0 and len(comps) > 1 else 0
    return [comps[i] for i in order[n_val:]], [comps[i] for i in order[:n_val]]
