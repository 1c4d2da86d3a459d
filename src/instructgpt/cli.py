"""The `instructgpt` command: one subcommand per stage or app.

A stage's command is a function of one typed dataclass of arguments (`sft_command(args: SFTArgs)`): tyro turns
the dataclass into flags, with the field comments as help, and `recipe.parse_args` adds `--config FILE`, a
YAML, TOML or JSON recipe whose values the flags override. Shared settings are nested dataclasses with flat
flags, so the same flag means the same thing in every command (`--out`, `--init`, `--seed`, `--device`,
`--dtype`, `--batch-size`, `--max-steps`, `--resume`, `--report-to`). Apps that are not stages (chat, serve,
import-hf, ...) keep plain typed keyword arguments.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

from .chat_cli import chat_command
from .collect import collect_command
from .distributed import finish_distributed
from .dpo import dpo_command
from .errors import UserError
from .evaluate import eval_command
from .hf import import_command
from .hf_export import export_command
from .pipeline import pipeline_command
from .ppo import ppo_command
from .prepare import prepare_command
from .pretrain import pretrain_command
from .recipe import args_class, parse_args
from .report import report_command
from .rm import rm_command
from .serve import serve_command
from .sft import sft_command
from .world.command import world_command

# name -> command, in the order of the recipe.
COMMANDS: dict[str, Callable] = {
    "pipeline": pipeline_command,
    "world": world_command,
    "prepare": prepare_command,
    "pretrain": pretrain_command,
    "sft": sft_command,
    "collect": collect_command,
    "rm": rm_command,
    "ppo": ppo_command,
    "dpo": dpo_command,
    "eval": eval_command,
    "report": report_command,
    "import-hf": import_command,
    "export-hf": export_command,
    "chat": chat_command,
    "serve": serve_command,
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in COMMANDS.items()]
    return ("usage: instructgpt COMMAND [--help] [--config FILE] [FLAGS]\n\n"
            "The InstructGPT recipe, stage by stage. Commands:\n" + "\n".join(lines) + "\n")


def run(name: str, argv: list[str]) -> None:
    import tyro

    command = COMMANDS[name]
    prog = f"instructgpt {name}"
    cls = args_class(command)
    if cls is None:
        tyro.cli(command, args=argv, prog=prog)
        return
    description = inspect.cleandoc(command.__doc__ or "")
    command(parse_args(cls, argv, prog, description))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), end="")
        raise SystemExit(0 if argv else 2)
    if argv[0] not in COMMANDS:
        print(usage(), end="", file=sys.stderr)
        print(f"instructgpt: error: unknown command {argv[0]!r}", file=sys.stderr)
        raise SystemExit(2)
    try:
        run(argv[0], argv[1:])
    except (UserError, FileNotFoundError) as e:
        # A mistake the user can fix (a flag, a file): one line that names it. Any other exception, a ValueError
        # included, is a bug or a broken state and keeps its traceback. INSTRUCTGPT_DEBUG=1: a traceback always.
        if os.environ.get("INSTRUCTGPT_DEBUG"):
            raise
        print(f"instructgpt: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finish_distributed()  # under torchrun: every rank finished; leave the process group together


if __name__ == "__main__":
    main()
