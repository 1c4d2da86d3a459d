"""`instructgpt chat`: talk to a model in the terminal.

The conversation is kept as a list of messages and rendered with the one chat template on every turn,
so the model sees exactly the ids it was trained on; the reply streams token by token from the one
generation engine. `TextStream` (token ids in, text out, stop strings honoured) is shared with the
server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

import torch
import tyro
from rich.console import Console

from .chat import TextStream, render_prompt
from .errors import UserError
from .generate import SamplingParams, stream
from .tokenizer import Tokenizer

HELP = """commands:
  /reset            forget the conversation (the system message stays)
  /system TEXT      set the system message (/system alone removes it)
  /temperature X    sampling temperature, 0 for greedy decoding
  /help             this list
  /quit             leave (so does Ctrl-D)"""


# C0 and C1 control characters (and DEL) but newline and tab: a model's text must not drive the terminal
# (ESC [2J clears it, OSC sequences set its title or clipboard, a carriage return overwrites the line).
CONTROLS = dict.fromkeys([c for c in range(0x20) if c not in (0x09, 0x0A)] + [0x7F, *range(0x80, 0xA0)])


def printable(text: str) -> str:
    """Model text safe to print: control characters other than newline and tab removed."""
    return text.translate(CONTROLS)


def context_size(model: torch.nn.Module) -> int:
    return model.config.block_size


def fit_history(
    tok: Tokenizer, messages: list[dict], context: int, on_drop: Callable[[], None] = lambda: None
) -> list[int]:
    """Ids of the prompt, dropping the oldest turns (never the system message nor the last user
    message) until at least one new token fits in the context; raises UserError when even the last
    message alone is too long."""
    while True:
        ids = render_prompt(tok, messages)
        if len(ids) < context:
            return ids
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            raise UserError(f"the message is {len(ids)} tokens with the template; the model's context is {context}")
        # Drop the oldest exchange: a user message and the replies that follow it.
        end = first + 1
        while end < len(messages) - 1 and messages[end]["role"] != "user":
            end += 1
        del messages[first:end]
        on_drop()


def run_chat(
    model: torch.nn.Module,
    tok: Tokenizer,
    params: SamplingParams,
    console: Console,
    read: Callable[[str], str] | None = None,
    system: str | None = None,
    generator: torch.Generator | None = None,
) -> list[dict]:
    """The chat loop: read a line (`read`, default `input`), run a command or answer it; returns the
    conversation at the end."""
    read = read or input
    history: list[dict] = []
    context = context_size(model)
    console.print(f"[dim]chatting with a {context}-token model; /help for commands[/dim]")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            arg = arg.strip()
            if cmd in ("/quit", "/exit"):
                break
            elif cmd == "/reset":
                history.clear()
                console.print("[dim]conversation cleared[/dim]")
            elif cmd == "/system":
                system = arg or None
                console.print(f"[dim]system message {'set' if system else 'removed'}[/dim]")
            elif cmd == "/temperature":
                try:
                    value = float(arg)
                    if not value >= 0:
                        raise ValueError
                except ValueError:
                    console.print(f"[red]/temperature needs a number >= 0, got {arg!r}[/red]")
                    continue
                params.temperature = value
                console.print(f"[dim]temperature {value}[/dim]")
            elif cmd == "/help":
                console.print(HELP, markup=False, highlight=False)
            else:
                console.print(f"[red]unknown command {cmd}[/red]; /help lists them")
            continue

        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history

        def dropped() -> None:
            console.print("[dim](the oldest turn was dropped to fit the context)[/dim]")

        try:
            prompt = fit_history(tok, messages, context, dropped)
        except UserError as e:
            console.print(f"[red]{e}[/red]")
            history.pop()
            continue
        history[:] = messages[1:] if system else messages
        reply = _reply(model, tok, prompt, params, console, generator, context)
        history.append({"role": "assistant", "content": reply})
    return history


def _reply(model, tok, prompt: Sequence[int], params: SamplingParams, console: Console, generator, context: int) -> str:
    step = SamplingParams(
        max_new_tokens=min(params.max_new_tokens, context - len(prompt)),
        # A temperature too small to divide by (1/T overflows to inf) decodes greedily, as the server does.
        temperature=params.temperature if params.temperature >= 1e-5 else 0.0,
        top_k=params.top_k,
        top_p=params.top_p,
    )
    out = TextStream(tok, reply=True)
    console.print("[bold cyan]assistant>[/bold cyan] ", end="")
    try:
        for token, _, _ in stream(model, [prompt], step, tok.stop_ids, tok.pad_id, generator, start_id=tok.bos_id):
            delta, finish = out.push(int(token[0]))
            console.print(printable(delta), end="", markup=False, highlight=False, soft_wrap=True)
            if finish:
                break
        else:
            console.print(printable(out.finish_length()), end="", markup=False, highlight=False, soft_wrap=True)
            console.print(" [dim](length limit)[/dim]", end="")
    except KeyboardInterrupt:
        console.print(" [dim](interrupted)[/dim]", end="")
    console.print()
    return out.text


def chat_command(
    model: Annotated[Path, tyro.conf.Positional],
    temperature: float = 0.7,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    seed: int | None = None,
    device: str = "auto",
    system: str | None = None,
) -> None:
    """Chat with a model in the terminal; the reply streams as it is generated.

    Args:
        model: a model folder (model.safetensors, config.json, tokenizer.json), e.g. RUN/sft.
        temperature: sampling temperature; 0 decodes greedily (also /temperature X during the chat).
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches p.
        top_k: keep only the k most likely tokens (0: all).
        max_new_tokens: longest reply, in tokens (also bounded by the model's context).
        seed: seeds the sampling, so that a session can be replayed.
        device: auto, cpu or cuda[:N].
        system: a system message to start with (also /system TEXT during the chat).
    """
    from .checkpoint import load_model
    from .distributed import resolve_device

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    try:
        params.validate()
    except ValueError as e:
        raise UserError(str(e).replace("max_new_tokens", "--max-new-tokens")) from None
    dev = resolve_device(device)
    folder = Path(model)
    tok = Tokenizer.load(folder / "tokenizer.json")
    net = load_model(folder, device=dev)
    generator = torch.Generator(device=dev).manual_seed(seed) if seed is not None else None
    console = Console(highlight=False)
    echo = not sys.stdin.isatty()  # piped input is not shown by the terminal: show it, for a readable transcript

    def read(prompt: str) -> str:
        line = input(prompt)
        if echo:
            console.print(line, markup=False)
        return line

    run_chat(net, tok, params, console, read=read, system=system, generator=generator)
