"""`instructgpt pipeline`: every stage of the recipe, in order, into one run folder.

    world -> prepare (tokenizer + shards) -> pretrain -> sft -> collect -> rm -> ppo, ppo_ptx, dpo -> eval -> report

Each stage writes its own folder and a `done.json` marker last; a stage whose marker exists is skipped,
so a stopped pipeline resumes where it stopped. Stages talk only through these files, so any stage can
also be run by hand with its own command.

The presets size every stage. `tiny` runs on a laptop CPU in minutes; `smoke` is the seconds-long
version the tests run; `small` is meant for one GPU.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Literal

from .errors import UserError

# Sizes per preset. The arithmetic for `tiny`: a 4-layer, 128-dim GPT pretrained on a 1.5 MB corpus
# (about 390k tokens) for 1000 steps of 16 x 128 tokens (2M tokens, five passes); SFT on 2000
# demonstrations for 10 epochs (at 3 its validation loss was still falling fast and the samples that
# collection and PPO draw at temperature 1 were garbled); 1200 prompts x K = 4..9 samples ranked (about
# 24k comparisons, ten times the demonstrations, as the paper had far more comparisons than
# demonstrations); PPO for 30 steps of 64 rollouts with beta 0.2 (at 0.05 the policy exploits the
# reward model: it answered harmful requests with "I don't know", which the reward model never saw
# ranked there and scored above a refusal); DPO for 150 steps of 16 pairs; 800 held-out prompts, so
# that the 95% interval of a win rate is about +-0.035.
PRESETS: dict[str, dict] = {
    "smoke": {
        "world": dict(corpus_chars=150_000, n_sft=200, n_rm=60, n_rl=64, n_eval=40),
        "vocab_size": 512,
        "model": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
        "pretrain": dict(max_steps=60, batch_size=8, lr=2e-3, warmup_steps=10, eval_interval=30, eval_iters=4),
        "sft": dict(epochs=1.0, batch_size=16, lr=1e-3, dropout=0.0),
        "collect": dict(k_min=4, k_max=5, max_new_tokens=16),
        "rm": dict(epochs=1.0, batch_size=8, lr=3e-4),
        "ppo": dict(max_steps=3, batch_size=16, max_new_tokens=16, lr=1e-4, minibatches=2, ppo_epochs=2),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=10, batch_size=8, lr=1e-4),
        "eval": dict(max_new_tokens=16),
    },
    "tiny": {
        "world": dict(corpus_chars=1_500_000, n_sft=2000, n_rm=1200, n_rl=2000, n_eval=800),
        "vocab_size": 2048,
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
        "pretrain": dict(max_steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, eval_interval=200,
                         eval_iters=10),
        "sft": dict(epochs=10.0, batch_size=32, lr=1e-3, dropout=0.1),
        "collect": dict(k_min=4, k_max=9, max_new_tokens=32),
        "rm": dict(epochs=2.0, batch_size=8, lr=5e-4),
        "ppo": dict(max_steps=30, batch_size=64, max_new_tokens=32, lr=5e-5, beta=0.2, minibatches=4,
                    ppo_epochs=4),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=150, batch_size=16, lr=5e-5),
        "eval": dict(max_new_tokens=32),
    },
    "small": {
        "world": dict(corpus_chars=3_000_000, n_sft=2000, n_rm=2000, n_rl=2000, n_eval=400),
        "vocab_size": 4096,
        "model": dict(n_layer=8, n_head=8, n_embd=512, block_size=256),
        "pretrain": dict(max_steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, eval_interval=500,
                         eval_iters=20),
        "sft": dict(epochs=3.0, batch_size=32, lr=2e-4, dropout=0.1),
        "collect": dict(k_min=4, k_max=9, max_new_tokens=48),
        "rm": dict(epochs=1.0, batch_size=8, lr=5e-5),
        "ppo": dict(max_steps=100, batch_size=128, max_new_tokens=48, lr=1e-5, minibatches=4, ppo_epochs=4),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=600, batch_size=32, lr=1e-5),
        "eval": dict(max_new_tokens=48),
    },
}

STAGES = ("world", "prepare", "pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "dpo", "eval", "report")


def _done(path: Path) -> bool:
    return path.exists()


def pipeline_command(
    preset: Literal["smoke", "tiny", "small"] = "tiny",
    out: Path = Path("runs/tiny"),
    seed: int = 0,
    device: str = "auto",
    stages: list[str] | None = None,
    demo_habits: bool = True,
) -> None:
    """Run the whole InstructGPT recipe on the embedded instruction world, skipping finished stages.

    Args:
        preset: size of every stage: smoke (seconds, for tests), tiny (minutes on a laptop CPU), small (one GPU).
        out: the run folder (see the README for its layout).
        seed: seeds the world and every stage.
        device: auto, cpu, cuda, cuda:N.
        stages: run only these stages (their inputs must exist), e.g. --stages eval report.
        demo_habits: the world's demonstrations carry their writers' habits (see `instructgpt world`);
            --no-demo-habits gives the labeler's own replies, a world in which SFT leaves RL little to fix.
    """
    from .collect import collect_command
    from .dpo import dpo_command
    from .evaluate import eval_command
    from .ppo import ppo_command
    from .prepare import prepare_command
    from .pretrain import pretrain_command
    from .report import report_command
    from .rm import rm_command
    from .sft import sft_command
    from .world.command import world_command

    p = PRESETS[preset]
    run = Path(out)
    unknown = sorted(set(stages or []) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    run.mkdir(parents=True, exist_ok=True)
    manifest_path = run / "pipeline.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    if manifest and (manifest.get("preset"), manifest.get("seed"), manifest.get("demo_habits", True)) != (
            preset, seed, demo_habits):
        habits = "with" if manifest.get("demo_habits", True) else "without"
        raise UserError(f"{run} holds a pipeline run with preset {manifest.get('preset')!r}, seed "
                        f"{manifest.get('seed')} and {habits} demonstration habits; choose another --out")
    manifest |= {"preset": preset, "seed": seed, "demo_habits": demo_habits, "config": p}
    manifest.setdefault("stage_seconds", {})

    def stage(name: str, marker: Path, fn) -> None:
        if stages is not None and name not in stages:
            return
        if marker.exists() and stages is None:
            print(f"[pipeline] {name}: done, skipped")
            return
        print(f"[pipeline] {name} ...")
        t0 = time.time()
        fn()
        manifest["stage_seconds"][name] = round(time.time() - t0, 2)
        manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    world = run / "world"
    data = run / "data"
    rankings = data / "rankings.jsonl"
    common = dict(seed=seed, device=device)

    def do_world():
        if world.exists():
            shutil.rmtree(world)  # an earlier attempt stopped mid-way (no done marker)
        world_command(out=world, seed=seed, demo_habits=demo_habits, **p["world"])
        (world / "done.json").write_text("{}\n")

    def do_prepare():
        if data.exists():
            shutil.rmtree(data)
        prepare_command(inputs=[world / "corpus.txt"], out=data, tokenizer="bpe", vocab_size=p["vocab_size"],
                        seed=seed)
        (run / "tokenizer").mkdir(exist_ok=True)
        shutil.copy(data / "tokenizer.json", run / "tokenizer" / "tokenizer.json")

    stage("world", world / "done.json", do_world)
    stage("prepare", data / "meta.json", do_prepare)
    stage("pretrain", run / "pretrain" / "done.json", lambda: pretrain_command(
        data=data, out=run / "pretrain", resume=(run / "pretrain").exists(), **p["model"], **p["pretrain"],
        **common))
    stage("sft", run / "sft" / "done.json", lambda: sft_command(
        init=run / "pretrain", data=[world / "sft_train.jsonl"], out=run / "sft",
        resume=(run / "sft").exists(), **p["sft"], **common))
    stage("collect", rankings, lambda: collect_command(
        policy=run / "sft", prompts=world / "prompts_rm.jsonl", out=rankings, world=world, **p["collect"],
        **common))
    stage("rm", run / "rm" / "done.json", lambda: rm_command(
        init=run / "sft", data=[rankings], demos=[world / "sft_train.jsonl"], out=run / "rm",
        resume=(run / "rm").exists(), **p["rm"], **common))
    stage("ppo", run / "ppo" / "done.json", lambda: ppo_command(
        policy=run / "sft", reward=run / "rm", prompts=world / "prompts_rl.jsonl", out=run / "ppo",
        resume=(run / "ppo").exists(), **p["ppo"], **common))
    stage("ppo_ptx", run / "ppo_ptx" / "done.json", lambda: ppo_command(
        policy=run / "sft", reward=run / "rm", prompts=world / "prompts_rl.jsonl", out=run / "ppo_ptx",
        ptx_coef=p["ptx_coef"], ptx_data=data, resume=(run / "ppo_ptx").exists(), **p["ppo"], **common))
    stage("dpo", run / "dpo" / "done.json", lambda: dpo_command(
        init=run / "sft", data=[rankings], out=run / "dpo", resume=(run / "dpo").exists(), **p["dpo"],
        **common))
    stage("eval", run / "eval" / "results.json", lambda: eval_command(
        run=run, world=world, **p["eval"], **common))
    results_path = run / "eval" / "results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())
        results |= {"preset": preset, "seed": seed, "stage_seconds": manifest["stage_seconds"]}
        results_path.write_text(json.dumps(results, indent=2) + "\n")
    stage("report", run / "report.html", lambda: report_command(run=run))
    print(f"[pipeline] finished: report at {run / 'report.html'} (and {run / 'report.md'})")
