"""The RL steps that the `ppo` stage composes: rollouts, scoring, rewards, advantages by one of several
estimators, and the clipped policy-gradient update. One path for every estimator; nothing here knows a file
or a flag.

Estimators (`PPOConfig.estimator`):

  gae           PPO (InstructGPT): a value model, GAE(gamma, lambda) over per-token rewards, whitened
  grpo          GRPO (Shao et al., 2024): G samples per prompt, A = (r - group mean) / group std
  dr_grpo       Dr. GRPO (Liu et al., 2025): A = r - group mean, the loss summed over tokens / max_new_tokens
  rloo          RLOO (Ahmadian et al., 2024): A = r - the mean of the prompt's G - 1 other samples
  reinforce_pp  REINFORCE++ (Hu, 2025): the return-to-go of per-token rewards, whitened over the batch
  reinforce     REINFORCE (Williams, 1992): A = r, no baseline; the reference the others improve on

Only gae has a critic: the others build no value model. The KL to the reference (`PPOConfig.kl_mode`) is a
penalty in the per-token rewards, r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) (the paper's way), or a
k3 term beta * k3_t in the loss (GRPO's way), or left out. The estimators of whole responses (grpo, dr_grpo,
rloo, reinforce) take as a response's reward the sum of its per-token rewards: the score less the KL penalty.

Tensors of a batch: B rollouts, P prompt positions (prompts left-padded to the longest), R response positions
(responses right-padded to the longest; a response includes its end token). With G samples per prompt the
G rows of a prompt are side by side (rows 0..G-1 answer the first prompt), on one rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn as nn

from . import train
from .advantages import (
    grpo_advantages,
    kl_k3,
    reinforce_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
    sequence_mean,
    sequence_to_tokens,
    token_mean,
    token_sum_norm,
)
from .batching import PretrainWindows, pad
from .distributed import Runtime, all_ranks_finished, all_reduce, all_reduce_sums, rank_rows
from .errors import UserError
from .generate import Generation, SamplingParams, generate, generate_many
from .lora import adapters_off
from .losses import (
    compute_advantages,
    compute_rewards,
    masked_whiten,
    response_logprobs,
    response_values,
    rewards_of,
    token_cross_entropy,
    value_loss,
)
from .model import GPT, ScalarModel
from .rewards import RewardFn, score_batch

Estimator = Literal["gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce"]
KLMode = Literal["auto", "reward", "loss", "none"]
LossAgg = Literal["auto", "token_mean", "sequence_mean", "token_sum"]
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo")  # a baseline from the prompt's other samples: G >= 2
# What "auto" means for each estimator, as its paper has it: GRPO puts a k3 KL in the loss (DeepSeekMath
# equation 3) and averages each response over its tokens; Dr. GRPO divides token sums by one constant.
DEFAULT_KL_MODE = {"grpo": "loss", "dr_grpo": "loss"}  # the others: "reward"
DEFAULT_LOSS_AGG = {"grpo": "sequence_mean", "dr_grpo": "token_sum"}  # the others: "token_mean"


@dataclass
class PPOConfig:
    """Hyperparameters of the RL stage (for PPO, the paper's appendix C.4 where it gives them)."""

    beta: float = 0.02  # KL coefficient (the paper's beta), in the rewards or on the k3 loss term; adaptive: the start
    kl_target: float | None = None  # adaptive KL (Ziegler et al. 2019): move beta so the KL tracks this
    kl_horizon: int = 10000  # adaptive KL: rollouts over which beta may change by at most 20%
    gamma: float = 1.0  # GAE discount; 1 because the only non-KL reward is at the end of the response
    lam: float = 0.95  # GAE lambda: bias (0) against variance (1) of the advantage estimate
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # how far a value may move from its rollout-time estimate before it is clipped
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # optimizer steps per pass (--batch-size must be a multiple)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss (the paper's gamma = 27.8); needs --ptx-data
    missing_end_penalty: float = 1.0  # subtracted from the score of a response that never ends
    ema: float = 0.0  # EMA decay of the policy weights (0: no EMA), e.g. 0.99; the exported policy is the EMA
    temperature: float = 1.0  # sampling temperature; log-probabilities are taken at the same temperature
    estimator: Estimator = "gae"  # the advantage estimator (see `instructgpt.rl`); only gae trains a value model
    group_size: int = 1  # G: samples of each prompt, side by side in one batch; --batch-size counts samples
    # G > 1 in one process: prefill each prompt once for its G samples (the continuous-batching engine), not G
    # times (the static batch, which torchrun's ranks always use: they decode in step)
    shared_prefill: bool = True
    # the KL to the reference: a penalty in the rewards, a k3 term in the loss, or none; auto: loss for grpo and
    # dr_grpo, reward for the others
    kl_mode: KLMode = "auto"
    # the per-token loss to one number: the mean over tokens, the mean over responses of their token means, or
    # token sums / --max-new-tokens; auto: sequence_mean for grpo, token_sum for dr_grpo, token_mean for the others
    loss_agg: LossAgg = "auto"

    def resolved(self) -> PPOConfig:
        """This config with kl_mode and loss_agg "auto" replaced by the estimator's own."""
        auto_kl = DEFAULT_KL_MODE.get(self.estimator, "reward")
        auto_agg = DEFAULT_LOSS_AGG.get(self.estimator, "token_mean")
        return replace(self, kl_mode=auto_kl if self.kl_mode == "auto" else self.kl_mode,
                       loss_agg=auto_agg if self.loss_agg == "auto" else self.loss_agg)

    @property
    def critic(self) -> bool:
        """Whether the estimator needs a value model."""
        return self.estimator == "gae"

    def validate(self) -> None:
        checks = [
            (self.beta >= 0, f"--beta must be >= 0, got {self.beta}"),
            (self.kl_target is None or self.kl_target > 0, f"--kl-target must be positive, got {self.kl_target}"),
            (self.kl_horizon >= 1, f"--kl-horizon must be at least 1, got {self.kl_horizon}"),
            (0 <= self.gamma <= 1, f"--gamma must be in [0, 1], got {self.gamma}"),
            (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
            (self.clip > 0, f"--clip must be positive, got {self.clip}"),
            (self.value_clip > 0, f"--value-clip must be positive, got {self.value_clip}"),
            (self.ppo_epochs >= 1, f"--ppo-epochs must be at least 1, got {self.ppo_epochs}"),
            (self.minibatches >= 1, f"--minibatches must be at least 1, got {self.minibatches}"),
            (self.ptx_coef >= 0, f"--ptx-coef must be >= 0, got {self.ptx_coef}"),
            (math.isfinite(self.missing_end_penalty),
             f"--missing-end-penalty must be finite, got {self.missing_end_penalty}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.temperature > 0, f"--temperature must be positive for PPO, got {self.temperature}"),
            (self.estimator in get_args(Estimator), f"--estimator must be one of {', '.join(get_args(Estimator))}"),
            (self.kl_mode in get_args(KLMode), f"--kl-mode must be one of {', '.join(get_args(KLMode))}"),
            (self.loss_agg in get_args(LossAgg), f"--loss-agg must be one of {', '.join(get_args(LossAgg))}"),
            (self.group_size >= 1, f"--group-size must be at least 1, got {self.group_size}"),
            (self.estimator not in GROUP_ESTIMATORS or self.group_size >= 2,
             f"--estimator {self.estimator} compares the samples of a prompt with one another: give --group-size "
             f"2 or more (got {self.group_size})"),
            (self.kl_mode != "none" or self.kl_target is None,
             "--kl-target adapts the KL coefficient: it needs a KL (drop --kl-mode none)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ----------------------------------------------------------------------------------------------------
# 1. Rollouts


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P + R): left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (the end token included)
    ended: torch.Tensor  # (B,) bool: the response produced the end token
    prompt_len: int  # P

    @property
    def response(self) -> torch.Tensor:
        return self.ids[:, self.prompt_len:]  # (B, R)

    def response_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.response, self.response_mask.sum(1).tolist())]


class GumbelPolicy(nn.Module):
    """The policy as the rollouts decode it: its next-token logits / temperature plus Gumbel noise -log(E),
    E ~ Exp(1), so that greedy decoding draws from softmax(logits / temperature) (the Gumbel-max trick, which
    is also how torch.multinomial samples). Each decode step draws the noise of the whole global batch from a
    generator in the same state on every rank, and keeps this rank's rows: a row's sample depends on its place
    in the global batch, not on the rank that decodes it, so N ranks with B prompts each sample exactly what
    one process with the N x B prompts does."""

    def __init__(self, policy: GPT, temperature: float, generator: torch.Generator | None, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        self.policy, self.config = policy, policy.config
        self.temperature, self.generator = temperature, generator
        self.rank, self.world_size = rank, world_size

    def forward(self, *args, **kwargs) -> torch.Tensor:
        logits = self.policy(*args, **kwargs)[:, -1:].float() / self.temperature  # (B, 1, V)
        B, _, V = logits.shape
        e = torch.empty(self.world_size * B, V, device=logits.device).exponential_(generator=self.generator)
        e = e[self.rank * B:(self.rank + 1) * B]  # (B, V): this rank's rows of the global batch
        return logits - e.log()[:, None]


def rollout(policy: GPT, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | Sequence[int], pad_id: int,
            generator: torch.Generator | None, runtime: Runtime | None = None, group_size: int = 1,
            shared_prefill: bool = True) -> Rollout:
    """1. Sample one response per prompt (lists of ids; a prompt given G times gets G samples) with the
    generation engine, at params.temperature. The rows of a group of `group_size` are side by side.

    With G > 1 in one process (and `shared_prefill`), the continuous-batching engine prefills each prompt
    once and decodes its G samples from copies of its keys and values (`sample_groups`): G times fewer
    prompt tokens through the model. Otherwise one static batch (`sample_static`), whose rows' samples depend
    on their place in the global batch only: under torchrun the prompts are this rank's slice of it, and
    generation runs until every rank's rows have ended, so a sharded policy runs its forwards in step on
    every rank (invariant 12). The Rollout has the same layout either way."""
    if params.temperature <= 0 or params.top_k or params.top_p < 1:
        raise ValueError("rollouts sample from the whole distribution at a positive temperature (no top-k, top-p)")
    distributed = runtime is not None and runtime.distributed
    if shared_prefill and group_size > 1 and not distributed:
        gen = sample_groups(policy, prompt_ids, params, eos_id, pad_id, generator, group_size)
    else:
        gen = sample_static(policy, prompt_ids, params, eos_id, pad_id, generator, runtime)
    device = next(policy.parameters()).device
    prompt, prompt_mask = (t.to(device) for t in pad(prompt_ids, pad_id, "left"))  # (B, P) each
    tokens, lengths = gen.tokens.to(device), gen.lengths.to(device)  # (B, R), (B,)
    resp_mask = (torch.arange(tokens.size(1), device=device)[None] < lengths[:, None]).long()  # (B, R)
    ids = torch.cat([prompt, tokens], 1)  # (B, P + R)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    return Rollout(ids, mask, resp_mask, gen.ended.to(device), prompt.size(1))


def sample_static(policy: GPT, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | Sequence[int],
                  pad_id: int, generator: torch.Generator | None, runtime: Runtime | None = None) -> Generation:
    """The B responses (B, R) of one static batch: greedy decoding of GumbelPolicy, whose noise for a row is
    drawn at its place in the global batch of every rank; every prompt prefilled, G times for a group."""
    rank, world_size = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    sampler = GumbelPolicy(policy, params.temperature, generator, rank, world_size)
    all_finished = all_ranks_finished(runtime) if runtime is not None else None
    return generate(sampler, prompt_ids, replace(params, temperature=0.0), eos_id, pad_id, all_finished=all_finished)


def sample_groups(policy: GPT, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | Sequence[int],
                  pad_id: int, generator: torch.Generator | None, group_size: int) -> Generation:
    """The B responses (B, R) of B / G groups of G rows that share a prompt, with the continuous-batching
    engine: each prompt prefilled once, its G samples decoded from copies of its cache, all B rows at once.
    Group i draws from its own generator, seeded with the i-th of B / G seeds drawn from `generator` (so
    `generator` advances by the same draws whatever the samples, and a resumed run finds the same state)."""
    B, G = len(prompt_ids), group_size
    if B % G:
        raise ValueError(f"{B} rollout prompts do not split into groups of {G}")
    firsts = [list(prompt_ids[i]) for i in range(0, B, G)]
    if any(list(p) != firsts[i // G] for i, p in enumerate(prompt_ids)):
        raise ValueError(f"the {G} rows of a group must hold the same prompt, side by side")
    return generate_many(policy, firsts, params, eos_id, pad_id, max_batch=B, n=G, generator=generator)


# ----------------------------------------------------------------------------------------------------
# 2. Scoring


def score_rollout(ro: Rollout, policy: GPT, ref: GPT | None, value_model: ScalarModel | None,
                  reward_model: ScalarModel | None, runtime: Runtime, temperature: float = 1.0
                  ) -> dict[str, torch.Tensor]:
    """2. Old and reference log-probabilities (B, R); with a value model, old values (B, R); with a reward
    model, the score of each response (B,), read at its last real token (the attention mask says where).
    `ref` None: the policy trains LoRA adapters and is its own reference with them switched off."""
    ids, mask, P = ro.ids, ro.attention_mask, ro.prompt_len
    out = {}
    with torch.no_grad(), runtime.autocast():
        out["old_logp"] = response_logprobs(policy, ids, mask, P, temperature)
        with adapters_off(policy) if ref is None else contextlib.nullcontext():
            out["ref_logp"] = response_logprobs(policy if ref is None else ref, ids, mask, P, temperature)
        if value_model is not None:
            out["old_values"] = response_values(value_model, ids, mask, P)
        if reward_model is not None:
            scores = rewards_of(reward_model, ids, mask)  # (B,) at each row's last real token
            if not torch.isfinite(scores).all():
                raise UserError("the reward model returned a non-finite score; check its checkpoint")
            out["scores"] = scores
    return out


def score_responses(fns: Sequence[tuple[str, RewardFn, float]], model: tuple[torch.Tensor, float] | None,
                    prompts: Sequence[list[dict]], responses: Sequence[str], records: Sequence[dict],
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The score of each response (B,): the weighted sum of the reward model's scores and each reward
    function's; and every part unweighted (B,), by name ("model" for the reward model).

    Args:
        fns: (name, fn(prompt messages, response, record) -> float, weight) of each reward function; one that
            raises or returns anything but a finite number stops the run naming it (`rewards.score_batch`).
        model: the reward model's scores (B,), taken from the token ids by `score_rollout`, and its weight.
        prompts, responses, records: the B conversations up to the reply, the replies, the prompt records'
            other fields (`Prompt.meta`: the reference a verifiable reward checks against).
    """
    parts, weights = {}, []
    if model is not None:
        parts["model"], w = model
        weights.append(w)
    for name, fn, w in fns:
        parts[name] = score_batch(fn, prompts, responses, records, name).to(device)
        weights.append(w)
    if not parts:
        raise ValueError("no reward: give a reward model's scores or at least one reward function")
    terms = [w * s for w, s in zip(weights, parts.values())]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total, parts


# ----------------------------------------------------------------------------------------------------
# 3-4. Rewards and advantages


def estimate_advantages(cfg: PPOConfig, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None,
                        runtime: Runtime | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """4. Advantages (B, R) of the per-token rewards (B, R) by cfg.estimator, and for gae the returns (B, R)
    that the value model learns (None for the critic-free estimators)."""
    if cfg.estimator == "gae":
        adv, returns = compute_advantages(values, rewards, mask, cfg.gamma, cfg.lam)
        return masked_whiten(adv, mask, runtime=runtime), returns
    if cfg.estimator == "reinforce_pp":
        return reinforce_pp_advantages(rewards, mask, runtime=runtime), None
    seq = rewards.sum(1)  # (B,): each response's reward, its score less the KL penalty if that is in the rewards
    G = cfg.group_size
    per_response = {
        "grpo": lambda: grpo_advantages(seq, G),
        "dr_grpo": lambda: grpo_advantages(seq, G, scale="none"),
        "rloo": lambda: rloo_advantages(seq, G),
        "reinforce": lambda: reinforce_advantages(seq),
    }[cfg.estimator]()  # (B,)
    return sequence_to_tokens(per_response, mask), None


def make_experience(ro: Rollout, scored: dict[str, torch.Tensor], cfg: PPOConfig, beta: float,
                    runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """3-4. From the scored rollout to what the update needs: the penalised scores (B,), per-token rewards and
    KL (B, R) (the KL penalty in the rewards only with kl_mode "reward"), each response's non-score reward
    (B,), advantages (B, R) by the estimator, and for gae the returns (B, R). The KL here is the one logged."""
    cfg = cfg.resolved()
    mask = ro.response_mask.float()
    # A response cut off at max_new_tokens loses missing_end_penalty (TRL's missing_eos_penalty), so that
    # rambling on is never a way around a reward that dislikes how an answer ends.
    scores = scored["scores"] - cfg.missing_end_penalty * (~ro.ended).float()
    reward_beta = beta if cfg.kl_mode == "reward" else 0.0
    rewards, kl = compute_rewards(scores, scored["old_logp"], scored["ref_logp"], mask, reward_beta)
    adv, returns = estimate_advantages(cfg, rewards, mask, scored.get("old_values"), runtime)
    exp = {**scored, "mask": mask, "penalised_scores": scores, "rewards": rewards, "kl": kl,
           "non_score_reward": -reward_beta * kl.sum(1), "advantages": adv}
    return exp if returns is None else exp | {"returns": returns}


def rollout_metrics(exp: dict[str, torch.Tensor], ended: torch.Tensor, beta: float, runtime: Runtime | None = None,
                    group_size: int = 1, parts: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """What the rollouts say, under TRL's names: PPO's (sums over each response's tokens, means over the
    responses) and GRPO's (`reward`, `kl` and `entropy` per token, `completion_length`, `rewards/<name>` for
    each part of the score; with groups, `reward_std`, the mean over prompts of the std of their samples'
    rewards, and `frac_reward_zero_std`, the share of prompts whose samples all got the same reward). Over
    every rank: each holds as many responses and groups, so the mean of the ranks' means; token means from
    the sums."""
    mask = exp["mask"]
    kl = exp["kl"].sum(1)  # (B,)
    means = {
        "objective/kl": float(kl.mean()),
        "objective/entropy": float(-(exp["old_logp"] * mask).sum(1).mean()),
        "objective/scores": float(exp["scores"].mean()),
        "objective/non_score_reward": float(exp["non_score_reward"].mean()),
        "objective/rlhf_reward": float((exp["penalised_scores"] + exp["non_score_reward"]).mean()),
        "val/ended": float(ended.float().mean()),
        "val/response_length": float(mask.sum(1).mean()),
        **{f"rewards/{name}": float(s.float().mean()) for name, s in (parts or {}).items()},
    }
    if group_size > 1:
        groups = exp["scores"].float().view(-1, group_size)  # (B / G, G)
        means["reward_std"] = float(groups.std(1).mean())
        means["frac_reward_zero_std"] = float((groups == groups[:, :1]).all(1).float().mean())
    sums = {"k3": float(kl_k3(exp["old_logp"], exp["ref_logp"], mask).sum()),
            "neg_logp": float(-(exp["old_logp"] * mask).sum()), "tokens": float(mask.sum())}
    if runtime is not None and runtime.distributed:
        means = {k: v / runtime.world_size for k, v in all_reduce_sums(means, runtime).items()}
        sums = all_reduce_sums(sums, runtime)
    tokens = max(sums["tokens"], 1.0)
    return {"objective/kl_coef": beta, **means, "reward": means["objective/scores"], "kl": sums["k3"] / tokens,
            "entropy": sums["neg_logp"] / tokens, "completion_length": means["val/response_length"]}


# ----------------------------------------------------------------------------------------------------
# 5. The update


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                      clip: float, n: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al., 2017) per token, to minimise once aggregated (`aggregate`):

        l_t = -min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t),   rho_t = pi(y_t) / pi_old(y_t)

    Args:
        logp, old_logp, adv, mask: (B, R) log-probabilities now and at the rollout, advantages, real tokens.
        n: the minibatch's token count over every rank; the statistics are this rank's shares of their means.
    Returns:
        l (B, R) and the statistics of `losses.policy_loss` (the token mean of l is that loss).
    """
    log_ratio = (logp - old_logp) * mask
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    with torch.no_grad():
        stats = {
            "policy/approxkl": float(token_mean(0.5 * log_ratio**2, mask, n)),
            "policy/clipfrac": float(token_mean((clipped > unclipped).float(), mask, n)),
            "policy/ratio": float(token_mean(ratio, mask, n)),
            "policy/ratio_maxdev": float(((ratio - 1).abs() * mask).max()),
        }
    return torch.maximum(unclipped, clipped), stats


def aggregate(loss: torch.Tensor, mask: torch.Tensor, how: LossAgg, n_tokens: torch.Tensor, n_responses: int,
              max_len: int | None) -> torch.Tensor:
    """A per-token loss (B, R) as this rank's share of the minibatch's loss (`advantages`: token_mean,
    sequence_mean, token_sum_norm), given the minibatch's tokens and responses over every rank."""
    if how == "token_mean":
        return token_mean(loss, mask, n_tokens)
    if how == "sequence_mean":
        return sequence_mean(loss, mask, n_responses)
    if max_len is None:
        raise ValueError("the token_sum aggregation divides by the generation limit: give max_len")
    return token_sum_norm(loss, mask, max_len, n_responses)


def micro_batch_loss(policy: nn.Module, value_model: nn.Module | None, ro: Rollout, exp: dict[str, torch.Tensor],
                     i: torch.Tensor, cfg: PPOConfig, runtime: Runtime, n: torch.Tensor, n_responses: int,
                     beta: float, max_len: int | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of rollouts `i` (this rank's share of the minibatch's) without PPO-ptx's term, and its
    statistics: the policy's clipped surrogate, with kl_mode "loss" beta times the k3 KL to the reference
    (both aggregated by cfg.loss_agg), and with a value model its clipped value loss (a token mean)."""
    ids, amask, mask = ro.ids[i], ro.attention_mask[i], exp["mask"][i]
    with runtime.autocast():
        logp = response_logprobs(policy, ids, amask, ro.prompt_len, cfg.temperature)
        values = response_values(value_model, ids, amask, ro.prompt_len) if value_model is not None else None
    surrogate, stats = clipped_surrogate(logp, exp["old_logp"][i], exp["advantages"][i], mask, cfg.clip, n)
    loss = pl = aggregate(surrogate, mask, cfg.loss_agg, n, n_responses, max_len)
    stats["loss/policy"] = float(pl.detach())
    if cfg.kl_mode == "loss":
        kl = aggregate(kl_k3(logp, exp["ref_logp"][i], mask), mask, cfg.loss_agg, n, n_responses, max_len)
        loss = loss + beta * kl
        stats["loss/kl"] = float(kl.detach())
    if values is not None:
        vl, vstats = value_loss(values, exp["old_values"][i], exp["returns"][i], mask, cfg.value_clip, n)
        loss = loss + vl
        stats |= vstats | {"loss/value": float(vl.detach())}
    return loss, stats


def ppo_update(policy: GPT, value_model: ScalarModel | None, opt_p: torch.optim.Optimizer,
               opt_v: torch.optim.Optimizer | None, ro: Rollout, exp: dict[str, torch.Tensor], cfg: PPOConfig,
               runtime: Runtime, rng: np.random.Generator, lr: float, grad_clip: float = 1.0,
               ptx: PretrainWindows | None = None, grad_accum: int = 1, beta: float = 0.0,
               max_len: int | None = None) -> dict[str, float]:
    """5. cfg.ppo_epochs passes over the rollout batch in cfg.minibatches shuffled minibatches, one optimizer
    step of the policy (and of the value model, for gae) per minibatch, its gradients added up over grad_accum
    micro-batches (the same step in less memory). `beta` weighs the k3 term of kl_mode "loss"; `max_len` (the
    generation limit) divides the token_sum aggregation. Returns the mean of each statistic, and the ratio and
    approximate KL of the very first minibatch (1 and 0: nothing has moved yet).

    Under torchrun (the models wrapped by `prepare_model`) a minibatch is every rank's share of its own
    shuffled rollouts; its losses and statistics are means over the tokens (or responses) of every rank."""
    cfg = cfg.resolved()
    B, W = ro.ids.size(0), runtime.world_size
    if B % (cfg.minibatches * grad_accum):
        raise UserError(f"the batch of {B} rollouts does not split into {cfg.minibatches} equal minibatches of "
                        f"{grad_accum} equal micro-batches")
    mb = B // cfg.minibatches
    models = {"policy": policy} | ({"value": value_model} if value_model is not None else {})
    optimizers = [opt for opt in (opt_p, opt_v) if opt is not None]
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    for m in models.values():
        m.train()
    stats: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.from_numpy(rng.permutation(B)).to(ro.ids.device)
        for s in range(0, B, mb):
            idx = order[s:s + mb]
            n = all_reduce(exp["mask"][idx].sum(), runtime).clamp(min=1)  # the minibatch's response tokens, all ranks
            if ptx is not None:  # this rank's rows of the windows drawn for the whole minibatch
                w = {k: v.to(ro.ids.device) for k, v in rank_rows(ptx.batch(mb * W), runtime).items()}
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            row: dict[str, float] = {}
            for part in (slice(j * mb // grad_accum, (j + 1) * mb // grad_accum) for j in range(grad_accum)):
                loss, part_stats = micro_batch_loss(policy, value_model, ro, exp, idx[part], cfg, runtime, n, mb * W,
                                                    beta, max_len)
                if ptx is not None:
                    with runtime.autocast():
                        logits = policy(w["ids"][part])
                    ptx_loss = token_cross_entropy(logits, w["labels"][part]) / (w["labels"].numel() * W)
                    loss = loss + cfg.ptx_coef * ptx_loss
                    part_stats["loss/ptx"] = float(ptx_loss.detach())
                # each rank's loss is its share of the minibatch's mean; DDP and FSDP average gradients over
                # ranks (at every micro-batch: they add up in .grad all the same)
                (loss * W).backward()
                for k, v in part_stats.items():  # shares of the means add up; the ratio's deviation is the max
                    row[k] = v if k not in row else max(row[k], v) if k == "policy/ratio_maxdev" else row[k] + v
            ratio_maxdev = row.pop("policy/ratio_maxdev")
            row = all_reduce_sums(row, runtime)
            check_finite_loss(row, cfg, beta)
            # a finite loss can still have a non-finite gradient (a bf16 overflow): every rank stops before the step
            train.clip_and_check(models, grad_clip)
            for opt in optimizers:
                opt.step()
            if not first:
                maxdev = all_reduce(torch.tensor(ratio_maxdev, device=ro.ids.device), runtime, op="max")
                first = {"policy/first_ratio_maxdev": float(maxdev), "policy/first_approxkl": row["policy/approxkl"]}
            for k, v in row.items():
                stats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in stats.items()} | first


def check_finite_loss(row: dict[str, float], cfg: PPOConfig, beta: float) -> None:
    """Stop before any step when a minibatch's loss (its sums over every rank: the same on each) is not finite."""
    total = (row["loss/policy"] + row.get("loss/value", 0.0) + beta * row.get("loss/kl", 0.0)
             + cfg.ptx_coef * row.get("loss/ptx", 0.0))
    if not math.isfinite(total):
        parts = ", ".join(f"{k.removeprefix('loss/')} {v}" for k, v in row.items() if k.startswith("loss/"))
        raise train.DivergedError(f"PPO loss is {total} ({parts}); try a lower --lr or a higher --beta")


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)
