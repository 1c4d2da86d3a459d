"""PPO against the reward model with a per-token KL penalty to the SFT model, and PPO-ptx
(InstructGPT step 3; paper section 3.5 and appendix C.3-C.4).

The policy and the frozen reference both start from SFT; the value model starts from the reward model,
which stays frozen. Each step:

  1. rollout            sample responses to a batch of prompts (temperature 1, KV cache)
  2. score              old log-probabilities, reference log-probabilities, values, reward-model scores
  3. compute_rewards    r_t = -beta * (log pi(y_t) - log pi_ref(y_t)), plus the score at the last token
  4. compute_advantages GAE (gamma 1, lambda 0.95), whitened
  5. ppo_update         clipped surrogate and clipped value loss over minibatches and inner epochs,
                        plus, for PPO-ptx, gamma * the next-token loss on pretraining windows

    objective(phi) = E[r(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi_phi(x)]
"""

from __future__ import annotations

import importlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import train
from .chat import render_prompt
from .checkpoint import load_model, read_config
from .data import Prompt, read_prompts
from .errors import UserError
from .generate import SamplingParams, generate
from .model import GPT, ScalarModel, positions_from_mask
from .sft import EpochSampler, PretrainWindows
from .tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------
# Losses and advantage estimation: small functions with the formulas


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padding stays 0."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def compute_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): -beta * KL estimate at every response token, plus the sequence's score
    at its last real token. Returns (rewards, kl) with kl = log pi - log pi_ref (B, R), 0 on padding."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask.sum(1) - 1).clamp(min=0).long()  # responses are right-padded
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl


def compute_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016), backwards over right-padded responses.

        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}

    with V and A zero past the end of each response. Returns (advantages, returns = A + V), (B, R) each."""
    B, R = rewards.shape
    values = values * mask
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, adv + values


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al., 2017), to minimise:

        L = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],  rho_t = pi(y_t) / pi_old(y_t)"""
    log_ratio = (logp - old_logp) * mask
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "policy/approxkl": float(masked_mean(0.5 * log_ratio**2, mask)),
            "policy/clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
            "policy/ratio_mean": float(masked_mean(ratio, mask)),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * E_t[max((V - G)^2, (clip(V, V_old - eps, V_old + eps) - G)^2)]."""
    clipped_v = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    return loss, {"val/clipfrac": float(masked_mean((l2 > l1).float(), mask))}


class AdaptiveKL:
    """The adaptive KL coefficient of Ziegler et al. (2019): beta moves so the KL tracks a target."""

    def __init__(self, beta: float, target: float | None, horizon: int = 10000):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = float(np.clip(kl / self.target - 1, -0.2, 0.2))
        self.beta *= 1 + error * n / self.horizon

    def state(self) -> dict:
        return {"beta": self.beta}

    def restore(self, s: dict) -> None:
        self.beta = s["beta"]


# ----------------------------------------------------------------------------------------------------
# Rollouts and scoring


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P + R): left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    response: torch.Tensor  # (B, R) response tokens
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (the end token included)
    ended: torch.Tensor  # (B,) the response produced the end token
    prompt_len: int  # P
    prompts: list[Prompt]
    texts: list[str]


def rollout(policy: GPT, tok: Tokenizer, prompts: list[Prompt], params: SamplingParams,
            generator: torch.Generator, all_finished=None) -> Rollout:
    """1. Sample one response per prompt with the generation engine."""
    prompt_ids = [render_prompt(tok, p.messages) for p in prompts]
    gen = generate(policy, prompt_ids, params, tok.eos_id, tok.pad_id, generator, all_finished=all_finished)
    device = gen.tokens.device
    P = max(len(p) for p in prompt_ids)
    B, R = gen.tokens.shape
    ids = torch.full((B, P + R), tok.pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, P + R), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p):P] = torch.tensor(p, device=device)
        mask[i, P - len(p):P] = 1
    resp_mask = (torch.arange(R, device=device)[None] < gen.lengths[:, None]).long()
    ids[:, P:] = gen.tokens
    mask[:, P:] = resp_mask
    texts = [tok.decode(t) for t in gen.token_lists()]
    return Rollout(ids, mask, gen.tokens, resp_mask, gen.ended, P, prompts, texts)


def response_logprobs(model: GPT, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """log pi(y_t | x, y_<t) of each response token (B, R), computed in fp32."""
    pos = positions_from_mask(mask)
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_slice=slice(P - 1, -1))  # (B, R, V)
    return -F.cross_entropy(logits.float().transpose(1, 2), ids[:, P:], reduction="none")


def response_values(model: ScalarModel, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """V at the state before each response token (B, R): the value at the position that predicts it."""
    values = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))  # (B, T)
    return values[:, P - 1:-1].float()


def load_reward_fn(spec: str) -> Callable[[list[str], list[str]], list[float]]:
    """`module:function`, a custom reward taking (prompts, responses) and returning one float each."""
    if ":" not in spec:
        raise UserError(f"--reward-fn must look like module:function, got {spec!r}")
    module, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load reward function {spec!r}: {e}") from None
    return fn


def custom_scores(fn: Callable, name: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    values = fn(prompts, responses)
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise UserError(f"reward function {name} must return numbers: {e}") from None
    if len(values) != len(responses):
        raise UserError(f"reward function {name} returned {len(values)} rewards for {len(responses)} responses")
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"reward function {name} returned a non-finite reward ({values[bad[0]]}) "
                        f"for response {bad[0]}: {responses[bad[0]]!r:.80}")
    return torch.tensor(values)


@dataclass
class PPOConfig:
    """Hyperparameters of PPO (paper appendix C.4 where it gives them)."""

    beta: float = 0.02  # KL penalty coefficient (the paper's beta)
    kl_target: float | None = None  # adaptive KL: move beta so the KL tracks this (None: fixed beta)
    gamma: float = 1.0  # discount
    lam: float = 0.95  # GAE lambda
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2  # value clip
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # minibatches per pass
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss (the paper's gamma = 27.8)
    missing_end_penalty: float = 1.0  # subtracted from the score of a response that never ends
    ema: float = 0.0  # EMA decay of the policy weights (0: no EMA)


def score_rollout(ro: Rollout, policy, ref, value_model, reward_model, tok: Tokenizer,
                  reward_fn: tuple[str, Callable] | None, runtime) -> dict[str, torch.Tensor]:
    """2. Old and reference log-probabilities, old values, and the score of each response."""
    ids, mask, P = ro.ids, ro.attention_mask, ro.prompt_len
    with torch.no_grad(), runtime.autocast():
        old_logp = response_logprobs(policy, ids, mask, P)
        ref_logp = response_logprobs(ref, ids, mask, P)
        values = response_values(value_model, ids, mask, P)
        if reward_fn is not None:
            name, fn = reward_fn
            scores = custom_scores(fn, name, [p.messages[-1]["content"] for p in ro.prompts], ro.texts)
            scores = scores.to(ids.device)
        else:
            scores = reward_model.score(ids, mask).float()
    if not torch.isfinite(scores).all():
        raise UserError("the reward model returned a non-finite score; check its checkpoint")
    return {"old_logp": old_logp.float(), "ref_logp": ref_logp.float(), "old_values": values, "scores": scores}


def ppo_update(policy, value_model, opt_p, opt_v, ro: Rollout, batch: dict[str, torch.Tensor], cfg: PPOConfig,
               tcfg: train.TrainConfig, runtime, step: int, rng: np.random.Generator,
               ptx: PretrainWindows | None) -> dict:
    """5. Minibatch PPO epochs on one rollout batch; returns the mean of each statistic."""
    B = ro.ids.size(0)
    mb = max(1, B // cfg.minibatches)
    stats: dict[str, list[float]] = {}
    lr_p = train.lr_at(step, tcfg)
    for group in opt_p.param_groups:
        group["lr"] = lr_p
    for group in opt_v.param_groups:
        group["lr"] = lr_p
    first_approxkl = None
    for _ in range(cfg.ppo_epochs):
        order = torch.from_numpy(rng.permutation(B)).to(ro.ids.device)
        for s in range(0, B, mb):
            idx = order[s:s + mb]
            ids, mask, rmask = ro.ids[idx], ro.attention_mask[idx], ro.response_mask[idx].float()
            with runtime.autocast():
                logp = response_logprobs(policy, ids, mask, ro.prompt_len)
                values = response_values(value_model, ids, mask, ro.prompt_len)
            pl, pstats = policy_loss(logp, batch["old_logp"][idx], batch["advantages"][idx], rmask, cfg.clip)
            vl, vstats = value_loss(values, batch["old_values"][idx], batch["returns"][idx], rmask, cfg.value_clip)
            loss_p = pl
            if ptx is not None:
                w = {k: v.to(ro.ids.device) for k, v in ptx.batch(mb).items()}
                with runtime.autocast():
                    logits = policy(w["ids"])
                ptx_loss = train.token_cross_entropy(logits, w["labels"]) / w["labels"].numel()
                loss_p = pl + cfg.ptx_coef * ptx_loss
                pstats["loss/ptx"] = float(ptx_loss)
            opt_p.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            (loss_p + vl).backward()
            if tcfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), tcfg.grad_clip)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), tcfg.grad_clip)
            opt_p.step()
            opt_v.step()
            if first_approxkl is None:
                first_approxkl = pstats["policy/approxkl"]
                pstats["policy/first_ratio"] = pstats["policy/ratio_mean"]
            for k, v in {**pstats, **vstats, "loss/policy": float(pl), "loss/value": float(vl)}.items():
                stats.setdefault(k, []).append(v)
    out = {k: float(np.mean(v)) for k, v in stats.items()}
    out["policy/first_approxkl"] = first_approxkl
    return out


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------------------------------
# The stage


def ppo_command(
    policy: Path,
    prompts: Path,
    out: Path,
    reward: Path | None = None,
    reward_fn: str | None = None,
    value_init: Path | None = None,
    batch_size: int = 64,
    max_steps: int = 100,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    lr: float = 1e-5,
    warmup_steps: int = 5,
    beta: float = 0.02,
    kl_target: float | None = None,
    ppo_epochs: int = 4,
    minibatches: int = 4,
    clip: float = 0.2,
    value_clip: float = 0.2,
    gamma: float = 1.0,
    lam: float = 0.95,
    ptx_coef: float = 0.0,
    ptx_data: Path | None = None,
    missing_end_penalty: float = 1.0,
    ema: float = 0.0,
    sample_interval: int = 10,
    checkpoint_interval: int = 20,
    log_interval: int = 1,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
) -> None:
    """PPO (and PPO-ptx with --ptx-coef and --ptx-data) against a reward model or a custom reward.

    Args:
        policy: the SFT checkpoint: the initial policy and the frozen reference.
        prompts: prompt file (any format the readers accept).
        out: stage folder to write.
        reward: the reward-model checkpoint (frozen); also the value model's initialisation.
        reward_fn: instead of a reward model, `module:function` mapping (prompts, responses) to floats.
        value_init: value-model initialisation (default: the reward model, as in the paper).
        batch_size: prompts per rollout batch (one response each).
        beta: KL penalty coefficient; kl_target turns on the adaptive controller.
        ptx_coef: PPO-ptx pretraining-loss coefficient (the paper used 27.8); needs ptx_data.
        missing_end_penalty: subtracted from the score of a response that hits max_new_tokens unfinished.
        ema: EMA decay of the policy weights; the exported policy is the EMA when > 0.
    """
    t0 = time.time()
    policy_dir, out = Path(policy), Path(out)
    if (out / "done.json").exists() and not resume:
        raise UserError(f"{out} holds a finished PPO run; choose another --out or pass --resume")
    if (reward is None) == (reward_fn is None):
        raise UserError("give exactly one of --reward (a reward-model folder) and --reward-fn (module:function)")
    if ptx_coef > 0 and ptx_data is None:
        raise UserError("--ptx-coef needs --ptx-data (a folder written by `instructgpt prepare`)")
    if read_config(policy_dir)["kind"] != "gpt":
        raise UserError(f"{policy_dir}: PPO needs a decoder-only language model as the policy")
    cfg = PPOConfig(beta=beta, kl_target=kl_target, gamma=gamma, lam=lam, clip=clip, value_clip=value_clip,
                    ppo_epochs=ppo_epochs, minibatches=minibatches, ptx_coef=ptx_coef,
                    missing_end_penalty=missing_end_penalty, ema=ema)
    tcfg = train.TrainConfig(batch_size=batch_size, lr=lr, min_lr=lr, warmup_steps=warmup_steps,
                             max_steps=max_steps, weight_decay=0.0, seed=seed, device=device, dtype=dtype,
                             compile=False, log_interval=log_interval, beta2=0.95)
    runtime = train.setup(tcfg)
    dev = runtime.device
    tok = Tokenizer.load(policy_dir / "tokenizer.json")
    items = list(read_prompts(prompts))

    # Models: policy and reference from SFT; reward frozen; value from the reward model.
    pol = load_model(policy_dir, kind="gpt", device=dev)
    for m in pol.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # the ratio must be exactly 1 at the first minibatch
    ref = load_model(policy_dir, kind="gpt", device=dev).eval().requires_grad_(False)
    rm = load_model(reward, kind="scalar", device=dev).eval().requires_grad_(False) if reward else None
    vinit = value_init or reward or policy_dir
    value_model = load_model(vinit, kind="scalar", device=dev)
    ema_model = load_model(policy_dir, kind="gpt", device=dev).eval().requires_grad_(False) if ema > 0 else None
    opt_p = train.make_optimizer(pol, tcfg, runtime)
    opt_v = train.make_optimizer(value_model, tcfg, runtime)
    kl_ctl = AdaptiveKL(beta, kl_target)
    fn = (reward_fn, load_reward_fn(reward_fn)) if reward_fn else None
    ptx = PretrainWindows(Path(ptx_data), pol.config.block_size // 2, seed) if ptx_coef > 0 else None
    sampler = EpochSampler(len(items), seed)
    rng = np.random.default_rng([seed, 3])
    generator = torch.Generator(device=dev).manual_seed(seed)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)

    ckpt = train.Checkpointer(out, keep_last=2)
    step = 0
    models = {"policy": pol, "value": value_model} | ({"ema": ema_model} if ema_model is not None else {})
    optimizers = {"policy": opt_p, "value": opt_v}
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, models, optimizers)
        step = state["step"]
        sampler.restore(state["sampler"])
        kl_ctl.restore(state["kl"])
        rng.bit_generator.state = state["rng"]
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if ptx:
            ptx.restore(state["ptx"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step)
    samples_path = out / "samples.jsonl"

    def save(step: int) -> None:
        state = {"step": step, "sampler": sampler.state(), "kl": kl_ctl.state(), "rng": rng.bit_generator.state,
                 "generator": generator.get_state().tolist()}
        if ptx:
            state["ptx"] = ptx.state()
        ckpt.save(step, models, optimizers, state)

    progress = train.Progress(max_steps, "ppo-ptx" if ptx else "ppo", start=step)
    while step < max_steps:
        step_t0 = time.time()
        # 1. rollout
        batch_prompts = [items[i] for i in sampler.take(batch_size)]
        pol.eval()
        ro = rollout(pol, tok, batch_prompts, params, generator)
        t_gen = time.time() - step_t0
        # 2. score
        scored = score_rollout(ro, pol, ref, value_model, rm, tok, fn, runtime)
        scores = scored["scores"] - cfg.missing_end_penalty * (~ro.ended).float()
        # 3. rewards with the KL penalty
        rmask = ro.response_mask.float()
        rewards, kl = compute_rewards(scores, scored["old_logp"], scored["ref_logp"], rmask, kl_ctl.beta)
        # 4. advantages
        adv, returns = compute_advantages(scored["old_values"], rewards, rmask, cfg.gamma, cfg.lam)
        adv = masked_whiten(adv, rmask)
        t_score = time.time() - step_t0 - t_gen
        # 5. update
        pol.train()
        value_model.train()
        upd = ppo_update(pol, value_model, opt_p, opt_v, ro,
                         {**scored, "advantages": adv, "returns": returns}, cfg, tcfg, runtime, step, rng, ptx)
        if ema_model is not None:
            ema_update(ema_model, pol, cfg.ema)
        step += 1
        mean_kl = float((kl.sum(1)).mean())
        row = {
            "step": step,
            "objective/kl": mean_kl,
            "objective/kl_coef": kl_ctl.beta,
            "objective/entropy": float(-(scored["old_logp"] * rmask).sum(1).mean()),
            "objective/scores": float(scored["scores"].mean()),
            "objective/rlhf_reward": float((scores - kl_ctl.beta * kl.sum(1)).mean()),
            "objective/non_score_reward": float((-kl_ctl.beta * kl.sum(1)).mean()),
            "val/ended": float(ro.ended.float().mean()),
            "val/response_length": float(rmask.sum(1).mean()),
            "time/generate": t_gen, "time/score": t_score, "time/step": time.time() - step_t0,
            **upd,
        }
        kl_ctl.update(mean_kl, batch_size)
        if step % log_interval == 0:
            log.write(row)
        if sample_interval and step % sample_interval == 0:
            with samples_path.open("a") as f:
                for p, t, s in list(zip(ro.prompts, ro.texts, scored["scores"].tolist()))[:4]:
                    f.write(json.dumps({"step": step, "prompt": p.messages[-1]["content"], "response": t,
                                        "score": s}) + "\n")
        if step % checkpoint_interval == 0 or step == max_steps:
            save(step)
        progress.update(step, {"score": row["objective/scores"], "kl": mean_kl})
    progress.close()

    final = ema_model if ema_model is not None else pol
    ckpt.export(final, extra={"stage": "ppo-ptx" if ptx else "ppo"})
    shutil.copy(policy_dir / "tokenizer.json", out / "tokenizer.json")
    summary = {"stage": "ppo-ptx" if ptx else "ppo", "steps": step, "seconds": time.time() - t0}
    (out / "done.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
