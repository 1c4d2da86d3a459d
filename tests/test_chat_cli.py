"""The terminal chat: driven with scripted input, in process and through a subprocess."""

import io
import os
import subprocess
import sys

import pytest
import torch
from rich.console import Console
from test_serve import train_tiny_chat_model

import instructgpt.chat_cli as chat_cli
from instructgpt.chat import render_prompt
from instructgpt.chat_cli import chat_command, fit_history, printable, run_chat
from instructgpt.checkpoint import load_model
from instructgpt.cli import main
from instructgpt.errors import UserError
from instructgpt.generate import SamplingParams
from instructgpt.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_chat")
    train_tiny_chat_model(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir).eval(), Tokenizer.load(model_dir / "tokenizer.json")


def scripted(lines):
    it = iter(lines)

    def read(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_chat_answers_keeps_history_and_runs_commands(loaded, monkeypatch):
    model, tok = loaded
    prompts = []
    real_stream = chat_cli.stream

    def spy(model, prompts_, params, *a, **kw):
        prompts.append((list(prompts_[0]), params.temperature))
        return real_stream(model, prompts_, params, *a, **kw)

    monkeypatch.setattr(chat_cli, "stream", spy)
    out = io.StringIO()
    lines = ["hello", "count to five", "/temperature 0.5", "/temperature hot", "/reset", "/system be kind",
             "/bogus", "/temperature 1e-40", "say goodbye", "/quit", "never read"]
    history = run_chat(model, tok, SamplingParams(max_new_tokens=24, temperature=0), Console(file=out, width=200),
                       read=scripted(lines))
    text = out.getvalue()
    assert "assistant> hi there! how can I help you today?\n" in text
    assert "temperature 0.5" in text and "needs a number" in text and "unknown command /bogus" in text
    assert "conversation cleared" in text and "system message set" in text
    hello = {"role": "user", "content": "hello"}
    reply = {"role": "assistant", "content": "hi there! how can I help you today?"}
    # The second turn sees the first exchange, rendered by the one chat template.
    assert prompts[1] == (render_prompt(tok, [hello, reply, {"role": "user", "content": "count to five"}]), 0)
    # After /reset only the system message and the new turn remain; /temperature 1e-40 is too small to divide
    # by, so the engine is asked for greedy decoding (temperature 0) instead of sampling from inf/nan.
    goodbye = {"role": "user", "content": "say goodbye"}
    assert prompts[2] == (render_prompt(tok, [{"role": "system", "content": "be kind"}, goodbye]), 0)
    assert history[0] == goodbye and len(history) == 2 and history[1]["role"] == "assistant"


def test_chat_ends_on_eof_and_reports_the_length_limit(loaded):
    model, tok = loaded
    out = io.StringIO()
    history = run_chat(model, tok, SamplingParams(max_new_tokens=3, temperature=0), Console(file=out, width=200),
                       read=scripted(["hello"]))
    reply = history[1]["content"]
    assert "(length limit)" in out.getvalue() and reply and "hi there! how can I help you today?".startswith(reply)


def test_fit_history_drops_the_oldest_turns(loaded):
    _, tok = loaded
    system = {"role": "system", "content": "s"}
    turns = [{"role": r, "content": "word " * 20} for r in ["user", "assistant"] * 3]
    turns.append({"role": "user", "content": "q"})
    messages = [system] + turns
    drops = []
    ids = fit_history(tok, messages, context=64, on_drop=lambda: drops.append(1))
    assert len(ids) < 64 and messages[0] == system and messages[-1]["content"] == "q" and drops
    assert ids == render_prompt(tok, messages) and messages[1]["role"] == "user"
    with pytest.raises(UserError, match="context"):
        fit_history(tok, [{"role": "user", "content": "word " * 200}], context=64)


def test_chat_command_reads_input(model_dir, monkeypatch, capsys):
    answers = iter(["what does the cat do?", "/quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    chat_command(model_dir, temperature=0, max_new_tokens=30, device="cpu", seed=1)
    assert "the cat sat on the mat." in capsys.readouterr().out


def test_chat_through_a_subprocess(model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    r = subprocess.run([sys.executable, "-m", "instructgpt.cli", "chat", str(model_dir), "--temperature", "0",
                        "--device", "cpu"], input="hello\n/system be kind\n/quit\n", capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert "hi there! how can I help you today?" in r.stdout and "system message set" in r.stdout


def test_chat_refuses_bad_flags(model_dir, capsys):
    with pytest.raises(SystemExit) as e:
        main(["chat", str(model_dir), "--top-p", "0", "--device", "cpu"])
    assert e.value.code == 2 and "top_p must be in (0, 1]" in capsys.readouterr().err


def test_model_text_cannot_drive_the_terminal(loaded, monkeypatch):
    """A reply holding escape sequences (clear screen, set the title, overwrite the line) prints without
    their control characters; newlines and tabs stay."""
    model, tok = loaded
    hostile = "a\x1b[2Jb\x1b]0;pwned\x07c\rd\te\nf\x9b31mg\x00\x7fh"
    assert printable(hostile) == "a[2Jb]0;pwnedcd\te\nf31mgh"
    ids = tok.encode(hostile) + [tok.eos_id]

    def scripted_stream(model, prompts, params, *args, **kwargs):
        for t in ids:
            yield torch.tensor([t]), torch.tensor([0.0]), torch.tensor([True])

    monkeypatch.setattr(chat_cli, "stream", scripted_stream)
    out = io.StringIO()
    history = run_chat(model, tok, SamplingParams(max_new_tokens=64, temperature=0), Console(file=out, width=200),
                       read=scripted(["hi"]))
    text = out.getvalue()
    assert "assistant> a[2Jb]0;pwnedcd" in text and "e\nf31mgh\n" in text  # (rich expands the tab)
    assert not any(c in text for c in "\x1b\x07\r\x9b\x00\x7f")
    assert history[1]["content"] == hostile  # the conversation keeps what the model said
