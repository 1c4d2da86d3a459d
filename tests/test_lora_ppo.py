"""LoRA in the RL stage: the reference is the policy with its adapters off (no copy of --init), exactly what a
separate frozen copy computes, even after the adapters have trained; so is the reward model, the value model
with its adapters off and the reward model's own head (no copy of --reward); the value model trains adapters and
its head; resume is exact; the exported policy is merged."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import one_thread_pool
from safetensors.torch import load_file
from test_ppo import build_ppo_world

from instructgpt import ppo as ppo_module
from instructgpt.checkpoint import Checkpointer, load_model
from instructgpt.errors import UserError
from instructgpt.finetune import BaseScorer
from instructgpt.lora import adapters_off, lora_layers
from instructgpt.losses import response_logprobs, rewards_of
from instructgpt.ppo import ppo_command
from instructgpt.recipe import call


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_thread_pool()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    out = build_ppo_world(tmp_path_factory.mktemp("lora_ppo"))
    sys.path.insert(0, str(out["root"]))
    yield out
    sys.path.remove(str(out["root"]))


def args(world: dict, **kw) -> dict:
    return {"init": world["sft"], "reward": world["rm"], "prompts": world["prompts"], "batch_size": 8,
            "minibatches": 2, "max_new_tokens": 8, "max_steps": 4, "checkpoint_interval": 2, "keep_last": 0,
            "lora_rank": 4, "lora_alpha": 8.0, "lr": 1e-2, "warmup_steps": 1, "device": "cpu", "seed": 3, **kw}


def test_the_reference_is_the_policy_with_adapters_off(world, tmp_path, monkeypatch):
    copy = load_model(world["sft"], kind="gpt").eval()
    real_score, real_load, seen, loads = ppo_module.score_rollout, ppo_module.load_model, [], []

    def checked(ro, policy, ref, *a, **k):
        assert ref is None and lora_layers(policy)
        with torch.no_grad(), adapters_off(policy):
            off = response_logprobs(policy, ro.ids, ro.attention_mask, ro.prompt_len)
        theirs = response_logprobs(copy, ro.ids, ro.attention_mask, ro.prompt_len)
        seen.append(torch.equal(off, theirs))
        out = real_score(ro, policy, ref, *a, **k)
        seen.append(torch.equal(out["ref_logp"], theirs))
        return out

    monkeypatch.setattr(ppo_module, "score_rollout", checked)
    monkeypatch.setattr(ppo_module, "load_model", lambda path, **k: (loads.append(path), real_load(path, **k))[1])
    call(ppo_command, **args(world), out=tmp_path / "ppo")
    assert len(seen) == 8 and all(seen)
    assert loads.count(world["sft"]) == 1  # the policy alone: no reference copy
    out = load_file(str(tmp_path / "ppo" / "model.safetensors"))
    base = load_file(str(world["sft"] / "model.safetensors"))
    assert out.keys() == base.keys()  # merged: a plain model
    moved = [k for k in out if not torch.equal(out[k], base[k])]
    assert moved and all(k.endswith(("qkv_proj.weight", "o_proj.weight", "fc.weight", "proj.weight")) for k in moved)
    value = load_file(str(tmp_path / "ppo" / "checkpoints" / "step_0000004" / "value" / "model.safetensors"))
    assert "score_head.weight" in value and any(k.endswith("lora_A") for k in value)  # adapters and the head only
    assert not any(k.endswith("qkv_proj.weight") for k in value)


def test_the_reward_model_is_the_value_model_with_adapters_off(world, tmp_path, monkeypatch):
    """With LoRA the value model starts from --reward and the reward model is its base (adapters off) with the
    reward model's head as it was: at every step, once the value model's adapters and head have trained, its
    scores are exactly a separate frozen copy's; and --reward is loaded once."""
    copy = load_model(world["rm"], kind="scalar").eval()
    real_score, real_load, seen, loads = ppo_module.score_rollout, ppo_module.load_model, [], []

    def checked(ro, policy, ref, value_model, reward_model, *a, **k):
        assert isinstance(reward_model, BaseScorer) and reward_model._value[0] is value_model
        assert not list(reward_model.parameters())[0].requires_grad
        out = real_score(ro, policy, ref, value_model, reward_model, *a, **k)
        with torch.no_grad():
            theirs = rewards_of(copy, ro.ids, ro.attention_mask)
            mine = rewards_of(value_model, ro.ids, ro.attention_mask)  # the value model itself, adapters on
        seen.append((torch.equal(out["scores"], theirs), torch.equal(mine, theirs)))
        return out

    monkeypatch.setattr(ppo_module, "score_rollout", checked)
    monkeypatch.setattr(ppo_module, "load_model", lambda path, **k: (loads.append(path), real_load(path, **k))[1])
    call(ppo_command, **args(world), out=tmp_path / "ppo")
    assert len(seen) == 4 and all(same for same, _ in seen)
    assert not all(moved_equal for _, moved_equal in seen[1:])  # the value model did move away from it
    assert loads.count(world["rm"]) == 1  # the value model; the reward model is its base


def test_without_lora_the_reward_model_is_a_frozen_copy(world, tmp_path, monkeypatch):
    kinds = []
    real_score = ppo_module.score_rollout

    def checked(ro, policy, ref, value_model, reward_model, *a, **k):
        kinds.append(type(reward_model).__name__)
        return real_score(ro, policy, ref, value_model, reward_model, *a, **k)

    monkeypatch.setattr(ppo_module, "score_rollout", checked)
    call(ppo_command, **args(world, lora_rank=0, max_steps=1), out=tmp_path / "full")
    call(ppo_command, **args(world, max_steps=1, value_init=world["sft"]), out=tmp_path / "other_value")
    assert kinds == ["ScalarModel", "ScalarModel"]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_lora_ppo_resumes_exactly(world, tmp_path, monkeypatch, estimator):
    kw = args(world, estimator=estimator, group_size=1 if estimator == "gae" else 4)
    call(ppo_command, **kw, out=tmp_path / "full")

    class Stop(Exception):
        pass

    real_save = Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 2:
            raise Stop
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(ppo_command, **kw, out=tmp_path / "split")
    monkeypatch.undo()
    with pytest.raises(UserError, match="--lora-rank"):
        call(ppo_command, **{**kw, "lora_rank": 8}, out=tmp_path / "split", resume=True)
    call(ppo_command, **kw, out=tmp_path / "split", resume=True)
    full, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "split"))
    assert all(torch.equal(full[k], split[k]) for k in full)
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
             for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in ("full", "split")]
    assert rows[0] == rows[1] and len(rows[0]) == 4


def test_lora_refuses_ema(world, tmp_path):
    with pytest.raises(UserError, match="--ema"):
        call(ppo_command, **args(world, ema=0.9), out=tmp_path / "x")
