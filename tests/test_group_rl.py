"""Group RL in the `ppo` stage: REINFORCE's loss written out by hand is what the stage's update takes for
--estimator reinforce with groups of one; the G samples of a prompt sit side by side and their GRPO/RLOO
advantages sum to zero; the clipped surrogate is `losses.policy_loss`; with the KL in the loss the logged KL
is the optimised one; critic-free runs build no value model; every estimator learns a reward for one letter;
the world checker and the reward model add up with their weights; resume is exact; bad flags and bad reward
functions fail naming them. Tiny models of test_ppo's world; the file runs in seconds."""

from __future__ import annotations

import copy
import json
import statistics
import sys

import numpy as np
import pytest
import torch
from conftest import one_thread_pool
from test_ppo import build_ppo_world, policy_and_friends, prompt_ids, runtime, sample
from test_rm import build_world_run  # world prompts with their records, and a tiny "SFT" model

from instructgpt import ppo as ppo_stage
from instructgpt.batching import EpochSampler
from instructgpt.checkpoint import load_model, load_tensors, save_model
from instructgpt.data import read_prompts
from instructgpt.errors import UserError
from instructgpt.generate import SamplingParams
from instructgpt.losses import policy_loss, response_logprobs
from instructgpt.ppo import ppo_command
from instructgpt.recipe import call
from instructgpt.rewards import WorldChecker
from instructgpt.rl import (
    PPOConfig,
    aggregate,
    clipped_surrogate,
    make_experience,
    ppo_update,
    rollout,
    rollout_metrics,
    score_responses,
    score_rollout,
)
from instructgpt.world.judge import world_record
from instructgpt.world.world import World, demonstrate

TEXTS = ["the cat sat", "a dog", "run by us", "big red mat", "saw", "on a mat", "and the", "red"]

GROUP_REWARDS = '''
def has_x(prompt, response, record):
    return float("x" in response)

def needs_record(prompt, response, record):
    if prompt[-1]["role"] != "user" or not {"family", "meta", "id"} <= set(record):
        raise ValueError(f"the reward did not get the prompt record: {record}")
    return float(len(record["family"]))

def nan_after_a_while(prompt, response, record):
    return float("nan") if "a" in response else 0.0
'''


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is as fast as two, and immune to other processes spinning on the cores."""
    yield from one_thread_pool()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """test_ppo's: a char tokenizer, a random tiny policy and reward model, prompts of a few words; and the
    modules of rewards (test_ppo's and this file's) on sys.path."""
    out = build_ppo_world(tmp_path_factory.mktemp("group_rl"))
    (out["root"] / "rewards_group_test.py").write_text(GROUP_REWARDS)
    sys.path.insert(0, str(out["root"]))
    yield out
    sys.path.remove(str(out["root"]))


@pytest.fixture(scope="module")
def world_run(tmp_path_factory) -> dict:
    """The instruction world, a tiny "SFT" model on its characters, a reward model (the SFT model with a fresh
    scalar head), and the module of rewards on sys.path."""
    root = tmp_path_factory.mktemp("world_rl")
    run = build_world_run(root, n_prompts=4, block_size=128)
    torch.manual_seed(0)
    save_model(load_model(run["sft"], kind="scalar"), root / "rm")
    (root / "rm" / "tokenizer.json").write_text((run["sft"] / "tokenizer.json").read_text())
    (root / "rewards_world_test.py").write_text(GROUP_REWARDS)
    sys.path.insert(0, str(root))
    yield {**run, "rm": root / "rm"}
    sys.path.remove(str(root))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------------------
# The update against REINFORCE written out


@pytest.mark.parametrize("loss_agg,kl_mode", [("token_mean", "none"), ("sequence_mean", "none"),
                                              ("token_sum", "loss"), ("token_mean", "loss")])
def test_reinforce_with_groups_of_one_is_reinforce(world, loss_agg: str, kl_mode: str) -> None:
    """--estimator reinforce, --group-size 1, one minibatch, one epoch: the stage's step (SGD) is the step down
    the gradient of REINFORCE's loss, -sum_i r_i log pi(y_i|x_i) with the aggregation's normaliser, plus beta times
    the k3 KL to the reference (exp(d) - d - 1) with kl_mode loss, on a copy of the policy."""
    tok, L, lr = world["tok"], 8, 0.5
    policy, ref, _, rm = policy_and_friends(world)
    ro = rollout(policy, prompt_ids(tok, TEXTS), SamplingParams(max_new_tokens=L), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(0))
    cfg = PPOConfig(estimator="reinforce", group_size=1, kl_mode=kl_mode, loss_agg=loss_agg, ppo_epochs=1,
                    minibatches=1, beta=0.3, missing_end_penalty=0.5)
    scored = score_rollout(ro, policy, ref, None, rm, runtime())
    assert "old_values" not in scored
    exp = make_experience(ro, scored, cfg, cfg.beta)
    assert "returns" not in exp

    # the twin: REINFORCE's loss, written out
    twin = copy.deepcopy(policy)
    mask = ro.response_mask.float()
    r = scored["scores"] - 0.5 * (~ro.ended).float()  # (B,) the score, less the penalty for not ending
    assert bool((~ro.ended).any()) and bool(ro.ended.any())  # both kinds of response: the check can fail
    torch.testing.assert_close(exp["advantages"], r[:, None] * mask)
    logp = response_logprobs(twin, ro.ids, ro.attention_mask, ro.prompt_len)  # (B, R)
    d = scored["ref_logp"] - logp
    k3 = (d.exp() - d - 1) * mask
    B = len(TEXTS)
    per_token = -r[:, None] * logp * mask + (cfg.beta * k3 if kl_mode == "loss" else 0.0)
    if loss_agg == "token_mean":
        loss = per_token.sum() / mask.sum()
    elif loss_agg == "sequence_mean":
        loss = (per_token.sum(1) / mask.sum(1)).sum() / B
    else:
        loss = per_token.sum() / (B * L)
    loss.backward()
    want = {k: p - lr * p.grad for k, p in twin.named_parameters()}

    opt = torch.optim.SGD(policy.parameters(), lr=lr)
    upd = ppo_update(policy, None, opt, None, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=lr,
                     grad_clip=0.0, beta=cfg.beta, max_len=L)
    assert upd["policy/first_ratio_maxdev"] < 1e-5 and "loss/value" not in upd
    assert ("loss/kl" in upd) == (kl_mode == "loss")
    moved = 0
    for k, p in policy.named_parameters():
        torch.testing.assert_close(p.detach(), want[k].detach(), rtol=1e-5, atol=1e-6)
        moved += not torch.equal(p.detach(), twin.get_parameter(k).detach())
    assert moved > 0  # the step moved the weights: the check can fail


def test_the_clipped_surrogate_is_losses_policy_loss() -> None:
    """With the token mean, `clipped_surrogate` then `aggregate` is `losses.policy_loss`, bit for bit: the
    default (PPO) takes the same steps as before group RL existed."""
    g = torch.Generator().manual_seed(0)
    B, R = 6, 9
    mask = (torch.arange(R)[None] < torch.randint(1, R + 1, (B,), generator=g)[:, None]).float()
    logp, old = -torch.rand(B, R, generator=g) * 3, -torch.rand(B, R, generator=g) * 3
    adv = torch.randn(B, R, generator=g) * mask
    for n in (None, 2.0 * mask.sum()):
        want, want_stats = policy_loss(logp, old, adv, mask, 0.2, n)
        per_token, stats = clipped_surrogate(logp, old, adv, mask, 0.2, n)
        got = aggregate(per_token, mask, "token_mean", mask.sum() if n is None else n, B, None)
        assert torch.equal(got, want) and stats == want_stats
        assert want_stats["policy/clipfrac"] > 0  # some tokens are clipped: the check can fail


# ----------------------------------------------------------------------------------------------------
# Groups in the stage


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_advantages_in_the_stage_sum_to_zero_per_group(world, tmp_path, monkeypatch, estimator: str) -> None:
    """The update sees G = 4 samples of each prompt side by side (each with its own noise), and advantages equal
    to a loop over the groups of the responses' rewards: zero-sum per group. No value model is built or saved."""
    seen = []

    def spy(policy, value_model, opt_p, opt_v, ro, exp, cfg, *args, **kwargs):
        seen.append((value_model, opt_v, ro, {k: v.clone() for k, v in exp.items()}))
        return ppo_update(policy, value_model, opt_p, opt_v, ro, exp, cfg, *args, **kwargs)

    monkeypatch.setattr(ppo_stage, "ppo_update", spy)
    G, out = 4, tmp_path / "run"
    call(ppo_command, init=world["sft"], reward=world["rm"], prompts=world["prompts"], out=out, batch_size=8,
         max_steps=2, max_new_tokens=8, lr=1e-3, warmup_steps=1, minibatches=2, ppo_epochs=1, estimator=estimator,
         group_size=G, ema=0.5, device="cpu", seed=3)
    assert len(seen) == 2
    texts = [json.loads(line)["prompt"] for line in world["prompts"].read_text().splitlines()]
    order = EpochSampler(len(texts), 3)  # the stage's prompt order for --seed 3
    for value_model, opt_v, ro, exp in seen:
        assert value_model is None and opt_v is None and "old_values" not in exp
        rows = [p[m.bool()].tolist() for p, m in zip(ro.ids[:, :ro.prompt_len], ro.attention_mask[:, :ro.prompt_len])]
        assert rows == [ids for ids in prompt_ids(world["tok"], [texts[i] for i in order.take(2)]) for _ in range(G)]
        groups = [ro.response_lists()[j * G:(j + 1) * G] for j in range(2)]
        assert any(len({tuple(r) for r in group}) > 1 for group in groups)  # sampled, not copied
        adv = exp["advantages"][:, 0]  # (B,): a response's advantage sits on each of its tokens
        torch.testing.assert_close(exp["advantages"], adv[:, None] * exp["mask"])
        scores = (exp["penalised_scores"] + exp["non_score_reward"]).tolist()  # RLOO: KL in the rewards
        for j in range(2):
            s = scores[j * G:(j + 1) * G]
            mean = statistics.fmean(s)
            if estimator == "grpo":
                want = [(x - mean) / (statistics.stdev(s) + 1e-6) for x in s]
            else:
                want = [x - (sum(s) - x) / (G - 1) for x in s]
            torch.testing.assert_close(adv[j * G:(j + 1) * G], torch.tensor(want), rtol=1e-4, atol=1e-5)
            assert abs(float(adv[j * G:(j + 1) * G].sum())) < 1e-4
    step = out / "checkpoints" / "step_0000002"
    assert sorted(p.name for p in step.iterdir() if p.is_dir()) == ["ema", "policy", "state"]
    assert not list(step.glob("state/optim_value.pt"))
    args = json.loads((out / "args.json").read_text())["ppo"]
    want_defaults = {"grpo": ("loss", "sequence_mean"), "rloo": ("reward", "token_mean")}[estimator]
    assert (args["kl_mode"], args["loss_agg"]) == want_defaults  # args.json says what ran
    row = metrics(out)[-1]
    for name in ("reward", "reward_std", "kl", "entropy", "clip_ratio", "completion_length", "frac_reward_zero_std",
                 "rewards/model", "objective/scores", "objective/kl", "policy/clipfrac", "loss/policy"):
        assert np.isfinite(row[name]), name
    assert "loss/value" not in row and ("loss/kl" in row) == (estimator == "grpo")
    assert row["reward"] == row["objective/scores"] == pytest.approx(row["rewards/model"])


def test_with_the_kl_in_the_loss_the_logged_kl_is_the_optimised_kl(world) -> None:
    """kl_mode loss (GRPO's default): no KL in the rewards, and the first minibatch's k3 term is the `kl` logged
    from the rollout (ratio 1: nothing has moved yet)."""
    tok = world["tok"]
    policy, ref, _, rm = policy_and_friends(world)
    ro = rollout(policy, prompt_ids(tok, TEXTS), SamplingParams(max_new_tokens=10), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(1))
    cfg = PPOConfig(estimator="grpo", group_size=2, ppo_epochs=1, minibatches=1, beta=0.1, loss_agg="token_mean")
    assert cfg.resolved().kl_mode == "loss"
    scored = score_rollout(ro, policy, ref, None, rm, runtime())
    exp = make_experience(ro, scored, cfg, cfg.beta)
    assert float(exp["non_score_reward"].abs().max()) == 0.0
    logged = rollout_metrics(exp, ro.ended, cfg.beta, group_size=2)
    assert logged["kl"] > 1e-3  # the reference differs from the policy: the check can fail
    upd = ppo_update(policy, None, torch.optim.SGD(policy.parameters(), lr=0.1), None, ro, exp, cfg, runtime(),
                     np.random.default_rng(0), lr=0.1, beta=cfg.beta)
    assert upd["policy/first_ratio_maxdev"] < 1e-5
    assert upd["loss/kl"] == pytest.approx(logged["kl"], rel=1e-5)


def test_score_responses_weighs_the_reward_model_and_the_functions(world_run) -> None:
    """The world checker (1 for the demonstration, 0 for a wrong reply) and the reward model's scores add up
    with their weights; each part is returned unweighted."""
    prompts = read_prompts(world_run["world"] / "prompts_rl.jsonl")[:2]
    world_ = World.load(world_run["world"])
    replies = [demonstrate(world_, world_record(prompts[0])), "I do not think so."]
    rm_scores = torch.tensor([0.5, -2.0])
    total, parts = score_responses([("world", WorldChecker(world_), 2.0)], (rm_scores, 0.5),
                                   [p.messages for p in prompts], replies, [p.meta for p in prompts])
    assert parts["world"].tolist() == [1.0, 0.0] and parts["model"].tolist() == [0.5, -2.0]
    torch.testing.assert_close(total, torch.tensor([2.25, -1.0]))


# ----------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp"])
def test_every_estimator_learns_a_reward_for_one_letter(world, tmp_path, estimator: str) -> None:
    """A verifiable reward, 1 when the reply contains an "x" (about a third of a random policy's do): 20 steps
    of 4 prompts x 4 samples take the reward's mean from its first steps' to near 1, and the exported policy
    writes an "x" far more often. The settings held on seeds 0-2; this runs seed 11."""
    tok = world["tok"]
    call(ppo_command, init=world["sft"], reward_fn=["rewards_group_test:has_x"], prompts=world["prompts"],
         out=tmp_path / "run", batch_size=16, max_steps=20, max_new_tokens=10, lr=3e-3, warmup_steps=1,
         minibatches=2, ppo_epochs=2, estimator=estimator, group_size=4, missing_end_penalty=0.0, device="cpu",
         seed=11)
    reward = [r["reward"] for r in metrics(tmp_path / "run")]
    first, last = np.mean(reward[:5]), np.mean(reward[-5:])
    assert last > first + 0.3 and last > 0.7, (first, last)

    def share_with_x(policy) -> float:
        _, texts = sample(policy, tok)
        return float(np.mean(["x" in t for t in texts]))

    before = share_with_x(load_model(world["sft"], kind="gpt"))
    after = share_with_x(load_model(tmp_path / "run", kind="gpt"))
    assert after > before + 0.3, (before, after)


# ----------------------------------------------------------------------------------------------------
# Verifiable rewards from the prompt records


def test_world_reward_on_world_prompts_adds_up_with_the_reward_model(world_run, tmp_path) -> None:
    """--reward-fn world --world W on the world's RL prompts, with the reward model and a function that checks it
    gets each prompt's record: the logged reward is the weighted sum of the parts."""
    w = world_run["world"]
    call(ppo_command, init=world_run["sft"], reward=world_run["rm"], rm_weight=0.5, world=w,
         reward_fn=["world", "rewards_world_test:needs_record"], reward_weights=[2.0, 0.25],
         prompts=w / "prompts_rl.jsonl", out=tmp_path / "run", batch_size=4, max_steps=2, max_new_tokens=8,
         minibatches=1, ppo_epochs=1, estimator="dr_grpo", group_size=2, device="cpu")
    families = [len(p.meta["family"]) for p in read_prompts(w / "prompts_rl.jsonl")]
    for row in metrics(tmp_path / "run"):
        assert min(families) <= row["rewards/rewards_world_test:needs_record"] <= max(families)
        assert 0 <= row["rewards/world"] <= 1
        want = (0.5 * row["rewards/model"] + 2.0 * row["rewards/world"]
                + 0.25 * row["rewards/rewards_world_test:needs_record"])
        assert row["reward"] == pytest.approx(want, rel=1e-5)
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert args["reward_fn"] == ["world", "rewards_world_test:needs_record"] and args["ppo"]["loss_agg"] == "token_sum"


# ----------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_is_exact_for_a_group_estimator(world, tmp_path) -> None:
    """GRPO with the KL in the loss, adaptive beta, EMA and PPO-ptx: 3 steps, stop during step 4, resume, finish
    at 6 == 6 uninterrupted (policy and EMA weights, the optimizer, the metrics)."""
    import rewards_ppo_test as rewards

    kwargs = dict(init=world["sft"], reward_fn=["rewards_ppo_test:count_x"], prompts=world["prompts"],
                  batch_size=8, max_steps=6, max_new_tokens=8, lr=3e-3, warmup_steps=2, minibatches=2, ppo_epochs=2,
                  estimator="grpo", group_size=4, kl_target=0.5, ema=0.5, ptx_coef=0.5, ptx_data=world["data"],
                  checkpoint_interval=3, device="cpu", seed=5)
    rewards.CALLS.update(n=0, crash_at=None)
    call(ppo_command, out=tmp_path / "a", **kwargs)
    rewards.CALLS.update(n=0, crash_at=3 * 8 + 1)  # the first response of step 4
    with pytest.raises(UserError, match="simulated stop"):
        call(ppo_command, out=tmp_path / "b", **kwargs)
    rewards.CALLS.update(n=0, crash_at=None)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_0000003"]
    call(ppo_command, out=tmp_path / "b", resume=True, **kwargs)

    step = "checkpoints/step_0000006"
    for name in ("policy", "ema"):
        a = load_tensors(tmp_path / "a" / step / name / "model.safetensors")
        b = load_tensors(tmp_path / "b" / step / name / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = (torch.load(tmp_path / d / step / "state" / "optim_policy.pt", weights_only=True) for d in "ab")
    assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"])

    def rows(d):
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in metrics(d)]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert len({r["objective/kl_coef"] for r in rows(tmp_path / "a")}) == 6 and all(
        r["loss/kl"] > 0 for r in rows(tmp_path / "a"))


# ----------------------------------------------------------------------------------------------------
# Loud failures


def test_group_flags_and_bad_rewards_are_clear_errors(world, tmp_path) -> None:
    common = dict(init=world["sft"], prompts=world["prompts"], out=tmp_path / "x", batch_size=8, minibatches=2,
                  device="cpu")
    rm, fn = dict(reward=world["rm"]), dict(reward_fn=["rewards_group_test:has_x"])
    bad = [
        (dict(rm, estimator="grpo"), "--estimator grpo compares the samples of a prompt .* --group-size 2 or more"),
        (dict(rm, estimator="rloo", group_size=1), "--estimator rloo compares"),
        (dict(rm, group_size=3), "--batch-size 8 counts samples: it must be a multiple of --group-size 3"),
        (dict(rm, group_size=0), "--group-size must be at least 1"),
        (dict(rm, estimator="grpo", group_size=2, value_init=world["rm"]), "no value model: drop --value-init"),
        (dict(fn, reward_weights=[1.0, 2.0]), "--reward-weights gives 2 weight\\(s\\) for 1 --reward-fn"),
        (dict(fn, rm_weight=0.5), "--rm-weight weighs the reward model's score: give --reward"),
        (dict(fn, world=world["root"]), "--world is read only by --reward-fn world"),
        (dict(reward_fn=["rewards_group_test:has_x"] * 2), "names a function twice"),
        (dict(rm, kl_mode="none", kl_target=1.0), "--kl-target adapts the KL coefficient"),
        (dict(reward_fn=["world"]), "--reward-fn world checks replies against the instruction world"),
        (dict(rm, estimator="ppo"), "estimator"),
    ]
    for kwargs, message in bad:
        with pytest.raises(UserError, match=message):
            call(ppo_command, **common, **kwargs)
    assert not (tmp_path / "x").exists()
    # a reward function that returns NaN stops a group run too, naming itself and the prompt
    with pytest.raises(UserError, match="reward function rewards_group_test:nan_after_a_while returned nan for prompt"):
        call(ppo_command, **{**common, "out": tmp_path / "nan"}, reward_fn=["rewards_group_test:nan_after_a_while"],
             estimator="grpo", group_size=4, max_steps=3, max_new_tokens=8)
