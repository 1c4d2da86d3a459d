"""Stages under torchrun (2 processes, gloo on the CPU): N ranks with batch B train exactly like one process
with batch N x B (DESIGN invariant 6: each rank a slice of the global batch, losses normalised by the
global count), under DDP and FSDP2; FSDP runs resume exactly and their exported weights load in one
process (invariants 8 and 11); PPO ranks whose responses end at different lengths generate together
(invariant 12).

The 2-process runs are real `torchrun` launches of the command line (a subprocess each, a few seconds of
start-up apiece); the 1-process references run in this process."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_pretrain import write_data  # a small learnable token stream as `prepare` writes it
from test_rm import build_world_run  # world prompts ranked by the labeler, and a fresh tiny "SFT" model

from instructgpt import distributed
from instructgpt.batching import EpochSampler
from instructgpt.chat import render_prompt
from instructgpt.checkpoint import load_model, save_model
from instructgpt.dpo import dpo_command
from instructgpt.model import ScalarModel
from instructgpt.ppo import ppo_command
from instructgpt.prepare import prepare_command
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import call
from instructgpt.rm import rm_command
from instructgpt.sft import sft_command

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")

TOL = 1e-5


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The in-process references on one intra-op thread, as each torchrun rank gets (OMP_NUM_THREADS=1)."""
    before = torch.get_num_threads()
    monkeypatch.setattr(distributed, "default_threads", lambda: 1)
    yield
    torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, nproc: int = 2) -> None:
    """`torchrun --nproc-per-node 2 -m instructgpt.cli ARGS`, failing the test with the ranks' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "instructgpt.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INSTRUCTGPT_DEBUG": "1"}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, f"{' '.join(cmd)}\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    return out


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_trajectory(one: Path, two: Path, keys: tuple[str, ...]) -> None:
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            assert (k in ra) == (k in rb), (ra, rb)
            if k in ra:
                assert abs(ra[k] - rb[k]) <= TOL * max(1.0, abs(ra[k])), (k, ra, rb)


def assert_close_weights(one: Path, two: Path, atol: float = 1e-5, loose: dict[str, float] | None = None,
                         stray: float = 0.0) -> None:
    """Every tensor within atol, except those `loose` names with their own tolerance; with `stray`, at most one
    element in a thousand of a tensor may differ by up to `stray` instead. (Adam divides a gradient by its own
    running size, so an element whose gradient is rounding noise moves by an lr-sized step of random sign: two
    summation orders then disagree there by far more than elsewhere.)"""
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        tol = (loose or {}).get(k, atol)
        diff = (a[k] - b[k]).abs()
        if stray and (diff > tol).float().mean() <= 1e-3:
            tol = max(tol, stray)
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def stop_after_checkpoint(run: Path, copy: Path, step: int) -> None:
    """`copy`: the finished `run` as it was right after its checkpoint of `step` (later checkpoints, the
    exported model and done.json removed); metrics.jsonl keeps later rows, which a resume must drop."""
    shutil.copytree(run, copy)
    for path in (copy / "checkpoints").iterdir():
        if int(path.name.removeprefix("step_")) > step:
            shutil.rmtree(path)
    for name in ("done.json", "model.safetensors"):
        (copy / name).unlink()


PRETRAIN = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, warmup_steps=2, eval_iters=2, log_interval=1,
                eval_interval=3, checkpoint_interval=3, max_steps=6, lr=3e-3, samples=1, device="cpu")


def test_pretrain_ddp_and_fsdp_match_one_process_and_fsdp_resumes_exactly(tmp_path: Path) -> None:
    data = write_data(tmp_path / "data")
    call(pretrain_command, data=data, out=tmp_path / "one", batch_size=8, grad_accum=2, **PRETRAIN)
    torchrun("pretrain", *flags(data=data, out=tmp_path / "ddp", batch_size=4, grad_accum=2, **PRETRAIN))
    torchrun("pretrain", *flags(data=data, out=tmp_path / "fsdp", batch_size=4, grad_accum=2, **PRETRAIN), "--fsdp")
    for two in ("ddp", "fsdp"):
        assert_same_trajectory(tmp_path / "one", tmp_path / two, ("loss", "val_loss", "grad_norm", "tokens"))
        assert_close_weights(tmp_path / "one", tmp_path / two)
    assert metrics(tmp_path / "ddp")[1]["tokens"] == 2 * 8 * 16  # the global count: 2 micro-batches x 8 rows x T

    # the FSDP run stopped after its step-3 checkpoint, resumed under 2 processes: the same run, bit for bit
    resumed = tmp_path / "resumed"
    stop_after_checkpoint(tmp_path / "fsdp", resumed, 3)
    torchrun("pretrain", *flags(data=data, out=resumed, batch_size=4, grad_accum=2, **PRETRAIN), "--fsdp", "--resume")
    assert_close_weights(tmp_path / "fsdp", resumed, atol=0)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert drop(metrics(tmp_path / "fsdp")) == drop(metrics(resumed))

    # the exported FSDP model is a plain checkpoint: it loads strictly in one process
    fsdp_model, one_model = load_model(tmp_path / "fsdp").eval(), load_model(tmp_path / "one").eval()
    x = (torch.arange(16)[None] % 20) + 6  # (1, T)
    with torch.no_grad():
        torch.testing.assert_close(fsdp_model(x), one_model(x), atol=1e-4, rtol=0)


def test_reward_model_and_dpo_on_two_ranks_match_one_process(tmp_path: Path) -> None:
    run = build_world_run(tmp_path, n_prompts=24, block_size=64)
    common = dict(max_steps=3, lr=1e-3, warmup_steps=1, log_interval=1, eval_interval=3, val_fraction=0.25,
                  max_length=64, device="cpu")

    call(rm_command, init=run["sft"], data=[run["rankings"]], out=tmp_path / "rm1", batch_size=4, **common)
    torchrun("rm", *flags(init=run["sft"], data=[run["rankings"]], out=tmp_path / "rm2", batch_size=2, **common))
    assert_same_trajectory(tmp_path / "rm1", tmp_path / "rm2",
                           ("loss", "accuracy", "grad_norm", "prompts", "val_accuracy", "val_loss"))
    # The ranking loss ignores a shift of every reward, so the final norm's bias gets a gradient of pure
    # rounding noise, which Adam scales up to lr-sized steps: that tensor agrees to about lr / 10 only, and the
    # score head's bias, set after training so that the demonstrations score 0 on average, carries that noise
    # through the head's weights (about 2e-4 here).
    assert_close_weights(tmp_path / "rm1", tmp_path / "rm2", atol=1e-4,
                         loose={"transformer.ln_f.bias": 3e-4, "score_head.bias": 1e-3})

    call(dpo_command, init=run["sft"], data=[run["rankings"]], out=tmp_path / "dpo1", batch_size=8, **common)
    torchrun("dpo", *flags(init=run["sft"], data=[run["rankings"]], out=tmp_path / "dpo2", batch_size=4, **common))
    assert_same_trajectory(tmp_path / "dpo1", tmp_path / "dpo2",
                           ("loss", "grad_norm", "pairs", "rewards/chosen", "rewards/margins", "eval/loss"))
    assert_close_weights(tmp_path / "dpo1", tmp_path / "dpo2", stray=1e-4)


# ----------------------------------------------------------------------------------------------------
# SFT and PPO


@pytest.fixture(scope="module")
def rlhf_run(tmp_path_factory) -> dict:
    """A world with its demonstrations and prompts, a fresh tiny "SFT" model, pretraining shards in its
    tokenizer, a random reward model and a prompt file."""
    root = tmp_path_factory.mktemp("rlhf")
    run = build_world_run(root, n_prompts=24)
    prepare_command(inputs=[run["world"] / "corpus.txt"], out=root / "data", tokenizer_path=run["sft"])
    torch.manual_seed(1)
    rm = ScalarModel(load_model(run["sft"]).config)
    with torch.no_grad():
        rm.score_head.weight.mul_(3.0)  # scores spread over a few units, like a trained reward model's
    save_model(rm, root / "rm")
    prompts = [json.loads(line) for line in open(run["world"] / "prompts_rm.jsonl")]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in prompts))
    return {**run, "data": root / "data", "rm": root / "rm", "prompts": root / "prompts.jsonl"}


def test_sft_on_two_ranks_matches_one_process(rlhf_run, tmp_path: Path) -> None:
    """Padded batches with pretraining windows under DDP; packed batches and labeler selection (greedy
    generation on every rank of a sharded model) under FSDP."""
    run = rlhf_run
    common = dict(data=[run["demos"]], max_steps=4, lr=1e-3, warmup_steps=1, dropout=0.0, log_interval=1,
                  eval_interval=2, ptx_fraction=0.2, ptx_data=run["data"], device="cpu")
    call(sft_command, init=run["sft"], out=tmp_path / "one", batch_size=8, **common)
    torchrun("sft", *flags(init=run["sft"], out=tmp_path / "ddp", batch_size=4, **common))
    assert_same_trajectory(tmp_path / "one", tmp_path / "ddp", ("loss", "grad_norm", "tokens", "val_loss"))
    assert_close_weights(tmp_path / "one", tmp_path / "ddp")

    packed = dict(common, select_by="labeler", world=run["world"], select_prompts=4, select_max_new_tokens=8)
    call(sft_command, init=run["sft"], out=tmp_path / "one_packed", batch_size=8, packing=True, **packed)
    torchrun("sft", *flags(init=run["sft"], out=tmp_path / "fsdp", batch_size=4, **packed), "--packing", "--fsdp")
    assert_same_trajectory(tmp_path / "one_packed", tmp_path / "fsdp",
                           ("loss", "grad_norm", "tokens", "val_loss", "labeler_score"))
    assert_close_weights(tmp_path / "one_packed", tmp_path / "fsdp")


PPO_KEYS = ("episode", "objective/kl", "objective/kl_coef", "objective/entropy", "objective/scores",
            "objective/rlhf_reward", "val/ended", "val/response_length", "policy/approxkl", "policy/clipfrac",
            "policy/first_ratio_maxdev", "loss/policy", "loss/value", "loss/ptx", "val/clipfrac")


def test_ppo_on_two_ranks_matches_one_process(rlhf_run, tmp_path: Path) -> None:
    """Sampled rollouts (the same responses: each row's noise is its own in the global batch), the adaptive KL,
    PPO-ptx and an EMA under DDP: the logged trajectory and the exported policy of 2 ranks x 4 prompts are
    those of 1 process x 8."""
    run = rlhf_run
    common = dict(init=run["sft"], reward=run["rm"], prompts=run["prompts"], max_steps=3, max_new_tokens=8,
                  lr=3e-3, warmup_steps=1, minibatches=1, ppo_epochs=2, kl_target=0.5, ema=0.5, ptx_coef=0.5,
                  ptx_data=run["data"], sample_interval=0, device="cpu", seed=0)
    call(ppo_command, out=tmp_path / "one", batch_size=8, **common)
    torchrun("ppo", *flags(out=tmp_path / "ddp", batch_size=4, **common))
    assert_same_trajectory(tmp_path / "one", tmp_path / "ddp", PPO_KEYS)
    assert_close_weights(tmp_path / "one", tmp_path / "ddp")
    rows = metrics(tmp_path / "one")
    assert 0 < rows[0]["val/ended"] < 1  # some responses ended before max_new_tokens and some did not
    assert len({r["objective/kl_coef"] for r in rows}) == 3  # the global KL moved beta at every step


def stopping_policy(run: dict, out: Path, threshold: int) -> Path:
    """A policy that ends its reply at once after a prompt of fewer than `threshold` tokens and never ends
    after a longer one. Its blocks add nothing, so a position's logits depend on its token and position only;
    channel 0 of the position embedding says which side of the threshold a position is on, and the (tied)
    token embedding turns that into the end token's logit (before) or "e"'s (after), ~55 above the rest."""
    tok = run["tok"]
    model = load_model(run["sft"])
    with torch.no_grad():
        for block in model.transformer.h:
            for linear in (block.attn.o_proj, block.mlp.proj):
                linear.weight.zero_()
                linear.bias.zero_()
        wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
        wte.zero_()
        wpe.zero_()
        wte[tok.eos_id, 0], wte[tok.encode("e")[0], 0] = 10.0, -10.0
        # a prompt of P tokens: its last token, at position P - 1, predicts the first reply token
        wpe[:threshold - 1, 0], wpe[threshold - 1:, 0] = 100.0, -100.0
    save_model(model, out)
    shutil.copy(run["sft"] / "tokenizer.json", out / "tokenizer.json")
    return out


def test_ppo_fsdp_ranks_whose_responses_end_apart_generate_together_and_resume_exactly(rlhf_run,
                                                                                        tmp_path: Path) -> None:
    """At the first step every response of rank 0 ends at once and every one of rank 1 runs to max_new_tokens:
    the sharded policy's forwards stay collective (no hang: torchrun's timeout), the run follows one process,
    and, stopped after its first checkpoint, it resumes under 2 processes bit for bit."""
    run, tok = rlhf_run, rlhf_run["tok"]
    threshold, seed = 40, 0
    policy = stopping_policy(run, tmp_path / "policy", threshold)
    texts = sorted((json.loads(line)["prompt"] for line in open(run["prompts"])),
                   key=lambda t: len(render_prompt(tok, [{"role": "user", "content": t}])))
    short, long = texts[:4], texts[-4:]
    assert len(render_prompt(tok, [{"role": "user", "content": short[-1]}])) < threshold
    assert len(render_prompt(tok, [{"role": "user", "content": long[0]}])) >= threshold
    lines = [""] * 8  # the first global batch takes the prompts in the sampler's order: rank 0 gets the first 4
    for j, i in enumerate(EpochSampler(8, seed).take(8)):
        lines[i] = json.dumps({"prompt": (short + long)[j]}) + "\n"
    (tmp_path / "prompts.jsonl").write_text("".join(lines))

    common = dict(init=policy, reward=run["rm"], prompts=tmp_path / "prompts.jsonl", max_steps=2, max_new_tokens=8,
                  lr=3e-3, warmup_steps=1, minibatches=1, ppo_epochs=2, ema=0.5, checkpoint_interval=1,
                  sample_interval=0, device="cpu", seed=seed)
    call(ppo_command, out=tmp_path / "one", batch_size=8, **common)
    torchrun("ppo", *flags(out=tmp_path / "fsdp", batch_size=4, **common), "--fsdp")
    first = metrics(tmp_path / "fsdp")[0]
    assert first["val/ended"] == 0.5 and first["val/response_length"] == (4 * 1 + 4 * 8) / 8
    assert_same_trajectory(tmp_path / "one", tmp_path / "fsdp", PPO_KEYS)
    assert_close_weights(tmp_path / "one", tmp_path / "fsdp")

    resumed = tmp_path / "resumed"
    stop_after_checkpoint(tmp_path / "fsdp", resumed, 1)
    torchrun("ppo", *flags(out=resumed, batch_size=4, **common), "--fsdp", "--resume")
    for name in ("policy", "value", "ema"):
        a = load_file(str(tmp_path / "fsdp" / "checkpoints" / "step_0000002" / name / "model.safetensors"))
        b = load_file(str(resumed / "checkpoints" / "step_0000002" / name / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    drop = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]  # noqa: E731
    assert drop(metrics(tmp_path / "fsdp")) == drop(metrics(resumed))
