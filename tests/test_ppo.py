"""PPO and PPO-ptx: GAE against a for-loop twin, rollouts that sample what the engine's sampler does and
give each row its own noise, rewards at the last real token, ratio 1 at the first minibatch, the logged KL
is the KL in the rewards, learning (reward-model score and a custom reward), exact resume, loud failures and
empty responses. Tiny models built once per module; the file runs in seconds. Group RL: test_group_rl.py."""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from instructgpt import distributed, train
from instructgpt.batching import PretrainWindows
from instructgpt.chat import render_prompt
from instructgpt.checkpoint import load_model, load_tensors, save_model
from instructgpt.errors import UserError
from instructgpt.generate import SamplingParams, generate
from instructgpt.losses import compute_advantages, compute_rewards, response_logprobs
from instructgpt.model import GPT, ModelConfig, ScalarModel
from instructgpt.ppo import PPOArgs, PPOConfig, make_experience, ppo_command, ppo_update, rollout, score_rollout
from instructgpt.prepare import prepare_command
from instructgpt.recipe import build, call, to_dict
from instructgpt.rewards import load_reward_fn
from instructgpt.rl import GumbelPolicy, Rollout, rollout_metrics
from instructgpt.tokenizer import Tokenizer

WORDS = "the cat sat on a mat and saw big red dogs run by us".split()

REWARD_MODULE = '''
CALLS = {"n": 0, "crash_at": None}

def count_x(prompt, response, record):
    CALLS["n"] += 1  # one call per response
    if CALLS["crash_at"] is not None and CALLS["n"] >= CALLS["crash_at"]:
        raise RuntimeError("simulated stop")
    return response.count("x")

def nan_reward(prompt, response, record):
    return float("nan")

def missing_reward(prompt, response, record):
    return None

def raising_reward(prompt, response, record):
    return record["no such field"]
'''


def build_ppo_world(root: Path) -> dict:
    """A char tokenizer and pretraining shards over a small corpus, a random tiny policy (the "SFT" model),
    a random reward model, a prompt file, and a module of custom rewards (to put on sys.path) in `root`."""
    rng = np.random.default_rng(0)
    corpus = root / "corpus.txt"
    docs = [" ".join(rng.choice(WORDS, 12)) + " xyz." for _ in range(300)]
    corpus.write_text("\n\n".join(docs) + "\n")
    prepare_command(inputs=[corpus], out=root / "data", tokenizer="char", seed=0)
    tok = Tokenizer.load(root / "data" / "tokenizer.json")
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=48, vocab_multiple=8)
    torch.manual_seed(0)
    policy, rm = GPT(cfg), ScalarModel(cfg)
    with torch.no_grad():
        rm.score_head.weight.mul_(3.0)  # scores spread over a few units, like a trained reward model's
    for folder, model in ((root / "sft", policy), (root / "rm", rm)):
        save_model(model, folder)
        (folder / "tokenizer.json").write_text((root / "data" / "tokenizer.json").read_text())
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(rng.choice(WORDS, rng.integers(1, 4)))}) + "\n"
                               for _ in range(48)))
    (root / "rewards_ppo_test.py").write_text(REWARD_MODULE)
    return {"root": root, "tok": tok, "sft": root / "sft", "rm": root / "rm", "prompts": prompts,
            "data": root / "data"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    out = build_ppo_world(tmp_path_factory.mktemp("ppo"))
    sys.path.insert(0, str(out["root"]))
    yield out
    sys.path.remove(str(out["root"]))


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """The models here are tiny: one thread is as fast as two, and immune to the 100x slowdown of spinning
    OpenMP barriers when other processes share the cores (the stage sizes its pool with default_threads)."""
    threads = torch.get_num_threads()
    monkeypatch.setattr(distributed, "default_threads", lambda: 1)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def runtime() -> distributed.Runtime:
    return distributed.Runtime(device=torch.device("cpu"), dtype=torch.float32, autocast=contextlib.nullcontext)


def prompt_ids(tok: Tokenizer, texts: list[str]) -> list[list[int]]:
    return [render_prompt(tok, [{"role": "user", "content": t}]) for t in texts]


def policy_and_friends(world, seed: int = 0):
    """Policy and value model to train, a reference that differs from the policy (so the KL is not 0),
    and the reward model."""
    policy = load_model(world["sft"], kind="gpt")
    ref = load_model(world["sft"], kind="gpt").requires_grad_(False)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    value = load_model(world["rm"], kind="scalar")
    rm = load_model(world["rm"], kind="scalar").requires_grad_(False)
    return policy, ref, value, rm


# ----------------------------------------------------------------------------------------------------
# GAE: the vectorised version against a plain loop over python lists


def gae_loop(values: list[list[float]], rewards: list[list[float]], lengths: list[int], gamma: float,
             lam: float) -> tuple[list[list[float]], list[list[float]]]:
    advs, rets = [], []
    for v, r, n in zip(values, rewards, lengths):
        R = len(r)
        adv = [0.0] * R
        last = 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            delta = r[t] + gamma * next_v - v[t]
            last = delta + gamma * lam * last
            adv[t] = last
        advs.append(adv)
        rets.append([adv[t] + (v[t] if t < n else 0.0) for t in range(R)])
    return advs, rets


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.5, 0.0)])
def test_vectorised_gae_equals_loop(gamma: float, lam: float) -> None:
    g = torch.Generator().manual_seed(int(gamma * 100 + lam * 10))
    B, R = 9, 17
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    lengths[0], lengths[1] = 1, R  # an empty reply (just its end token) and one that fills the batch
    mask = (torch.arange(R)[None] < lengths[:, None]).double()
    values = torch.randn(B, R, generator=g, dtype=torch.float64)  # garbage on padding: must be ignored
    rewards = torch.randn(B, R, generator=g, dtype=torch.float64) * mask
    adv, ret = compute_advantages(values, rewards, mask, gamma, lam)
    want_adv, want_ret = gae_loop(values.tolist(), rewards.tolist(), lengths.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(want_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ret, torch.tensor(want_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    adv32, _ = compute_advantages(values.float(), rewards.float(), mask.float(), gamma, lam)
    torch.testing.assert_close(adv32, torch.tensor(want_adv, dtype=torch.float32), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Rollouts


def test_rollouts_sample_like_the_engine_and_each_row_with_its_own_noise(world) -> None:
    """Greedy decoding of GumbelPolicy's noisy logits draws what the engine's own sampler (torch.multinomial)
    draws from the same generator; and rank 1 of 2, holding the second half of the batch, samples for its rows
    what one process with the whole batch samples for them."""
    tok = world["tok"]
    policy, *_ = policy_and_friends(world)
    ids = prompt_ids(tok, ["the cat sat", "a dog", "run by us", "big red mat", "saw", "on a mat", "and the", "red"])
    params = SamplingParams(max_new_tokens=12, temperature=0.7)
    ro = rollout(policy, ids, params, tok.eos_id, tok.pad_id, torch.Generator().manual_seed(0))
    responses = ro.response_lists()
    assert len({tuple(r) for r in responses}) == len(ids)  # sampled: the check can fail
    engine = generate(policy, ids, params, tok.eos_id, tok.pad_id, torch.Generator().manual_seed(0))
    assert engine.token_lists() == responses
    rank1 = GumbelPolicy(policy, params.temperature, torch.Generator().manual_seed(0), rank=1, world_size=2)
    half = generate(rank1, ids[4:], replace(params, temperature=0.0), tok.eos_id, tok.pad_id)
    assert half.token_lists() == responses[4:]


# ----------------------------------------------------------------------------------------------------
# Rewards


def test_reward_at_last_real_token_and_missing_end_penalty() -> None:
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)
    logp = torch.randn(3, 4)
    ref_logp = torch.randn(3, 4)
    scores = torch.tensor([2.0, -1.0, 0.5])
    rewards, kl = compute_rewards(scores, logp, ref_logp, mask, beta=0.1)
    torch.testing.assert_close(kl, (logp - ref_logp) * mask)
    want = -0.1 * kl
    want[0, 2] += 2.0
    want[1, 0] += -1.0
    want[2, 3] += 0.5
    torch.testing.assert_close(rewards, want)
    assert (rewards * (1 - mask) == 0).all()
    with pytest.raises(ValueError, match="response 1 has no token"):
        compute_rewards(scores, logp, ref_logp, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]), 0.1)

    # make_experience: a response that never produced the end token loses the penalty, at its last token
    ro = Rollout(ids=torch.zeros(3, 6, dtype=torch.long), attention_mask=torch.ones(3, 6, dtype=torch.long),
                 response_mask=mask.long(), ended=torch.tensor([True, True, False]), prompt_len=2)
    scored = {"old_logp": logp, "ref_logp": ref_logp, "old_values": torch.zeros(3, 4), "scores": scores}
    exp = make_experience(ro, scored, PPOConfig(beta=0.1, missing_end_penalty=0.75), beta=0.1)
    torch.testing.assert_close(exp["penalised_scores"], torch.tensor([2.0, -1.0, -0.25]))
    assert float(exp["rewards"][2, 3] + 0.1 * kl[2, 3]) == pytest.approx(-0.25)


def test_reward_model_score_read_at_last_token_whatever_the_padding(world) -> None:
    """A response scored inside a padded rollout batch gets the score it gets alone, unpadded."""
    tok = world["tok"]
    policy, ref, value, rm = policy_and_friends(world)
    ids = prompt_ids(tok, ["the cat", "a big red dog ran by us", "saw"])
    ro = rollout(policy, ids, SamplingParams(max_new_tokens=10), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(3))
    scored = score_rollout(ro, policy, ref, value, rm, runtime())
    for i, (p, r) in enumerate(zip(ids, ro.response_lists())):
        alone = torch.tensor([p + r])
        want = rm(alone)[0, -1]
        assert float(scored["scores"][i]) == pytest.approx(float(want), abs=1e-5)


# ----------------------------------------------------------------------------------------------------
# The first minibatch, and the KL that is logged


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_first_minibatch_ratio_is_one_and_logged_kl_is_the_reward_kl(world, temperature: float) -> None:
    tok = world["tok"]
    policy, ref, value, rm = policy_and_friends(world)
    texts = ["the cat sat", "a dog", "run by us", "big red mat", "saw", "on a mat", "and the", "red"]
    ro = rollout(policy, prompt_ids(tok, texts), SamplingParams(max_new_tokens=12, temperature=temperature),
                 tok.eos_id, tok.pad_id, torch.Generator().manual_seed(0))
    cfg = PPOConfig(beta=0.05, ppo_epochs=2, minibatches=2, temperature=temperature)
    scored = score_rollout(ro, policy, ref, value, rm, runtime(), temperature)
    exp = make_experience(ro, scored, cfg, cfg.beta)
    metrics = rollout_metrics(exp, ro.ended, cfg.beta)

    # the logged KL, recomputed from the log-probabilities, is the KL inside the rewards
    mask = ro.response_mask.float()
    kl = ((scored["old_logp"] - scored["ref_logp"]) * mask).sum(1)
    assert abs(float(kl.mean())) > 1e-3  # the reference differs from the policy: the check can fail
    assert metrics["objective/kl"] == pytest.approx(float(kl.mean()), rel=1e-6, abs=1e-7)
    last = (mask.sum(1).long() - 1)[:, None]
    score_part = torch.zeros_like(mask).scatter(1, last, exp["penalised_scores"][:, None])
    torch.testing.assert_close((exp["rewards"] - score_part).sum(1), -cfg.beta * kl)
    assert metrics["objective/non_score_reward"] == pytest.approx(float(-cfg.beta * kl.mean()), rel=1e-6)

    # old log-probabilities are the policy's own: a minibatch of the rollout gets ratio 1 before any step
    idx = torch.tensor([5, 1, 6, 2])
    with torch.no_grad():
        logp = response_logprobs(policy, ro.ids[idx], ro.attention_mask[idx], ro.prompt_len, temperature)
    assert float(((logp - scored["old_logp"][idx]).abs() * mask[idx]).max()) < 1e-5

    opt_p = train.make_optimizer(policy, train.TrainConfig(weight_decay=0.0), runtime())
    opt_v = train.make_optimizer(value, train.TrainConfig(weight_decay=0.0), runtime())
    upd = ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=1e-2)
    assert upd["policy/first_ratio_maxdev"] < 1e-5
    assert upd["policy/first_approxkl"] < 1e-10
    assert upd["policy/approxkl"] > 1e-6  # later minibatches see a policy that moved: the check can fail
    assert all(np.isfinite(v) for v in upd.values())


def test_empty_responses_get_the_reward_on_their_end_token(world) -> None:
    """A policy that emits the end token first: one-token responses (empty text), the reward sits on the end
    token, nothing is NaN, and an update runs."""
    tok = world["tok"]
    policy, ref, value, rm = policy_and_friends(world)
    with torch.no_grad():  # every position's hidden state becomes e_0; only the end token's logit is large
        policy.transformer.ln_f.weight.zero_()
        policy.transformer.ln_f.bias.zero_()
        policy.transformer.ln_f.bias[0] = 1.0
        policy.transformer.wte.weight[:, 0] = 0.0
        policy.transformer.wte.weight[tok.eos_id, 0] = 50.0
    ro = rollout(policy, prompt_ids(tok, ["the cat", "a", "big red dogs", "us"]), SamplingParams(max_new_tokens=8),
                 tok.eos_id, tok.pad_id, torch.Generator().manual_seed(0))
    assert ro.response_mask.sum(1).tolist() == [1, 1, 1, 1] and bool(ro.ended.all())
    assert [tok.decode(r) for r in ro.response_lists()] == ["", "", "", ""]
    cfg = PPOConfig(ppo_epochs=2, minibatches=2)
    scored = score_rollout(ro, policy, ref, value, rm, runtime())
    exp = make_experience(ro, scored, cfg, cfg.beta)
    torch.testing.assert_close(exp["rewards"][:, 0], scored["scores"] - cfg.beta * exp["kl"][:, 0])
    for k, v in exp.items():
        assert torch.isfinite(v).all(), k
    opt_p = train.make_optimizer(policy, train.TrainConfig(), runtime())
    opt_v = train.make_optimizer(value, train.TrainConfig(), runtime())
    upd = ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=1e-3)
    assert all(np.isfinite(v) for v in upd.values())
    assert all(torch.isfinite(p).all() for p in [*policy.parameters(), *value.parameters()])


def test_micro_batches_take_the_same_step(world) -> None:
    """--grad-accum 2: each minibatch in two micro-batches whose gradients add up gives the update and the
    statistics of one (PPO-ptx windows included); a minibatch that does not split is an error."""
    tok = world["tok"]
    texts = ["the cat sat", "a dog", "run by us", "big red mat", "saw", "on a mat", "and the", "red"]
    results = []
    for grad_accum in (1, 2):
        policy, ref, value, rm = policy_and_friends(world)
        ro = rollout(policy, prompt_ids(tok, texts), SamplingParams(max_new_tokens=8), tok.eos_id, tok.pad_id,
                     torch.Generator().manual_seed(0))
        cfg = PPOConfig(ppo_epochs=2, minibatches=2, ptx_coef=0.5)
        exp = make_experience(ro, score_rollout(ro, policy, ref, value, rm, runtime()), cfg, cfg.beta)
        # SGD: Adam would blow a rounding difference in a near-zero gradient up to a step of lr
        opt_p, opt_v = torch.optim.SGD(policy.parameters()), torch.optim.SGD(value.parameters())
        ptx = PretrainWindows(world["data"], policy.config.block_size // 2, 0)
        upd = ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=0.1,
                         ptx=ptx, grad_accum=grad_accum)
        results.append((upd, {**policy.state_dict(), **{f"v.{k}": v for k, v in value.state_dict().items()}}))
    (one, weights_one), (two, weights_two) = results
    assert one.keys() == two.keys() and "loss/ptx" in one
    for k in one:
        assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), k
    assert any(not torch.equal(weights_one[k], v) for k, v in policy_and_friends(world)[0].state_dict().items())
    for k in weights_one:
        torch.testing.assert_close(weights_two[k], weights_one[k], rtol=1e-4, atol=1e-6)
    with pytest.raises(UserError, match="does not split into 2 equal minibatches of 3 equal micro-batches"):
        ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=1e-2,
                   grad_accum=3)


def test_a_diverged_update_fails_loudly(world) -> None:
    tok = world["tok"]
    policy, ref, value, rm = policy_and_friends(world)
    ro = rollout(policy, prompt_ids(tok, ["the cat", "a"]), SamplingParams(max_new_tokens=4), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(0))
    cfg = PPOConfig(minibatches=1)
    exp = make_experience(ro, score_rollout(ro, policy, ref, value, rm, runtime()), cfg, cfg.beta)
    exp["advantages"] = exp["advantages"] * float("nan")
    opt_p = train.make_optimizer(policy, train.TrainConfig(), runtime())
    opt_v = train.make_optimizer(value, train.TrainConfig(), runtime())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    with pytest.raises(train.DivergedError, match="PPO loss is nan"):
        ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())  # no step was taken


def test_a_non_finite_gradient_of_a_finite_loss_stops_before_any_step(world) -> None:
    """A finite loss can still overflow in its gradient (bf16): the gradient norms are checked before the
    optimizers step (audit F29), on every rank alike since the norms are global."""
    tok = world["tok"]
    policy, ref, value, rm = policy_and_friends(world)
    ro = rollout(policy, prompt_ids(tok, ["the cat", "a"]), SamplingParams(max_new_tokens=4), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(0))
    cfg = PPOConfig(minibatches=1)
    exp = make_experience(ro, score_rollout(ro, policy, ref, value, rm, runtime()), cfg, cfg.beta)
    opt_p = train.make_optimizer(policy, train.TrainConfig(), runtime())
    opt_v = train.make_optimizer(value, train.TrainConfig(), runtime())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    policy.transformer.h[0].mlp.fc.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    with pytest.raises(train.DivergedError, match="gradient norm is not finite \\(policy inf"):
        ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, runtime(), np.random.default_rng(0), lr=1e-3)
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert not opt_p.state  # Adam never stepped


# ----------------------------------------------------------------------------------------------------
# Learning


@torch.no_grad()
def sample(policy: GPT, tok: Tokenizer, n: int = 96, max_new: int = 10, seed: int = 123):
    rng = np.random.default_rng(seed)
    texts = [" ".join(rng.choice(WORDS, rng.integers(1, 4))) for _ in range(n)]
    ids = prompt_ids(tok, texts)
    ro = rollout(policy, ids, SamplingParams(max_new_tokens=max_new), tok.eos_id, tok.pad_id,
                 torch.Generator().manual_seed(seed))
    return ro, [tok.decode(r) for r in ro.response_lists()]


def test_ppo_raises_the_reward_model_score(world, tmp_path) -> None:
    tok = world["tok"]
    rm = load_model(world["rm"], kind="scalar").eval()
    call(ppo_command, init=world["sft"], reward=world["rm"], prompts=world["prompts"], out=tmp_path / "ppo",
         batch_size=16, max_steps=30, max_new_tokens=10, lr=3e-3, warmup_steps=1, minibatches=2,
         ppo_epochs=2, missing_end_penalty=0.0, sample_interval=10, device="cpu", seed=0)

    @torch.no_grad()
    def scores(policy) -> torch.Tensor:
        ro, _ = sample(policy, tok)
        return rm.score(ro.ids, ro.attention_mask)

    before = scores(load_model(world["sft"], kind="gpt"))
    after = scores(load_model(tmp_path / "ppo", kind="gpt"))
    stderr = float((before.var() / len(before) + after.var() / len(after)).sqrt())
    assert float(after.mean() - before.mean()) > 3 * stderr, (before.mean(), after.mean(), stderr)
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 30 and all(abs(r["policy/first_approxkl"]) < 1e-9 for r in rows)
    for name in ("objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward",
                 "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac",
                 "val/response_length"):
        assert all(np.isfinite(r[name]) for r in rows), name
    assert (tmp_path / "ppo" / "samples.jsonl").read_text().count("\n") == 12  # 4 samples at steps 10, 20 and 30


def test_a_custom_reward_for_one_token_is_learned(world, tmp_path) -> None:
    tok = world["tok"]
    call(ppo_command, init=world["sft"], reward_fn=["rewards_ppo_test:count_x"], prompts=world["prompts"],
         out=tmp_path / "ppo", batch_size=16, max_steps=15, max_new_tokens=10, lr=3e-3, warmup_steps=1,
         minibatches=2, ppo_epochs=2, missing_end_penalty=0.0, device="cpu", seed=0)

    def x_per_response(policy) -> float:
        _, texts = sample(policy, tok)
        return float(np.mean([t.count("x") for t in texts]))

    before = x_per_response(load_model(world["sft"], kind="gpt"))
    after = x_per_response(load_model(tmp_path / "ppo", kind="gpt"))
    assert after > 3 * before + 0.5, (before, after)


# ----------------------------------------------------------------------------------------------------
# Exact resume


def test_resume_is_exact(world, tmp_path) -> None:
    """3 steps, stop during step 4, resume, finish at 6 == 6 uninterrupted: policy, value, EMA weights and
    optimizers, with the adaptive KL controller, PPO-ptx windows, sampling RNG and prompt order in play."""
    import rewards_ppo_test as rewards

    kwargs = dict(init=world["sft"], reward_fn=["rewards_ppo_test:count_x"], prompts=world["prompts"],
                  batch_size=8, max_steps=6, max_new_tokens=8, lr=3e-3, warmup_steps=2, minibatches=2, ppo_epochs=2,
                  kl_target=0.5, ema=0.5, ptx_coef=0.5, ptx_data=world["data"], checkpoint_interval=3,
                  device="cpu", seed=5)
    rewards.CALLS.update(n=0, crash_at=None)
    call(ppo_command, out=tmp_path / "a", **kwargs)
    rewards.CALLS.update(n=0, crash_at=3 * 8 + 1)  # the first response of step 4
    with pytest.raises(UserError, match="rewards_ppo_test:count_x raised RuntimeError on prompt 0 .*simulated stop"):
        call(ppo_command, out=tmp_path / "b", **kwargs)
    rewards.CALLS.update(n=0, crash_at=None)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").iterdir()] == ["step_0000003"]
    call(ppo_command, out=tmp_path / "b", resume=True, **kwargs)

    for name in ("policy", "value", "ema"):
        a = load_tensors(tmp_path / "a" / "checkpoints" / "step_0000006" / name / "model.safetensors")
        b = load_tensors(tmp_path / "b" / "checkpoints" / "step_0000006" / name / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    for name in ("policy", "value"):
        a = torch.load(tmp_path / "a" / "checkpoints" / "step_0000006" / "state" / f"optim_{name}.pt",
                       weights_only=True)
        b = torch.load(tmp_path / "b" / "checkpoints" / "step_0000006" / "state" / f"optim_{name}.pt",
                       weights_only=True)
        assert all(torch.equal(a["state"][i]["exp_avg_sq"], b["state"][i]["exp_avg_sq"]) for i in a["state"])

    def rows(d):
        out = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in out]

    assert rows(tmp_path / "a") == rows(tmp_path / "b")
    assert all(r["loss/ptx"] > 0 for r in rows(tmp_path / "a"))
    betas = [r["objective/kl_coef"] for r in rows(tmp_path / "a")]
    assert len(set(betas)) == 6  # the adaptive controller moved beta at every step


# ----------------------------------------------------------------------------------------------------
# Loud failures


def test_bad_custom_rewards_fail_loudly_naming_the_function(world, tmp_path) -> None:
    """A reward function that raises, or returns NaN or no number, stops the run with a UserError naming it (and
    nothing is exported); a --reward-fn that does not load is refused before anything is written."""
    with pytest.raises(UserError, match="module:function"):
        load_reward_fn("no_colon")
    with pytest.raises(UserError, match="cannot load reward function 'rewards_ppo_test:nope'"):
        load_reward_fn("rewards_ppo_test:nope")
    name, fn = load_reward_fn(f"{world['root'] / 'rewards_ppo_test.py'}:count_x")  # a file path works too
    assert fn([], "a x x", {}) == 2 and name.endswith("rewards_ppo_test.py:count_x")
    with pytest.raises(UserError, match="no file"):
        load_reward_fn("missing_file.py:count_x")

    common = dict(init=world["sft"], prompts=world["prompts"], batch_size=4, max_steps=1, max_new_tokens=4,
                  minibatches=1, device="cpu")
    for fn, message in (("nan_reward", "returned nan for prompt 0"), ("missing_reward", "returned None for prompt 0"),
                        ("raising_reward", "raised KeyError on prompt 0")):
        with pytest.raises(UserError, match=f"reward function rewards_ppo_test:{fn} {message}"):
            call(ppo_command, reward_fn=[f"rewards_ppo_test:{fn}"], out=tmp_path / fn, **common)
        assert not (tmp_path / fn / "model.safetensors").exists()
    with pytest.raises(UserError, match="cannot load reward function 'rewards_ppo_test:nope'"):
        call(ppo_command, reward_fn=["rewards_ppo_test:nope"], out=tmp_path / "nope", **common)
    assert not (tmp_path / "nope" / "checkpoints").exists()


def test_bad_flags_are_clear_errors(world, tmp_path) -> None:
    common = dict(init=world["sft"], prompts=world["prompts"], out=tmp_path / "x", device="cpu")
    with pytest.raises(UserError, match="give a reward: --reward"):
        call(ppo_command, **common)
    with pytest.raises(UserError, match="--ptx-coef needs --ptx-data"):
        call(ppo_command, reward=world["rm"], ptx_coef=27.8, **common)
    with pytest.raises(UserError, match="--ptx-data is used only by PPO-ptx"):
        call(ppo_command, reward=world["rm"], ptx_data=world["data"], **common)
    with pytest.raises(UserError, match="multiple of --minibatches"):
        call(ppo_command, reward=world["rm"], batch_size=6, minibatches=4, **common)
    with pytest.raises(UserError, match="--clip must be positive"):
        call(ppo_command, reward=world["rm"], clip=0.0, **common)
    with pytest.raises(UserError, match="PPO needs a decoder-only language model"):
        call(ppo_command, **{**common, "init": world["rm"]}, reward=world["rm"])
    with pytest.raises(UserError, match="PPO does not compile its models yet"):
        call(ppo_command, reward=world["rm"], compile=True, **common)
    with pytest.raises(UserError, match="PPO has no evaluation: drop --eval-interval"):
        call(ppo_command, reward=world["rm"], eval_interval=5, **common)
    with pytest.raises(UserError, match="multiple of --minibatches 4 x --grad-accum 3"):
        call(ppo_command, reward=world["rm"], batch_size=8, grad_accum=3, **common)
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------
# The arguments: defaults, a recipe file and flags


def test_ppo_defaults() -> None:
    """The shared settings keep the defaults ppo_command had as keyword arguments (and the ones it hard-coded:
    no weight decay, no torch.compile, 2 checkpoints kept), whatever TrainConfig's own defaults are."""
    args = PPOArgs(init=Path("sft"), prompts=Path("p.jsonl"), out=Path("ppo"))
    assert args.ppo == PPOConfig() and (args.max_new_tokens, args.sample_interval) == (48, 10)
    t = args.train
    assert (t.batch_size, t.grad_accum, t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.weight_decay) == (
        64, 1, 1e-5, None, 5, 100, 0.0)
    assert (t.beta1, t.beta2, t.grad_clip) == (0.9, 0.95, 1.0)
    assert (t.log_interval, t.eval_interval, t.checkpoint_interval, t.keep_last, t.seed) == (1, None, 20, 2, 1337)
    assert (t.device, t.dtype, t.compile, t.fsdp, t.resume, t.report_to) == (
        "auto", "auto", False, False, False, "none")


def test_cli_recipe_file_with_a_flag_on_top(world, tmp_path) -> None:
    from instructgpt.cli import main

    out = tmp_path / "ppo"
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"""\
init: {world["sft"]}
reward: {world["rm"]}
prompts: {world["prompts"]}
out: {out}
max-new-tokens: 6
lr: 1e-3
batch_size: 8
beta: 0.05
ppo:
  minibatches: 2
  ppo_epochs: 1
train:
  max_steps: 2
  warmup_steps: 1
  grad_accum: 2
  keep_last: 1
device: cpu
""")
    main(["ppo", "--config", str(recipe), "--lr", "3e-4"])
    args = json.loads((out / "args.json").read_text())
    assert (args["init"], args["reward"], args["reward_fn"]) == (str(world["sft"]), str(world["rm"]), None)
    assert args["max_new_tokens"] == 6 and args["sample_interval"] == 10
    assert (args["ppo"]["beta"], args["ppo"]["minibatches"], args["ppo"]["ppo_epochs"], args["ppo"]["clip"]) == (
        0.05, 2, 1, 0.2)
    t = args["train"]
    assert t["lr"] == 3e-4  # the flag beats the file
    assert (t["max_steps"], t["batch_size"], t["warmup_steps"], t["grad_accum"], t["keep_last"]) == (2, 8, 1, 2, 1)
    assert (t["weight_decay"], t["checkpoint_interval"], t["compile"], t["min_lr"]) == (0.0, 20, False, None)
    assert to_dict(build(PPOArgs, args, "args.json")) == args  # args.json is itself a recipe
    assert json.loads((out / "done.json").read_text())["steps"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([3e-4, 3e-4])  # constant after a 1-step warm-up
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_0000002"]  # --keep-last 1


def test_cli_misspelled_recipe_key_names_the_key_and_the_file(world, tmp_path, capsys) -> None:
    from instructgpt.cli import main

    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"init: {world['sft']}\nreward: {world['rm']}\nprompts: {world['prompts']}\n"
                      f"out: {tmp_path / 'ppo'}\nppo:\n  ppo_epoch: 2\n")
    with pytest.raises(SystemExit) as e:
        main(["ppo", "--config", str(recipe), "--device", "cpu"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "ppo_epoch" in err and str(recipe) in err and "ppo_epochs" in err, err
    assert not (tmp_path / "ppo").exists()
