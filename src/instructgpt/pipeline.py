"""`instructgpt pipeline`: every stage of the recipe, in order, into one run folder.

    world -> prepare (tokenizer + shards) -> pretrain -> sft -> collect -> rm -> ppo, ppo_ptx, dpo -> eval -> report
                                                               `-> grpo (verifiable rewards) ------------^

Each stage writes its own folder and a marker last (`done.json`; for collect its rankings file, for eval its
results.json); a stage whose marker exists is skipped, so a stopped pipeline resumes where it stopped (and a
stage stopped mid-way resumes from its own checkpoints or chunks). RUN/pipeline.json records, for each stage,
the fingerprints of the stages it read (`INPUTS`) and the preset's settings it ran with (`SETTINGS`): a
finished stage whose inputs have changed since, because an earlier stage ran again (e.g. `--stages collect`),
or whose settings in the preset have, runs again too. Stages talk only through these files, so any stage can
also be run by hand with its own command.

`grpo` is RL with verifiable rewards next to the paper's RLHF: GRPO from the SFT model on the capability
families' prompts of the world's RL split (RUN/grpo/prompts.jsonl, never an evaluation prompt), rewarded by
the world's checker (`--reward-fn world`), no reward model. It reads only sft and the world, so it changes
nothing any other model stage sees.

`--recipe FILE` runs the stages a recipe file names, on the user's own files, instead of the world's (see
`run_recipe`).

The presets size every stage. `tiny` runs on a laptop CPU in minutes; `smoke` is the seconds-long
version the tests run; `small` is meant for one GPU.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

from .checkpoint import DONE, atomic_write, write_json_atomic
from .collect import collect_command
from .dpo import dpo_command
from .errors import UserError
from .evaluate import eval_command
from .ppo import ppo_command
from .prepare import prepare_command
from .pretrain import pretrain_command
from .recipe import args_class, build, call, read_recipe_file
from .records import file_digest, read_json_file
from .report import report_command
from .rm import rm_command
from .sft import sft_command
from .tokenizer import Tokenizer
from .world.command import world_command
from .world.world import CAPABILITY_FAMILIES

# Sizes per preset. The arithmetic for `tiny`: a 4-layer, 128-dim GPT pretrained on a 1.5 MB corpus
# (about 390k tokens) for 1000 steps of 16 x 128 tokens (2M tokens, five passes); SFT on 2000
# demonstrations for 4 epochs at lr 1e-3 with half of each batch's sequences pretraining windows (10 epochs
# without them overfit the demonstrations' content: the model answered about held-out words with training
# words, and its held-out pretraining loss went from 1.9 to 7.4). Held-out exact match of SFT on the capability
# families, seed 0 (where it was chosen): a quarter of windows 0.306, half 0.386, 60% 0.354, half for 3 epochs
# 0.311, a quarter at lr 3e-4 0.121, a quarter for 2 epochs 0.199; seeds 1 and 2, a quarter against half: 0.269
# -> 0.306, 0.269 -> 0.370 (the words' spellings, reversals and capitals that the corpus states are kept);
# 1200 prompts x K = 4..9 samples ranked (about
# 24k comparisons, ten times the demonstrations, as the paper had far more comparisons than
# demonstrations); PPO for 30 steps of 64 rollouts with beta 0.2 (at 0.05 the policy exploits the
# reward model: it answered harmful requests with "I don't know", which the reward model never saw
# ranked there and scored above a refusal); DPO for 150 steps of 16 pairs; 800 held-out prompts, so
# that the 95% interval of a win rate is about +-0.035. GRPO for 120 steps of 8 capability prompts x G = 8
# samples at lr 3e-5, one pass each (with G = 4 most groups were all wrong or all right and taught nothing), 24
# new tokens (answers are short; a reply cut off there loses the missing-end penalty, which is how GRPO drops the
# demonstrators' pleasantries). Chosen on seed 0's SFT model (exact match 0.306), greedy held-out exact match
# after GRPO: 60 steps at lr 2e-4 (the earlier preset, for an SFT model that answered 8% right) 0.228, reverse
# 0.89 -> 0.42 and refusing harmful requests 0.83 -> 0.24; 60 at 5e-5 0.349; 120 at 5e-5 0.354; 120 at 3e-5
# 0.370 (win rate 0.575, refusals 0.97); 180 at 3e-5 0.354; temperature 0.7 0.269. pass@k on the first 16
# prompts of each capability family x 8 samples.
PRESETS: dict[str, dict] = {
    "smoke": {
        "world": dict(corpus_chars=150_000, n_sft=200, n_rm=60, n_rl=64, n_eval=40),
        "vocab_size": 512,
        "model": dict(n_layer=2, n_head=2, n_embd=64, block_size=128),
        "pretrain": dict(max_steps=60, batch_size=8, lr=2e-3, warmup_steps=10, eval_interval=30, eval_iters=4),
        "sft": dict(epochs=1.0, batch_size=16, lr=1e-3, dropout=0.0, ptx_fraction=0.25),
        "collect": dict(k_min=4, k_max=5, max_new_tokens=16),
        "rm": dict(epochs=1.0, batch_size=8, lr=3e-4),
        "ppo": dict(max_steps=3, batch_size=16, max_new_tokens=16, lr=1e-4, minibatches=2, ppo_epochs=2),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=10, batch_size=8, lr=1e-4),
        "grpo": dict(estimator="grpo", group_size=4, max_steps=3, batch_size=16, max_new_tokens=12, lr=1e-4,
                     minibatches=2, ppo_epochs=1),
        "eval": dict(max_new_tokens=16, pass_prompts=2, pass_n=4, pass_k=2),
    },
    "tiny": {
        "world": dict(corpus_chars=1_500_000, n_sft=2000, n_rm=1200, n_rl=2000, n_eval=800),
        "vocab_size": 2048,
        "model": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
        "pretrain": dict(max_steps=1000, batch_size=16, lr=2e-3, warmup_steps=50, eval_interval=200,
                         eval_iters=10),
        "sft": dict(epochs=4.0, batch_size=32, lr=1e-3, dropout=0.1, ptx_fraction=0.5),
        "collect": dict(k_min=4, k_max=9, max_new_tokens=32),
        "rm": dict(epochs=2.0, batch_size=8, lr=5e-4),
        "ppo": dict(max_steps=30, batch_size=64, max_new_tokens=32, lr=5e-5, beta=0.2, minibatches=4,
                    ppo_epochs=4),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=150, batch_size=16, lr=5e-5),
        "grpo": dict(estimator="grpo", group_size=8, max_steps=120, batch_size=64, max_new_tokens=24, lr=3e-5,
                     beta=0.04, minibatches=2, ppo_epochs=1),
        "eval": dict(max_new_tokens=32, pass_prompts=16, pass_n=8, pass_k=4),
    },
    "small": {
        "world": dict(corpus_chars=3_000_000, n_sft=2000, n_rm=2000, n_rl=2000, n_eval=400),
        "vocab_size": 4096,
        "model": dict(n_layer=8, n_head=8, n_embd=512, block_size=256),
        "pretrain": dict(max_steps=3000, batch_size=64, lr=1e-3, warmup_steps=100, eval_interval=500,
                         eval_iters=20),
        "sft": dict(epochs=3.0, batch_size=32, lr=2e-4, dropout=0.1, ptx_fraction=0.25),
        "collect": dict(k_min=4, k_max=9, max_new_tokens=48),
        "rm": dict(epochs=1.0, batch_size=8, lr=5e-5),
        "ppo": dict(max_steps=100, batch_size=128, max_new_tokens=48, lr=1e-5, minibatches=4, ppo_epochs=4),
        "ptx_coef": 1.0,
        "dpo": dict(max_steps=600, batch_size=32, lr=1e-5),
        "grpo": dict(estimator="grpo", group_size=8, max_steps=100, batch_size=128, max_new_tokens=32, lr=1e-5,
                     beta=0.04, minibatches=2, ppo_epochs=2),
        "eval": dict(max_new_tokens=48, pass_prompts=16, pass_n=16, pass_k=8),
    },
}

STAGES = ("world", "prepare", "pretrain", "sft", "collect", "rm", "ppo", "ppo_ptx", "dpo", "grpo", "eval",
          "report")

# The stages whose results each stage reads.
INPUTS: dict[str, tuple[str, ...]] = {
    "world": (), "prepare": ("world",), "pretrain": ("prepare",), "sft": ("pretrain", "world", "prepare"),
    "collect": ("sft", "world"), "rm": ("sft", "collect", "world"), "ppo": ("sft", "rm", "world"),
    "ppo_ptx": ("sft", "rm", "world", "prepare"), "dpo": ("sft", "collect"), "grpo": ("sft", "world"),
    "eval": ("world", "pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo"),
    "report": ("eval", "pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo"),
}
# The entries of the preset each stage runs with.
SETTINGS: dict[str, tuple[str, ...]] = {
    "world": ("world",), "prepare": ("vocab_size",), "pretrain": ("model", "pretrain"), "sft": ("sft",),
    "collect": ("collect",), "rm": ("rm",), "ppo": ("ppo",), "ppo_ptx": ("ppo", "ptx_coef"), "dpo": ("dpo",),
    "grpo": ("grpo",), "eval": ("eval",), "report": (),
}
MODEL_STAGES = ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo")
# The files (under RUN) by which a stage's result is known, its marker among them: their digests are the
# stage's fingerprint. A model stage's done.json and weights; the world's every file; prepare's index and
# tokenizer (meta.json counts the tokens of every shard).
RESULT_FILES: dict[str, tuple[str, ...]] = {
    "world": ("world",), "prepare": ("data/meta.json", "data/tokenizer.json"),
    **{s: (f"{s}/{DONE}", f"{s}/model.safetensors") for s in MODEL_STAGES},
    "collect": ("collect/rankings.jsonl",), "eval": ("eval/results.json",),
}


@dataclass
class PipelineArgs:
    # the size of every stage: smoke (seconds, for tests), tiny (minutes on a laptop CPU), small (one GPU)
    preset: Literal["smoke", "tiny", "small"] = "tiny"
    out: Path = Path("runs/tiny")  # the run folder (see the README for its layout)
    seed: int = 0  # seeds the world and every stage
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    stages: list[str] | None = None  # run only these stages (their inputs must exist), e.g. --stages eval report
    # the world's demonstrations carry their writers' habits (see `instructgpt world`); --no-demo-habits gives the
    # labeler's own replies, a world in which SFT leaves RL little to fix
    demo_habits: bool = True
    recipe: Path | None = None  # a YAML/TOML file of stages to run on your own files instead of the world


def pipeline_command(args: PipelineArgs) -> None:
    """Run the whole InstructGPT recipe on the embedded instruction world, skipping finished stages."""
    if args.recipe is not None:
        run_recipe(args.recipe, args.out, args.seed, args.device)
        return
    unknown = sorted(set(args.stages or []) - set(STAGES))
    if unknown:
        raise UserError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    p = PRESETS[args.preset]
    run = Path(args.out)
    manifest = read_manifest(run, args)
    stage = stage_runner(run, manifest, args.stages, p)
    world, data = run / "world", run / "data"
    rankings = run / "collect" / "rankings.jsonl"  # not in data/, which prepare replaces whole
    common = dict(seed=args.seed, device=args.device)

    def resume(name: str) -> dict:
        return {"out": run / name, "resume": (run / name).exists()}

    stage("world", world / DONE, lambda: make_world(world, args.seed, args.demo_habits, p))
    stage("prepare", data / "meta.json", lambda: prepare_data(run, world, data, args.seed, p))
    stage("pretrain", run / "pretrain" / DONE, lambda: call(
        pretrain_command, data=data, **resume("pretrain"), **p["model"], **p["pretrain"], **common))
    stage("sft", run / "sft" / DONE, lambda: call(
        sft_command, init=run / "pretrain", data=[world / "sft_train.jsonl"], ptx_data=data, **resume("sft"),
        **p["sft"],
        **common))
    stage("collect", rankings, lambda: call(
        collect_command, init=run / "sft", prompts=world / "prompts_rm.jsonl", out=rankings, world=world,
        **p["collect"], **common))
    stage("rm", run / "rm" / DONE, lambda: call(
        rm_command, init=run / "sft", data=[rankings], demos=[world / "sft_train.jsonl"], **resume("rm"),
        **p["rm"], **common))
    stage("ppo", run / "ppo" / DONE, lambda: call(
        ppo_command, init=run / "sft", reward=run / "rm", prompts=world / "prompts_rl.jsonl", **resume("ppo"),
        **p["ppo"], **common))
    stage("ppo_ptx", run / "ppo_ptx" / DONE, lambda: call(
        ppo_command, init=run / "sft", reward=run / "rm", prompts=world / "prompts_rl.jsonl",
        ptx_coef=p["ptx_coef"], ptx_data=data, **resume("ppo_ptx"), **p["ppo"], **common))
    stage("dpo", run / "dpo" / DONE, lambda: call(
        dpo_command, init=run / "sft", data=[rankings], **resume("dpo"), **p["dpo"], **common))
    stage("grpo", run / "grpo" / DONE, lambda: call(  # --resume first: the prompts file makes the folder
        ppo_command, init=run / "sft", **resume("grpo"), reward_fn=["world"], world=world,
        prompts=capability_prompts(world / "prompts_rl.jsonl", run / "grpo" / "prompts.jsonl"), **p["grpo"],
        **common))
    stage("eval", run / "eval" / "results.json", lambda: call(
        eval_command, run=run, world=world, **p["eval"], **common))
    stage("report", run / "report.html", lambda: report_command(run=run))  # preset, seed, seconds: pipeline.json
    print(f"[pipeline] finished: report at {run / 'report.html'} (and {run / 'report.md'})")


def read_manifest(run: Path, args: PipelineArgs) -> dict:
    """RUN/pipeline.json: the preset, seed and world of the run, the seconds of each stage and the fingerprints
    of the inputs each stage ran on; a run folder of another kind is refused."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / "pipeline.json"
    manifest = read_json_file(path) if path.exists() else {}
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: expected a JSON object (the pipeline's manifest)")
    if manifest and (manifest.get("preset"), manifest.get("seed"), manifest.get("demo_habits", True)) != (
            args.preset, args.seed, args.demo_habits):
        habits = "with" if manifest.get("demo_habits", True) else "without"
        raise UserError(f"{run} holds a pipeline run with preset {manifest.get('preset')!r}, seed "
                        f"{manifest.get('seed')} and {habits} demonstration habits; choose another --out")
    manifest |= {"preset": args.preset, "seed": args.seed, "demo_habits": args.demo_habits,
                 "config": PRESETS[args.preset]}
    manifest.setdefault("stage_seconds", {})
    manifest.setdefault("inputs", {})
    return manifest


def stage_runner(run: Path, manifest: dict, only: list[str] | None, preset: dict | None = None
                 ) -> Callable[[str, Path, Callable], None]:
    """stage(name, marker, fn): run fn unless the stage's marker shows it finished on the inputs it would read
    now and with the preset's settings it would run with (or --stages leaves it out), and record in
    RUN/pipeline.json the inputs and settings it runs on (before it starts, so that a stopped stage resumes only
    on the same ones) and its time. Without `preset`, settings are not compared."""

    def stage(name: str, marker: Path, fn: Callable) -> None:
        if only is not None and name not in only:
            return
        inputs: dict = {dep: fingerprint(run, dep) for dep in INPUTS[name]}
        if preset is not None:  # as JSON gives it back, to compare with the record
            inputs["settings"] = json.loads(json.dumps({k: preset[k] for k in SETTINGS[name]}))
        ran_on = manifest["inputs"].get(name)
        if ran_on is None and marker.exists():  # finished before the pipeline recorded inputs: taken as it is
            ran_on = manifest["inputs"][name] = inputs
            write_json_atomic(run / "pipeline.json", manifest)
        elif ran_on is not None and "settings" in inputs and "settings" not in ran_on:  # recorded before settings
            ran_on = manifest["inputs"][name] = {**ran_on, "settings": inputs["settings"]}
            write_json_atomic(run / "pipeline.json", manifest)
        changed = sorted(dep for dep in inputs if ran_on is not None and ran_on.get(dep) != inputs[dep])
        if changed:
            print(f"[pipeline] {name}: its inputs changed since it ran ({', '.join(changed)}): running it again")
            if name in MODEL_STAGES and (run / name).exists():  # else --resume would keep or continue it
                shutil.rmtree(run / name)
        elif marker.exists() and only is None:
            print(f"[pipeline] {name}: done, skipped")
            return
        print(f"[pipeline] {name} ...")
        manifest["inputs"][name] = inputs
        write_json_atomic(run / "pipeline.json", manifest)
        t0 = time.time()
        fn()
        manifest["stage_seconds"][name] = round(time.time() - t0, 2)
        write_json_atomic(run / "pipeline.json", manifest)

    return stage


def fingerprint(run: Path, stage: str) -> str:
    """The digest of a stage's result files (of a folder: every file in it); a missing file counts as such."""
    parts = []
    for rel in RESULT_FILES[stage]:
        path = run / rel
        for f in sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]:
            parts.append(f"{f.relative_to(run)}={_digest(str(f), *_stamp(f))}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=16).hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime): a file's identity for the memo of digests within one pipeline process."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


@cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    return "missing" if size < 0 else file_digest(path)


def capability_prompts(source: Path, out: Path) -> Path:
    """Write to `out` the records of `source` (a world prompt file) whose family is a capability family (each has
    one answer the world's checker verifies), as they are; returns `out`."""
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = "".join(line for line in lines if json.loads(line)["family"] in CAPABILITY_FAMILIES)
    if not kept:
        raise UserError(f"{source}: no prompt of the capability families ({', '.join(CAPABILITY_FAMILIES)})")
    atomic_write(out, lambda tmp: Path(tmp).write_text(kept, encoding="utf-8"))
    return out


def remove_leftovers(folder: Path) -> None:
    """Remove `folder` and the temporary folders beside it that an attempt killed mid-way left (`world` and
    `prepare` build their folder under a temporary name and rename it at the end)."""
    for stale in [folder, *folder.parent.glob(f".{folder.name}.*"), *folder.parent.glob(f"{folder.name}.tmp-*")]:
        if stale.is_dir():
            shutil.rmtree(stale)


def make_world(world: Path, seed: int, demo_habits: bool, p: dict) -> None:
    remove_leftovers(world)  # an earlier attempt stopped mid-way (no done marker)
    world_command(out=world, seed=seed, demo_habits=demo_habits, **p["world"])
    write_json_atomic(world / DONE, {"seed": seed, "demo_habits": demo_habits})


def prepare_data(run: Path, world: Path, data: Path, seed: int, p: dict) -> None:
    remove_leftovers(data)
    prepare_command(inputs=[world / "corpus.txt"], out=data, tokenizer="bpe", vocab_size=p["vocab_size"], seed=seed)
    Tokenizer.load(data).save(run / "tokenizer")  # with the chat format's settings beside it


# ----------------------------------------------------------------------------------------------------
# A recipe of stages on the user's own files

# The stages a recipe may name, in the order they run, and where each takes its inputs from by default:
# the previous stage's folder in the same run.
RECIPE_STAGES: dict[str, Callable] = {"prepare": prepare_command, "pretrain": pretrain_command, "sft": sft_command,
                                      "rm": rm_command, "ppo": ppo_command, "dpo": dpo_command}


def recipe_defaults(name: str, run: Path, done: list[str]) -> dict:
    """Each stage writes RUN/<stage>; a model stage starts from the latest model stage before it (pretrain
    or sft) and PPO scores with RUN/rm, unless the recipe says otherwise."""
    defaults: dict = {"out": run / name}
    models = [s for s in done if s in ("pretrain", "sft")]
    if name == "pretrain" and "prepare" in done:
        defaults["data"] = run / "prepare"
    if name in ("sft", "rm", "ppo", "dpo") and models:
        defaults["init"] = run / models[-1]
    if name == "ppo" and "rm" in done:
        defaults["reward"] = run / "rm"
    if name != "prepare":
        defaults["resume"] = (run / name).exists()
    return defaults


def run_stage(command: Callable, values: dict, source: str) -> None:
    """One stage of a recipe: its arguments checked as a recipe file's, named by `source` in errors."""
    cls = args_class(command)
    if cls is not None:
        command(build(cls, values, source))
        return
    try:  # a keyword command (prepare): unknown keys are the user's error, not a TypeError
        inspect.signature(command).bind(**values)
    except TypeError as e:
        raise UserError(f"{source}: {e}") from None
    command(**values)


def run_recipe(path: Path, out: Path, seed: int, device: str) -> None:
    """Run the stages a recipe file names, in the order of RECIPE_STAGES, into one run folder:

        # recipe.yaml                       (any stage's flags; paths relative to where you run)
        out: runs/mine                      # optional; else --out
        sft: {init: runs/base, data: [my_demos.jsonl], epochs: 3}
        rm: {data: [my_rankings.jsonl]}     # init: RUN/sft, the stage before
        ppo: {prompts: my_prompts.jsonl}    # init: RUN/sft, reward: RUN/rm
        dpo: {data: [my_pairs.jsonl], beta: 0.1}

    A stage's section is checked as its own --config file would be (unknown keys name the key and the file);
    seed and device apply to every stage unless a section sets them. A finished stage (its done.json) is
    kept, so a stopped recipe continues where it stopped."""
    sections = read_recipe_file(path)
    run = Path(sections.pop("out", out))
    unknown = sorted(set(sections) - set(RECIPE_STAGES))
    if unknown:
        raise UserError(f"{path}: unknown stage(s) {', '.join(unknown)}; a recipe names some of "
                        f"{', '.join(RECIPE_STAGES)} (and optionally out)")
    for name, section in sections.items():
        if not isinstance(section, dict):
            raise UserError(f"{path}: section {name!r} must be a mapping of the stage's flags")
    done: list[str] = []
    for name, command in RECIPE_STAGES.items():
        if name not in sections:
            continue
        print(f"[pipeline] {name} ...")
        values = {**recipe_defaults(name, run, done), "seed": seed, **sections[name]}
        if name != "prepare":
            values.setdefault("device", device)
        if name != "prepare" and values.get("resume") and (Path(values["out"]) / DONE).is_file():
            print(f"[pipeline] {name}: done, kept")
        else:
            run_stage(command, values, f"{path} [{name}]")
        done.append(name)
    print(f"[pipeline] finished the recipe's stages into {run}")
