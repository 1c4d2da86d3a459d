"""The `instructgpt` command: one subcommand per stage.

Each subcommand is a plain function with typed keyword arguments (tyro turns them into flags, with
the docstring as help). Stages register here by name; the same flag means the same thing everywhere
(`--out`, `--init`, `--seed`, `--device`, `--dtype`, `--batch-size`, `--max-steps`).
"""

from __future__ import annotations

import importlib
import os
import sys

# name -> "module:function", in the order of the recipe.
COMMANDS: dict[str, str] = {
    "pipeline": "instructgpt.pipeline:pipeline_command",
    "world": "instructgpt.world.command:world_command",
    "prepare": "instructgpt.prepare:prepare_command",
    "pretrain": "instructgpt.pretrain:pretrain_command",
    "sft": "instructgpt.sft:sft_command",
    "collect": "instructgpt.collect:collect_command",
    "rm": "instructgpt.rm:rm_command",
    "ppo": "instructgpt.ppo:ppo_command",
    "dpo": "instructgpt.dpo:dpo_command",
    "eval": "instructgpt.evaluate:eval_command",
    "report": "instructgpt.report:report_command",
    "import-hf": "instructgpt.hf:import_command",
    "export-hf": "instructgpt.hf:export_command",
    "chat": "instructgpt.chat_cli:chat_command",
    "serve": "instructgpt.serve:serve_command",
}


def _load(spec: str):
    module, func = spec.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = sys.argv[1:] if argv is None else argv
    commands = {name: _load(spec) for name, spec in COMMANDS.items()}
    try:
        tyro.extras.subcommand_cli_from_dict(commands, args=argv, prog="instructgpt")
    except (ValueError, FileNotFoundError) as e:
        # ValueError covers UserError and the models' own checks; set INSTRUCTGPT_DEBUG=1 for a traceback.
        if os.environ.get("INSTRUCTGPT_DEBUG"):
            raise
        print(f"instructgpt: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from .distributed import finish_distributed

    finish_distributed()  # under torchrun: every rank finished; leave the process group together


if __name__ == "__main__":
    main()
