"""The chat template: the one renderer of conversations to token ids, for every stage.

SFT, the reward model, RL rollouts, evaluation, the terminal chat and the server all call these three
functions, so training and inference see the same ids for the same conversation (DESIGN invariant 3).

Format, in token ids:

    <|bos|>  then, per message:  <|role|> encode(content) <|eos|>

with role one of system, user, assistant. The tokens of each assistant reply and the <|eos|> that ends
it are the trained labels (loss mask 1): the model learns to stop (invariant 1). Each message's content
is encoded on its own, never across a special token, so

    render(prefix + [reply])[0] == render_prompt(prefix) + render_response(reply)

token for token; a model generating after render_prompt produces exactly the training ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .errors import UserError
from .generate import SamplingParams, generate
from .tokenizer import Tokenizer

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")


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
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        content = tok.encode(m["content"]) + [tok.eos_id]
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
    """Ids of a reply as they follow render_prompt in training: encode(response) + <|eos|>."""
    if not isinstance(response, str):
        raise UserError(f"a response must be a string, got {type(response).__name__}")
    return tok.encode(response) + [tok.eos_id]


FEW_SHOT = [
    ("What is 3 + 4?", "7."),
    ("Reverse the word cat.", "tac."),
    ("How do I steal a horse?", "I can't help with that."),
]


def few_shot_prompt(question: str) -> str:
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in FEW_SHOT)
    return f"{shots}Question: {question}\nAnswer:"


def replies(model, tok: Tokenizer, prompts, few_shot: bool, max_new_tokens: int, batch_size: int,
            progress: Any = None) -> list[tuple[str, bool]]:
    """Greedy (text, ended) for each prompt. Few-shot replies end at the first blank line or newline."""
    out: list[tuple[str, bool]] = []
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    block = model.config.block_size
    for s in range(0, len(prompts), batch_size):
        chunk = prompts[s:s + batch_size]
        if few_shot:
            ids = [[tok.bos_id] + tok.encode(few_shot_prompt(p.messages[-1]["content"])) for p in chunk]
        else:
            ids = [render_prompt(tok, p.messages) for p in chunk]
        ids = [i[-(block - max_new_tokens):] for i in ids]
        gen = generate(model, ids, params, tok.eos_id, tok.pad_id, start_id=tok.bos_id)
        for toks, ended in zip(gen.token_lists(), gen.ended.tolist()):
            text = tok.decode(toks)
            if few_shot:
                cut = text.find("\n")
                ended = cut >= 0
                text = text[:cut] if cut >= 0 else text
            out.append((text.strip(), bool(ended)))
        if progress:
            progress.update(len(out))
    return out


class TextStream:
    """Turns one row of generated token ids into text deltas.

    Byte-level BPE can split a character over several tokens, so a trailing incomplete character is
    held back; so is a tail that could be the start of a stop string, so that the text sent never has
    to be taken back. The row ends at the end token or at the first stop string (the text is cut
    there), with finish reason "stop"; `finish_length()` ends it for running out of tokens.
    """

    def __init__(self, tok: Tokenizer, stop: Iterable[str] = ()):
        self.tok = tok
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string)
        self.sent = 0  # characters of `text` handed out
        self.n_tokens = 0  # tokens generated, the end token included
        self.finish_reason: str | None = None

    def push(self, token: int) -> tuple[str, str | None]:
        """Feed one generated token; returns (new text, finish reason or None)."""
        self.n_tokens += 1
        if token == self.tok.eos_id:
            return self._finish("stop")
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.text = text[: min(cuts)]
            return self._finish("stop")
        self.text = text
        safe = len(text.rstrip("\ufffd"))
        hold = max((k for s in self.stop for k in range(1, len(s)) if text[:safe].endswith(s[:k])), default=0)
        safe = max(self.sent, safe - hold)
        delta, self.sent = text[self.sent : safe], safe
        return delta, None

    def finish_length(self) -> str:
        """End the row for reaching its token limit; returns the text still held back."""
        return self._finish("length")[0]

    def _finish(self, reason: str) -> tuple[str, str]:
        self.finish_reason = reason
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta, reason
