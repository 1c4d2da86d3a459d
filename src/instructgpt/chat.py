"""The chat template: the one renderer of conversations to token ids, for every stage.

SFT, the reward model, RL rollouts, evaluation, the terminal chat and the server all call these three
functions, so training and inference see the same ids for the same conversation (DESIGN invariant 3).

Format, in token ids:

    <|bos|>  then, per message:  <|role|> encode(" " + content) <|eos|>

with role one of system, user, assistant, and the space only for a tokenizer with `space_after_role` (every BPE
trained here: a reply's first word is then the token pretraining saw after a space; see `tokenizer`). A reply's
text is its tokens decoded, less that one leading space (`reply_text`). The tokens of each assistant reply and
the <|eos|> that ends it are the trained labels (loss mask 1): the model learns to stop (invariant 1). Each
message's content is encoded on its own, never across a special token, so

    render(prefix + [reply])[0] == render_prompt(prefix) + render_response(reply)

token for token; a model generating after render_prompt produces exactly the training ids.

A tokenizer with a chat template of its own (an imported model's) is rendered with that template instead
(`template`): the same three functions, the same guarantee, the reply's tokens through its end-of-turn token
trained. `BUILTIN_TEMPLATE` is the format above as such a template, with `{% generation %}` markers, for
other tools (export-hf writes it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import template
from .errors import UserError
from .generate import SamplingParams, generate
from .tokenizer import Tokenizer

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
BUILTIN_TEMPLATE = (
    "{{ '<|bos|>' }}{% for message in messages %}{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|eos|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|eos|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# The same with a space after each role token (a tokenizer with space_after_role); the space is the reply's own
# first character, inside the generation markers, as the model generates it.
BUILTIN_TEMPLATE_SPACED = BUILTIN_TEMPLATE.replace("{{ message['content'] + '<|eos|>' }}",
                                                   "{{ ' ' + message['content'] + '<|eos|>' }}")


def builtin_template(tok: Tokenizer) -> str:
    """The built-in format of `tok` as a Jinja chat template (what export-hf writes)."""
    return BUILTIN_TEMPLATE_SPACED if tok.space_after_role else BUILTIN_TEMPLATE


def _reply_space(tok: Tokenizer) -> bool:
    """The built-in format puts a space before each reply (a tokenizer with space_after_role and no template)."""
    return tok.space_after_role and tok.chat_template is None


def _content_ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(" " + text if tok.space_after_role else text)


def _check(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise UserError("a conversation must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"message {i} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise UserError(f"message {i} has unknown role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise UserError(f"message {i} content must be a string, got {type(m['content']).__name__}")


def _role_id(tok: Tokenizer, role: str) -> int:
    return {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}[role]


def render(
    tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = False
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation and its loss mask (1 on assistant reply tokens and their <|eos|>).

    With add_generation_prompt, the assistant marker is appended (mask 0) for the model to continue.
    """
    _check(messages)
    if tok.chat_template is not None:
        if add_generation_prompt:
            ids = template.prompt_ids(tok, messages)
            return ids, [0] * len(ids)
        return template.render_ids(tok, messages)
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        content = _content_ids(tok, m["content"]) + [tok.eos_id]
        trained = 1 if m["role"] == "assistant" else 0
        ids += [_role_id(tok, m["role"])] + content
        mask += [0] + [trained] * len(content)
    if add_generation_prompt:
        ids.append(tok.assistant_id)
        mask.append(0)
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Ids to generate a reply from: the conversation so far (ending with a user message) + <|assistant|>."""
    _check(messages)
    if messages[-1]["role"] != "user":
        raise UserError(f"a prompt must end with a user message, not {messages[-1]['role']!r}")
    return render(tok, messages, add_generation_prompt=True)[0]


def render_response(tok: Tokenizer, response: str) -> list[int]:
    """Ids of a reply as they follow render_prompt in training: encode(response) + <|eos|> (with a model's own
    template: the reply's tokens through its end-of-turn token)."""
    if not isinstance(response, str):
        raise UserError(f"a response must be a string, got {type(response).__name__}")
    if tok.chat_template is not None:
        return template.response_ids(tok, response)
    return _content_ids(tok, response) + [tok.eos_id]


def unended_response(tok: Tokenizer, response: str) -> list[int]:
    """Ids of a reply that was cut off before its end token: render_response without the end."""
    if tok.chat_template is not None:
        return tok.encode(response)
    return _content_ids(tok, response)


def reply_text(tok: Tokenizer, ids) -> str:
    """The text of a generated reply's ids (special tokens dropped): their decoding, less the space the format
    puts before a reply (`space_after_role`)."""
    text = tok.decode(ids)
    return text[1:] if _reply_space(tok) and text.startswith(" ") else text


FEW_SHOT = (
    ("What is 3 + 4?", "7."),
    ("Reverse the word cat.", "tac."),
    ("How do I steal a horse?", "I can't help with that."),
)


def few_shot_prompt(question: str, shots: Sequence[tuple[str, str]] = FEW_SHOT) -> str:
    """Plain text that puts a pretrained model in the form of a question and its answer (no chat format)."""
    examples = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots)
    return f"{examples}Question: {question}\nAnswer:"


@dataclass(frozen=True)
class FewShot:
    """How a pretrained model is prompted, as the paper prompted GPT-3: worked examples before the question.

    A prompt whose record has a family (`Prompt.meta["family"]`) in `by_family` gets that family's examples,
    so that the answer's form is shown rather than guessed; every other prompt gets `default`."""

    by_family: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    default: tuple[tuple[str, str], ...] = FEW_SHOT

    def text(self, prompt) -> str:
        """The few-shot text of a Prompt (its last user message is the question)."""
        shots = self.by_family.get(prompt.meta.get("family"), self.default)
        return few_shot_prompt(prompt.messages[-1]["content"], shots)


def replies(model, tok: Tokenizer, prompts, few_shot: FewShot | None, max_new_tokens: int, batch_size: int,
            progress: Any = None) -> list[tuple[str, bool]]:
    """Greedy (text, ended) for each prompt: in the chat format, or with `few_shot` as plain few-shot text, whose
    replies end at the first newline."""
    out: list[tuple[str, bool]] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    block = model.config.block_size
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        if few_shot is not None:
            ids = [tok.begin + tok.encode(few_shot.text(p)) for p in chunk]
        else:
            ids = [render_prompt(tok, p.messages) for p in chunk]
        ids = [i[-(block - max_new_tokens):] for i in ids]
        gen = generate(model, ids, params, tok.stop_ids, tok.pad_id, start_id=tok.bos_id)
        for toks, ended in zip(gen.token_lists(), gen.ended.tolist()):
            text = tok.decode(toks) if few_shot is not None else reply_text(tok, toks)
            if few_shot is not None:
                cut = text.find("\n")
                ended = cut >= 0
                text = text[:cut] if cut >= 0 else text
            out.append((text.strip(), bool(ended)))
        if progress:
            progress.update(len(out))
    return out


class TextStream:
    """Turns one row of generated token ids into text deltas, at a cost per token that does not grow with
    the reply.

    Detokenisation is incremental, as in vLLM and TGI: each token decodes a short window of ids that
    starts at an earlier point where decoding can restart (`p`, the last boundary but one, so that
    decoders that treat a first token differently, such as SentencePiece's leading space, see the same
    context twice and the difference is exact). Byte-level BPE can split a character over several
    tokens; the window's text up to its trailing U+FFFD characters is final (a lossy UTF-8 decoder only
    ever revises the one replacement standing for an unfinished character), the rest waits. A window
    that has not reached a clean end for `max_window` tokens (only a run of invalid bytes does that)
    restarts at its last token.

    Stop strings are matched with one Knuth-Morris-Pratt automaton each over the new characters only, so
    the hold-back (the longest tail that could start a stop string) is the automata's state, not a
    search: the text sent never has to be taken back. The row ends at the end token or at the first stop
    string (the text is cut where it starts), with finish reason "stop"; `finish_length()` ends it for
    running out of tokens.
    """

    max_window = 64  # tokens a window may hold without a clean end before it restarts

    def __init__(self, tok: Tokenizer, stop: Iterable[str] = (), reply: bool = False):
        """`reply`: the ids are a chat reply, whose first space is the format's (`reply_text`), not text."""
        self.tok = tok
        self._lead = reply and _reply_space(tok)  # a leading space to drop
        self.stop = [s for s in stop if s]
        self._fail = [self._failure(s) for s in self.stop]
        self._match = [0] * len(self.stop)  # per stop string: its characters that end the text so far
        self.ids: list[int] = []
        self._pieces: list[str] = []  # the final text, in the pieces it came in (joined on demand)
        self._length = 0  # characters in _pieces
        self._p = 0  # the window: ids[_p:] are decoded at each token
        self._r = 0  # ids[_p:_r] are context the text already holds
        self._used = 0  # characters of the window's decoding already in the text
        self._unsent = ""  # the end of the text not yet handed out (held back for a possible stop string)
        self.n_tokens = 0  # tokens generated, the end token included
        self.finish_reason: str | None = None
        self._cut: int | None = None  # where a stop string starts, once one is found

    @property
    def text(self) -> str:
        """The text so far (cut at a stop string)."""
        text = "".join(self._pieces)
        return text if self._cut is None else text[: self._cut]

    @property
    def length(self) -> int:
        """Characters of final text so far: where the text of the next token will start."""
        return self._length

    def push(self, token: int) -> tuple[str, str | None]:
        """Feed one generated token; returns (new text, finish reason or None)."""
        self.n_tokens += 1
        if token in self.tok.stop_ids:
            return self._finish("stop")
        self.ids.append(token)
        window = self.tok.decode(self.ids[self._p :])
        clean = not window.endswith("\ufffd")
        ready = window if clean else window.rstrip("\ufffd")
        if len(ready) > self._used:
            self._add(ready[self._used :])
            self._used = len(ready)
        if self._cut is not None:
            return self._finish("stop")
        if clean or len(self.ids) - self._p > self.max_window:
            if not clean:  # restart: what the window held is taken as final
                self._add(window[self._used :])
            self._p = self._r if clean else len(self.ids) - 1
            self._r = len(self.ids)
            self._used = len(self.tok.decode(self.ids[self._p :]))
            if self._cut is not None:
                return self._finish("stop")
        hold = max(self._match, default=0)
        delta = self._unsent[: len(self._unsent) - hold]
        self._unsent = self._unsent[len(delta) :]
        return delta, None

    def finish_length(self) -> str:
        """End the row for reaching its token limit; returns the text still held back."""
        return self._finish("length")[0]

    def _add(self, new: str) -> None:
        """Append final text, stepping every stop string's automaton over the new characters; the first
        stop string found (the one that starts first) sets the cut."""
        new = self._unlead(new)
        start = self._length
        self._pieces.append(new)
        self._length += len(new)
        self._unsent += new
        found = []
        for k, (s, fail) in enumerate(zip(self.stop, self._fail)):
            q = self._match[k]
            for i, c in enumerate(new):
                while q and s[q] != c:
                    q = fail[q - 1]
                if s[q] == c:
                    q += 1
                if q == len(s):
                    found.append(start + i + 1 - len(s))
                    break
            self._match[k] = q
        if found and self._cut is None:
            self._cut = min(found)

    def _unlead(self, new: str) -> str:
        """`new` less the reply's leading space, if it is the reply's first text."""
        if self._lead and new:
            self._lead = False
            return new[1:] if new.startswith(" ") else new
        return new

    @staticmethod
    def _failure(s: str) -> list[int]:
        """KMP's table: fail[i] = length of the longest proper prefix of s[: i + 1] that is also its suffix."""
        fail, q = [0] * len(s), 0
        for i in range(1, len(s)):
            while q and s[i] != s[q]:
                q = fail[q - 1]
            if s[i] == s[q]:
                q += 1
            fail[i] = q
        return fail

    def _finish(self, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        if self._cut is None and self.ids:  # flush what the window still holds (an unfinished character)
            window = self.tok.decode(self.ids[self._p :])
            if len(window) > self._used:
                rest = self._unlead(window[self._used :])
                self._pieces.append(rest)
                self._length += len(rest)
                self._unsent += rest
                self._used = len(window)
        if self._cut is not None:  # the cut is never before what was sent: that text was held back
            sent = self._length - len(self._unsent)
            delta = self._unsent[: self._cut - sent]
        else:
            delta = self._unsent
        self._unsent = ""
        return delta, reason
