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

from instructgpt.errors import UserError
from instructgpt.tokenizer import Tokenizer

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
