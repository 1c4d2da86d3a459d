"""`instructgpt world`: generate the instruction world into a folder."""

from __future__ import annotations

import json
from pathlib import Path

from .corpus import WorldSizes, write_world


def world_command(
    out: Path,
    seed: int = 0,
    corpus_chars: int = 3_000_000,
    n_sft: int = 2000,
    n_rm: int = 2000,
    n_rl: int = 2000,
    n_eval: int = 400,
    demo_habits: bool = True,
) -> None:
    """Generate the instruction world: a pretraining corpus, SFT demonstrations, prompts for the reward
    model, RL and evaluation, and world.json (the facts the scripted labeler needs).

    Args:
        out: a new (or empty) folder to write.
        seed: the world's seed; the same seed writes byte-identical files.
        corpus_chars: about how many characters of pretraining text (corpus_heldout.txt gets 5% of this).
        n_sft: demonstrations in sft_train.jsonl.
        n_rm: prompts in prompts_rm.jsonl (for collecting comparisons).
        n_rl: prompts in prompts_rl.jsonl (for PPO).
        n_eval: held-out prompts in prompts_eval.jsonl.
        demo_habits: demonstrations carry their writers' habits (world.DEMO_HABITS: over-refusal, padding,
            ...) that the labeler's guidelines do not ask for; --no-demo-habits writes the labeler's own
            replies.
    """
    stats = write_world(out, seed, WorldSizes(corpus_chars, n_sft, n_rm, n_rl, n_eval),
                        demo_habits)
    print(f"wrote the instruction world (seed {seed}) to {out}")
    print(json.dumps(stats, indent=1))
