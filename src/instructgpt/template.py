"""A model's own chat template (Jinja, as in Hugging Face's tokenizer_config.json): conversations to token ids
and the loss mask of the assistant's replies.

The template is rendered the way `transformers`' apply_chat_template renders it (a sandboxed Jinja environment
with trim_blocks and lstrip_blocks, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII), and
its text is tokenized with its special-token strings as the special tokens (`Tokenizer.encode_rendered`).

Which tokens are the assistant's is found one of two ways:

- the template marks them with `{% generation %}...{% endgeneration %}` (the markers transformers reads for
  `return_assistant_tokens_mask`, and the ones `export-hf` writes into our own template): the marked text;
- otherwise by prefixes, which every template that renders a conversation turn by turn satisfies: reply i
  is the text between render(messages[:i], add_generation_prompt=True) and render(messages[:i + 1]), both
  prefixes of the whole conversation's text. A template that renders earlier turns differently once later
  ones follow (one that drops earlier reasoning, say) is refused with a message that says so.

The text is tokenized piece by piece, cut at each reply's start and end, so the ids before a reply are those
of `render_prompt` of the conversation so far: a model that generates after the prompt produces the training
ids. Within a reply the loss mask covers the reply through its end-of-turn token (the last of
`Tokenizer.stop_ids` in it), not what the template writes after it (SmolLM2's newline).

A message whose content holds one of the tokenizer's special-token strings is refused: it would end a turn
or open one where the conversation does not.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import UserError
from .tokenizer import Tokenizer

START, END = "\ue000", "\ue001"  # private-use characters that mark a {% generation %} block while tracking
_tracking: ContextVar[bool] = ContextVar("generation_tracking", default=False)
_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


class _Generation(Extension):
    """`{% generation %}body{% endgeneration %}`: the body, between START and END while tracking."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

    def _mark(self, caller) -> str:
        text = caller()
        return f"{START}{text}{END}" if _tracking.get() else text


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def _token_name(tok: Tokenizer, role: str) -> str | None:
    name = tok.config.get(f"{role}_token")
    return name.get("content") if isinstance(name, dict) else name


def render_text(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False,
                track: bool = False) -> str:
    """The template's text for a conversation (with START/END around generation blocks when `track`)."""
    for i, m in enumerate(messages):
        bad = tok.special_tokens_in(m["content"])
        if bad:
            raise UserError(f"message {i} contains the special token {bad[0]!r}, which would change the "
                            f"conversation's turns; remove it from the text")
        if track and (START in m["content"] or END in m["content"]):
            raise UserError(f"message {i} contains the private-use character U+E000 or U+E001, which mark "
                            "the assistant's tokens while rendering")
    template = compile_template(tok.chat_template)
    token = _tracking.set(track)
    try:
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                               bos_token=_token_name(tok, "bos") or "", eos_token=_token_name(tok, "eos") or "",
                               pad_token=_token_name(tok, "pad") or "", unk_token=_token_name(tok, "unk") or "",
                               tools=None, documents=None)
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template failed on this conversation: {e}") from None
    finally:
        _tracking.reset(token)


def reply_spans(tok: Tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of each assistant reply in it."""
    if _MARKER.search(tok.chat_template):
        marked = render_text(tok, messages, track=True)
        text, spans, start = [], [], None
        pos = 0
        for piece in re.split(f"([{START}{END}])", marked):
            if piece == START:
                start = pos
            elif piece == END:
                spans.append((start, pos))
            else:
                text.append(piece)
                pos += len(piece)
        return "".join(text), spans
    text = render_text(tok, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render_text(tok, messages[:i], add_generation_prompt=True) if i else ""
        through = render_text(tok, messages[: i + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise UserError(f"the chat template renders the conversation before message {i} differently once "
                            "later turns follow, so its reply cannot be located; give the template "
                            "{% generation %} markers around the assistant's text")
        spans.append((len(before), len(through)))
    return text, spans


def render_ids(tok: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask: 1 on each reply's tokens through its end-of-turn token."""
    text, spans = reply_spans(tok, messages)
    ids, mask, pos = [], [], 0
    for s, e in spans:
        piece = tok.encode_rendered(text[pos:s])
        ids += piece
        mask += [0] * len(piece)
        reply = tok.encode_rendered(text[s:e])
        ends = [j for j, t in enumerate(reply) if t in tok.stop_ids]
        trained = ends[-1] + 1 if ends else len(reply)
        ids += reply
        mask += [1] * trained + [0] * (len(reply) - trained)
        pos = e
    piece = tok.encode_rendered(text[pos:])
    return ids + piece, mask + [0] * len(piece)


def prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids to generate a reply from: the template's text with its generation prompt."""
    return tok.encode_rendered(render_text(tok, messages, add_generation_prompt=True))


def response_ids(tok: Tokenizer, response: str) -> list[int]:
    """A reply's ids as they follow `prompt_ids` in training, through its end-of-turn token."""
    ids, mask = render_ids(tok, [{"role": "user", "content": "?"}, {"role": "assistant", "content": response}])
    return [i for i, m in zip(ids, mask) if m]
