"""Every training stage survives SIGKILL (DESIGN invariants 8 and 9): pretrain, sft, rm, dpo and ppo run as
`python -m instructgpt.cli STAGE` in a subprocess, are killed at a random moment once a checkpoint exists
(twice: the first resume is killed too, often in the middle of a save), and resumed with --resume; the
exported model.safetensors is byte for byte the one of an uninterrupted run, and so are metrics.jsonl
(timings aside) and PPO's samples.jsonl. Around the kills: a second process on the same --out is refused
while the first one writes; a rerun without --resume is refused; a resume with another --batch-size or other
data is refused naming the flag; nothing temporary is left behind. And a run that diverges stops with a
one-line error, exit status 2, before any checkpoint holds a non-finite weight.

Tiny models and a few dozen steps: the uninterrupted runs and the final resumes run in this process, the
killed ones in a subprocess pinned to one core (as `one_thread` pins this one: the same arithmetic). The
file takes about 30 s on 2 idle cores (80 s on busy ones), most of it the subprocesses' start-up."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import one_thread_pool
from safetensors.torch import load_file
from test_pretrain import write_data  # a learnable token stream as `prepare` writes it
from test_rm import build_world_run  # world prompts ranked by the labeler, and a fresh tiny "SFT" model

from instructgpt.checkpoint import load_model, save_model
from instructgpt.cli import main
from instructgpt.dpo import dpo_command
from instructgpt.errors import UserError
from instructgpt.ppo import ppo_command
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import call
from instructgpt.rm import rm_command
from instructgpt.sft import sft_command

CPU = min(os.sched_getaffinity(0))
TIMINGS = ("tokens_per_s", "mfu", "time/generate", "time/score", "time/step")  # wall-clock figures differ


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here, and one core for the subprocesses (`default_threads` counts the cores a
    process may use): the same thread count, hence the same floating-point sums, on both sides of a kill."""
    yield from one_thread_pool()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """Built once: token shards for pretrain; a tiny "SFT" model, world rankings and demonstrations for sft,
    rm and dpo; for ppo a reward model (the SFT model with a fresh scalar head) and the ranked prompts."""
    root = tmp_path_factory.mktemp("kill")
    world = build_world_run(root, n_prompts=24, block_size=64)
    rm = root / "rm"
    torch.manual_seed(0)
    save_model(load_model(world["sft"], kind="scalar"), rm)
    shutil.copy(world["sft"] / "tokenizer.json", rm / "tokenizer.json")
    prompts = root / "prompts.jsonl"
    rows = [json.loads(line) for line in open(world["rankings"])]
    prompts.write_text("".join(json.dumps({"messages": r["prompt"]}) + "\n" for r in rows))
    return {"root": root, "data": write_data(root / "data", train_tokens=20000), "sft": world["sft"],
            "rankings": world["rankings"], "demos": world["demos"], "rm": rm, "prompts": prompts}


def stage_args(stage: str, inp: dict) -> tuple:
    """(command, arguments, the flag naming its data, other data): a smoke-size run checkpointed every step or two."""
    if stage == "pretrain":
        other = inp["root"] / "data_other"
        if not other.exists():
            write_data(other, train_tokens=20000, val_tokens=700)
        return pretrain_command, dict(
            data=inp["data"], n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.1, lr=3e-3,
            warmup_steps=2, max_steps=40, log_interval=5, eval_interval=10, eval_iters=2, checkpoint_interval=2,
            samples=0), "data", other
    common = dict(init=inp["sft"], warmup_steps=2, checkpoint_interval=2, log_interval=1)
    if stage == "sft":
        command, kwargs, flag = sft_command, dict(common, data=[inp["demos"]], batch_size=4, max_steps=40, lr=1e-3,
                                                  dropout=0.1, eval_interval=5, val_fraction=0.1), "data"
    elif stage == "rm":
        command, kwargs, flag = rm_command, dict(common, data=[inp["rankings"]], demos=[inp["demos"]], batch_size=2,
                                                 max_steps=30, lr=1e-3, eval_interval=5, val_fraction=0.25), "data"
    elif stage == "dpo":
        command, kwargs, flag = dpo_command, dict(common, data=[inp["rankings"]], batch_size=4, max_steps=30,
                                                  lr=1e-3, eval_interval=5, val_fraction=0.25), "data"
    else:
        command, kwargs, flag = ppo_command, dict(
            common, reward=inp["rm"], prompts=inp["prompts"], batch_size=4, minibatches=2, ppo_epochs=1,
            max_new_tokens=8, max_steps=16, lr=1e-3, ema=0.5, kl_target=0.5, checkpoint_interval=1,
            sample_interval=1), "prompts"
    given = kwargs[flag][0] if isinstance(kwargs[flag], list) else kwargs[flag]
    other = inp["root"] / f"{stage}_other_{given.name}"  # the same file but its last record
    other.write_text("".join(open(given).readlines()[:-1]))
    return command, kwargs, flag, [other] if isinstance(kwargs[flag], list) else other


def cli_flags(kwargs: dict) -> list[str]:
    out = []
    for k, v in kwargs.items():
        out += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def steps_saved(out: Path) -> list[int]:
    root = out / "checkpoints"
    return sorted(int(p.name[5:]) for p in root.iterdir() if p.name.startswith("step_")) if root.is_dir() else []


def start(stage: str, kwargs: dict, out: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "instructgpt.cli", stage, *cli_flags({**kwargs, "out": out, "device": "cpu"})]
    proc = subprocess.Popen(cmd + (["--resume"] if resume else []), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.sched_setaffinity(proc.pid, {CPU})  # long before it sizes its thread pool, after importing torch
    return proc


def kill_after_a_new_checkpoint(proc: subprocess.Popen, out: Path, rng: random.Random) -> None:
    """SIGKILL at a random moment (up to 0.2 s) after the process has written a checkpoint of its own."""
    before = (steps_saved(out) or [0])[-1]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and (steps_saved(out) or [0])[-1] <= before:
        time.sleep(0.002)
    time.sleep(rng.uniform(0, 0.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in open(path)]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "dpo", "ppo"])
def test_sigkill_then_resume_gives_the_same_bytes(inputs: dict, tmp_path: Path, stage: str) -> None:
    command, kwargs, data_flag, other_data = stage_args(stage, inputs)
    rng = random.Random(f"kill-{stage}")
    out = tmp_path / "killed"
    proc = start(stage, kwargs, out, resume=False)
    if stage == "pretrain":  # while it writes OUT, a second process on the same --out is refused at once
        while proc.poll() is None and not steps_saved(out):
            time.sleep(0.002)
        with pytest.raises(UserError, match="another instructgpt process is writing"):
            call(command, out=out, device="cpu", resume=True, **kwargs)
    killer = threading.Thread(target=kill_after_a_new_checkpoint, args=(proc, out, rng))
    killer.start()  # the uninterrupted run meanwhile, on the other core
    call(command, out=tmp_path / "full", device="cpu", **kwargs)
    killer.join()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{proc.stderr.read().decode()[-3000:]}"
    assert not (out / "done.json").exists()

    # an unfinished run is continued, never overwritten; and only with the data and settings it started with
    with pytest.raises(UserError, match="unfinished"):
        call(command, out=out, device="cpu", **kwargs)
    with pytest.raises(UserError, match="--batch-size"):
        call(command, out=out, device="cpu", resume=True, **{**kwargs, "batch_size": 2 * kwargs["batch_size"]})
    with pytest.raises(UserError, match=f"--{data_flag}"):
        call(command, out=out, device="cpu", resume=True, **{**kwargs, data_flag: other_data})

    if stage in ("pretrain", "ppo"):  # kill the resumed run too (a subprocess start costs seconds: not every stage)
        proc = start(stage, kwargs, out, resume=True)
        kill_after_a_new_checkpoint(proc, out, rng)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    call(command, out=out, device="cpu", resume=True, **kwargs)

    assert (out / "model.safetensors").read_bytes() == (tmp_path / "full" / "model.safetensors").read_bytes()
    assert rows(out / "metrics.jsonl") == rows(tmp_path / "full" / "metrics.jsonl")
    if stage == "ppo":
        assert (out / "samples.jsonl").read_text() == (tmp_path / "full" / "samples.jsonl").read_text()
    leftovers = [p.name for folder in (out, out / "checkpoints") for p in folder.iterdir()
                 if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []


def test_a_diverging_run_stops_with_a_clear_error_and_finite_checkpoints(inputs: dict, tmp_path: Path,
                                                                          capsys) -> None:
    """lr 1e9: the weights blow up at once. Steps between logs are not synced: the non-finite one is skipped on
    the device and reported at the next save, before anything non-finite reaches a checkpoint (audit F5)."""
    out = tmp_path / "diverged"
    argv = ["pretrain", f"--data={inputs['data']}", f"--out={out}", "--n-layer=2", "--n-head=2", "--n-embd=32",
            "--block-size=16", "--batch-size=4", "--lr=1e9", "--warmup-steps=1", "--max-steps=30",
            "--log-interval=10", "--eval-interval=10", "--checkpoint-interval=1", "--samples=0", "--device=cpu"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "instructgpt: error: step " in err and "training diverged" in err and "Traceback" not in err, err
    assert steps_saved(out), "the steps before the divergence were saved"
    for step in steps_saved(out):
        weights = load_file(str(out / "checkpoints" / f"step_{step:07d}" / "model" / "model.safetensors"))
        assert all(torch.isfinite(w).all() for w in weights.values()), step
    assert not (out / "done.json").exists()
