"""The pretrain stage: exact resume (in process and after SIGKILL), clear errors, learning."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from instructgpt import checkpoint
from instructgpt.errors import UserError
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import call
from instructgpt.tokenizer import Tokenizer

SMALL = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, batch_size=4, warmup_steps=2, eval_iters=2,
             log_interval=2, samples=1, lr=3e-3)


def write_data(folder: Path, train_tokens: int = 4000, val_tokens: int = 600, dtype: str = "uint16",
               vocab_size: int | None = None, tokenizer: bool = True) -> Path:
    """A data folder as `prepare` writes it, with numpy: meta.json, train/val shards, tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz .,\n"])
    V = vocab_size or tok.vocab_size
    rng = np.random.default_rng(0)
    # a learnable stream: mostly "counting" (t+1 mod 20, offset past the special tokens), some noise
    def stream(n: int) -> np.ndarray:
        ids = (np.arange(n) % 20) + 6
        noise = rng.random(n) < 0.1
        ids[noise] = rng.integers(6, min(V, 36), noise.sum())
        return ids.astype(dtype)
    shards = {"train": [], "val": []}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        if n:
            stream(n).tofile(folder / f"{split}_000.bin")
            shards[split].append(f"{split}_000.bin")
    meta = {"dtype": dtype, "vocab_size": V, "eos_id": tok.eos_id, "tokenizer": "tokenizer.json",
            "tokens": {"train": train_tokens, "val": val_tokens}, "shards": shards}
    (folder / "meta.json").write_text(json.dumps(meta))
    if tokenizer:
        tok.save(folder / "tokenizer.json")
    return folder


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def losses(out: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(out / "metrics.jsonl"))]


class Stop(Exception):
    pass


def test_resume_is_exact_with_dropout(tmp_path: Path, monkeypatch) -> None:
    data = write_data(tmp_path / "data")
    args = dict(SMALL, dropout=0.1, max_steps=12, checkpoint_interval=6, eval_interval=4)
    call(pretrain_command, data=data, out=tmp_path / "full", **args)

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 6:
            raise Stop
        return path

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(pretrain_command, data=data, out=tmp_path / "split", **args)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "done.json").exists()
    with pytest.raises(UserError, match="--resume"):
        call(pretrain_command, data=data, out=tmp_path / "split", **args)
    call(pretrain_command, data=data, out=tmp_path / "split", resume=True, **args)

    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert losses(tmp_path / "full") == losses(tmp_path / "split")
    done = json.loads((tmp_path / "split" / "done.json").read_text())
    assert done["step"] == 12 and done["val_loss"] == losses(tmp_path / "full")[-1][2]
    for name in ("config.json", "tokenizer.json", "samples.txt"):
        assert (tmp_path / "split" / name).is_file(), name
    assert "sample 0" in (tmp_path / "split" / "samples.txt").read_text()
    # a finished run: without --resume it is refused, with --resume there is nothing to do
    with pytest.raises(UserError, match="finished"):
        call(pretrain_command, data=data, out=tmp_path / "split", **args)
    assert call(pretrain_command, data=data, out=tmp_path / "split", resume=True, **args) == done
    assert_same_weights(tmp_path / "full", tmp_path / "split")


def test_resume_after_sigkill(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", train_tokens=20000)
    args = dict(SMALL, max_steps=400, checkpoint_interval=20, eval_interval=200, samples=0)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    cmd = [sys.executable, "-m", "instructgpt.cli", "pretrain", f"--data={data}", f"--out={tmp_path / 'killed'}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd + flags, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.startswith("step_") for p in checkpoints.iterdir()):
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "killed" / "done.json").exists()

    call(pretrain_command, data=data, out=tmp_path / "killed", resume=True, **args)
    call(pretrain_command, data=data, out=tmp_path / "full", **args)
    assert_same_weights(tmp_path / "full", tmp_path / "killed")
    assert losses(tmp_path / "full") == losses(tmp_path / "killed")


def test_bad_inputs_fail_before_training(tmp_path: Path) -> None:
    args = dict(SMALL, max_steps=2, eval_interval=2, checkpoint_interval=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no meta.json and no token shards"):
        call(pretrain_command, data=empty, out=tmp_path / "o1", **args)
    with pytest.raises(UserError, match="no such folder"):
        call(pretrain_command, data=tmp_path / "missing", out=tmp_path / "o1", **args)

    wide = write_data(tmp_path / "wide", vocab_size=70000, dtype="uint16")
    with pytest.raises(UserError, match="vocab_size 70000 does not fit the shard dtype uint16"):
        call(pretrain_command, data=wide, out=tmp_path / "o2", **args)

    data = write_data(tmp_path / "data")
    with pytest.raises(UserError, match="beyond the model's context of 256"):
        call(pretrain_command, data=data, out=tmp_path / "o3", **{**args, "preset": "tiny", "block_size": 512})

    short = write_data(tmp_path / "short", train_tokens=10, val_tokens=5)
    with pytest.raises(UserError, match="fewer than one window"):
        call(pretrain_command, data=short, out=tmp_path / "o4", **args)

    for out in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / out).exists()  # nothing was written

    call(pretrain_command, data=data, out=tmp_path / "done", **args)
    with pytest.raises(UserError, match="holds a finished pretraining run"):
        call(pretrain_command, data=data, out=tmp_path / "done", **args)


def test_cli_reports_user_errors(tmp_path: Path) -> None:
    from instructgpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2


def test_cli_recipe_file_with_a_flag_on_top(tmp_path: Path) -> None:
    from instructgpt.cli import main

    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
data: {data}
out: {out}
n_layer: 2
n-head: 2
n_embd: 32
block-size: 16
eval_iters: 1
samples: 0
lr: 1e-2
batch_size: 2
max_steps: 2
train:
  warmup_steps: 1
  checkpoint_interval: 2
  eval-interval: 2
""")
    main(["pretrain", "--config", str(recipe), "--lr", "3e-4"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["data"] == str(data) and saved["out"] == str(out)
    assert (saved["n_layer"], saved["n_head"], saved["n_embd"], saved["block_size"]) == (2, 2, 32, 16)
    assert saved["eval_iters"] == 1 and saved["samples"] == 0
    train = saved["train"]
    assert train["lr"] == 3e-4  # the flag overrides the file's 1e-2
    assert (train["batch_size"], train["max_steps"], train["warmup_steps"]) == (2, 2, 1)
    assert (train["checkpoint_interval"], train["eval_interval"]) == (2, 2)
    assert train["beta2"] == 0.99 and train["seed"] == 1337  # the stage's defaults where the file is silent
    done = json.loads((out / "done.json").read_text())
    assert done["step"] == 2 and done["tokens"] == 2 * 2 * 16
    # step 2 of 2 after one warm-up step is the top of the cosine: the flag's lr is the one trained with
    assert [math.isclose(r["lr"], 3e-4) for r in map(json.loads, open(out / "metrics.jsonl")) if "lr" in r] == [True]


def test_cli_recipe_file_with_a_misspelled_key(tmp_path: Path, capsys) -> None:
    from instructgpt.cli import main

    data = write_data(tmp_path / "data")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"data: {data}\nout: {tmp_path / 'out'}\nn_layers: 2\nmax_steps: 2\n")
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--config", str(recipe)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "n_layers" in err and str(recipe) in err and "n_layer" in err.replace("n_layers", "")
    assert not (tmp_path / "out").exists()


def test_val_loss_falls_on_tinyshakespeare(shared_data: Path, tmp_path: Path) -> None:
    text = (shared_data / "tinyshakespeare.txt").read_text()[:200_000]
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    ids = np.array([lut[c] for c in text], dtype=np.uint16)
    split = int(0.9 * len(ids))
    data = tmp_path / "data"
    data.mkdir()
    ids[:split].tofile(data / "train_000.bin")
    ids[split:].tofile(data / "val_000.bin")
    meta = {"dtype": "uint16", "vocab_size": len(chars), "eos_id": 0,
            "tokens": {"train": split, "val": len(ids) - split},
            "shards": {"train": ["train_000.bin"], "val": ["val_000.bin"]}}
    (data / "meta.json").write_text(json.dumps(meta))
    out = tmp_path / "out"
    call(pretrain_command, data=data, out=out, n_layer=2, n_head=4, n_embd=64, block_size=32, batch_size=8, lr=3e-3,
         warmup_steps=10, max_steps=100, eval_interval=50, eval_iters=5, samples=1, checkpoint_interval=100)
    val = [r[2] for r in losses(out) if r[2] is not None]
    assert len(val) == 3  # steps 0, 50, 100
    assert val[0] > math.log(len(chars)) - 0.3  # an untrained model guesses uniformly
    assert val[2] < val[1] < val[0] and val[2] < 2.8, val
    assert (out / "samples.txt").read_text().startswith("--- sample 0")  # no tokenizer: ids


def test_prefix_lm_batch_cuts_windows_into_prefix_and_continuation() -> None:
    from instructgpt.batching import prefix_lm_batch

    T = 4
    windows = np.arange(3 * 2 * T, dtype=np.int64).reshape(3, 2 * T) + 10  # (B, 2T), every token distinct
    splits = np.array([1, 3, 4])
    b = prefix_lm_batch(windows, splits, start_id=1, pad_id=0)
    for i, s in enumerate(splits):
        w = windows[i].tolist()
        assert b["src"][i].tolist() == w[:s] + [0] * (T - s)  # the prefix, right-padded
        assert b["src_mask"][i].tolist() == [1] * s + [0] * (T - s)
        assert b["labels"][i].tolist() == w[s:s + T]  # the next T tokens
        assert b["tgt"][i].tolist() == [1] + w[s:s + T - 1]  # teacher forcing from the start token


def test_seq2seq_pretraining_learns_and_resumes_exactly(tmp_path: Path, monkeypatch) -> None:
    data = write_data(tmp_path / "data")
    args = dict(SMALL, arch="seq2seq", max_steps=30, checkpoint_interval=15, eval_interval=15, samples=1)
    call(pretrain_command, data=data, out=tmp_path / "full", **args)
    val = [r[2] for r in losses(tmp_path / "full") if r[2] is not None]
    assert len(val) == 3 and val[2] < val[1] < val[0], val
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert config["kind"] == "seq2seq" and config["objective"] == "prefix_lm"
    assert config["model"]["n_encoder_layer"] == 0  # as many encoder blocks as decoder blocks

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 15:
            raise Stop
        return path

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(pretrain_command, data=data, out=tmp_path / "split", **args)
    monkeypatch.undo()
    call(pretrain_command, data=data, out=tmp_path / "split", resume=True, **args)
    assert_same_weights(tmp_path / "full", tmp_path / "split")
    assert losses(tmp_path / "full") == losses(tmp_path / "split")

    with pytest.raises(UserError, match="--n-encoder-layer is for --arch seq2seq"):
        call(pretrain_command, data=data, out=tmp_path / "o", **{**SMALL, "n_encoder_layer": 2})
    short = write_data(tmp_path / "short", train_tokens=30, val_tokens=5)
    with pytest.raises(UserError, match=r"2 x block_size \(prefix \+ continuation\) = 32"):
        call(pretrain_command, data=short, out=tmp_path / "o", **args)
    assert not (tmp_path / "o").exists()
