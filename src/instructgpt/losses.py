"""Losses and the RL math, each a small function with its formula: token cross-entropy, log-probabilities
of sequences, the reward model's ranking loss, DPO, and PPO's rewards, advantages, policy and value losses
and KL controller. Stages compose them; nothing here knows a stage, a file or a flag.

Shapes: B rows, T positions, V vocabulary; for PPO, R response positions of right-padded responses.
Everything that is a log-probability or a loss is computed in fp32, also under bf16 autocast (invariant 13).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .batching import IGNORE
from .distributed import Runtime, all_reduce
from .model import GPT, ScalarModel, last_token_index, positions_from_mask

# ----------------------------------------------------------------------------------------------------
# Language modelling


def token_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """SUM over non-ignored targets of -log p(target): logits (..., V), targets (...). Computed in fp32
    (log-softmax in fp32 even under bf16 autocast, invariant 13); divide by the step's target count."""
    V = logits.size(-1)
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def seq2seq_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    logits = model(batch["src"], batch["tgt"], src_mask=batch["src_mask"])  # (B, T, V)
    return token_cross_entropy(logits, batch["labels"])


# ----------------------------------------------------------------------------------------------------
# Log-probabilities of sequences, and DPO (Rafailov et al., 2023)


def sequence_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens (B,), in fp32 (invariant 13)."""
    logits = model(batch["ids"], attention_mask=batch["attention_mask"]).float()  # (B, T, V)
    labels = batch["labels"]
    logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T)
    return (logp * (labels != IGNORE)).sum(1)


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (N,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected.

    Args:
        pi_w, pi_l: (N,) summed log-probabilities of the chosen / rejected responses under the policy.
        ref_w, ref_l: (N,) the same under the reference.
        beta: the strength of the implicit KL constraint.
    Returns:
        (loss (N,), chosen rewards (N,), rejected rewards (N,)); the rewards are detached.
    """
    chosen = beta * (pi_w - ref_w)
    rejected = beta * (pi_l - ref_l)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


# ----------------------------------------------------------------------------------------------------
# The reward model: a score per sequence, and the ranking loss (paper section 3.5, equation 1)


def rewards_of(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Reward (N,) of each row: the value at its last real token, in fp32. Calls the module itself (not
    `.score`) so that it works through torch.compile and DDP wrappers."""
    values = model(ids, mask).float()  # (N, T)
    return values.gather(1, last_token_index(mask)[:, None]).squeeze(1)


def ranking_loss(rewards: torch.Tensor, pairs: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum over prompts of the mean pairwise loss of each prompt (paper equation 1).

    Args:
        rewards: (N,) one reward per completion, all prompts' completions concatenated.
        pairs: (P, 2) indices into `rewards`: (winner, loser).
        group: (P,) the prompt each pair belongs to, in [0, n_groups).
    Returns:
        a scalar: sum over prompts of -1/C(K,2) * sum over the prompt's pairs of log sigmoid(r_w - r_l).
    """
    pair_loss = -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]])  # (P,)
    per_prompt = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device)
    per_prompt.index_add_(0, group, pair_loss)
    count = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device)
    count.index_add_(0, group, torch.ones_like(pair_loss))
    return (per_prompt / count).sum()


# ----------------------------------------------------------------------------------------------------
# PPO (paper section 3.5, appendix C.4): rewards, advantages, losses, the KL coefficient


def masked_mean(x: torch.Tensor, mask: torch.Tensor, n: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x over the real tokens; with `n` (the token count of every rank), this rank's share of the mean
    over every rank's tokens: the ranks' shares add up to it."""
    return (x * mask).sum() / (mask.sum().clamp(min=1) if n is None else n)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8,
                  runtime: Runtime | None = None) -> torch.Tensor:
    """(x - mean) / std over the real tokens (of every rank under torchrun); padding stays 0."""
    n = all_reduce(mask.sum(), runtime).clamp(min=1)
    mean = all_reduce(masked_mean(x, mask, n), runtime)
    var = all_reduce(masked_mean((x - mean) ** 2, mask, n), runtime)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def compute_rewards(scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor,
                    beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """3. Per-token rewards: the KL penalty at every response token plus the score at the last one.

        r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) + [t = last real token] * score

    Args:
        scores: (B,) one score per response (the reward model's, already penalised if it never ended).
        logp, ref_logp: (B, R) log-probabilities of the response tokens under the policy and the reference.
        mask: (B, R) 1 on real response tokens (right-padded: a prefix of each row), 0 on padding.
    Returns:
        rewards (B, R) and kl (B, R) = log pi - log pi_ref, both 0 on padding.
    """
    lengths = mask.sum(1).long()  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(f"response {int((lengths == 0).nonzero()[0])} has no token: its reward has nowhere to go")
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (lengths - 1)[:, None]  # (B, 1) index of the last real token
    rewards = rewards.scatter_add(1, last, scores[:, None].to(rewards.dtype))
    return rewards, kl


def compute_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                       lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """4. Generalised advantage estimation (Schulman et al., 2016) over right-padded responses:

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t = delta_t + gamma * lam * A_{t+1} = sum_{k>=t} (gamma * lam)^(k-t) * delta_k

    with V and A zero past the end of each response (its last token is terminal). The backward recursion is
    one matmul with the upper-triangular matrix of discounts (R x R), exact and free of a loop over time.

    Args:
        values: (B, R) V(s_t), the value of the state before each response token.
        rewards: (B, R) per-token rewards, 0 on padding.
        mask: (B, R) 1 on real response tokens, a prefix of each row.
    Returns:
        advantages (B, R) and returns = advantages + values (B, R), both 0 on padding.
    """
    R = rewards.size(1)
    values = values * mask
    next_values = F.pad(values[:, 1:], (0, 1))  # (B, R): V_{t+1}, 0 after the last token
    deltas = (rewards + gamma * next_values - values) * mask
    t = torch.arange(R, device=rewards.device)
    lag = t[None, :] - t[:, None]  # (R, R): k - t
    base = torch.tensor(gamma * lam, dtype=rewards.dtype, device=rewards.device)
    discount = torch.where(lag >= 0, base ** lag.clamp(min=0), torch.zeros((), dtype=rewards.dtype))  # [t, k]
    adv = (deltas @ discount.T) * mask  # (B, R): adv[b, t] = sum_k deltas[b, k] * discount[t, k]
    return adv, adv + values


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                clip: float, n: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """PPO's clipped surrogate (Schulman et al., 2017), to minimise, over (B, R) response tokens:

        L = -E_t[min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t)],  rho_t = pi(y_t) / pi_old(y_t)

    With `n` (the minibatch's token count over every rank) the loss and the means among the statistics are
    this rank's shares (see `masked_mean`)."""
    log_ratio = (logp - old_logp) * mask
    ratio = log_ratio.exp()
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1 - clip, 1 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask, n)
    with torch.no_grad():
        stats = {
            "policy/approxkl": float(masked_mean(0.5 * log_ratio**2, mask, n)),
            "policy/clipfrac": float(masked_mean((clipped > unclipped).float(), mask, n)),
            "policy/ratio": float(masked_mean(ratio, mask, n)),
            "policy/ratio_maxdev": float(((ratio - 1).abs() * mask).max()),
        }
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, n: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped value loss over (B, R) tokens: 0.5 * E_t[max((V - G)^2, (clip(V, V_old - eps, V_old + eps) - G)^2)];
    `n` as in `policy_loss`."""
    clipped_v = old_values + (values - old_values).clamp(-clip, clip)
    l1, l2 = (values - returns) ** 2, (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask, n)
    return loss, {"val/clipfrac": float(masked_mean((l2 > l1).float(), mask, n))}


class AdaptiveKL:
    """The KL coefficient. Fixed without a target; with one, the controller of Ziegler et al. (2019):

        beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon)   after n rollouts of mean KL."""

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
# PPO's per-token log-probabilities and values of right-padded responses


def response_logprobs(model: GPT, ids: torch.Tensor, mask: torch.Tensor, P: int,
                      temperature: float = 1.0) -> torch.Tensor:
    """log pi(y_t | x, y_<t) (B, R) of each response token, at the sampling temperature, in fp32."""
    pos = positions_from_mask(mask)
    logits = model(ids, attention_mask=mask, position_ids=pos, logits_slice=slice(P - 1, -1))  # (B, R, V)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits.transpose(1, 2), ids[:, P:], reduction="none")


def response_values(model: ScalarModel, ids: torch.Tensor, mask: torch.Tensor, P: int) -> torch.Tensor:
    """V (B, R) of the state before each response token: the value at the position that predicts it."""
    values = model(ids, attention_mask=mask, position_ids=positions_from_mask(mask))  # (B, P + R)
    return values[:, P - 1:-1].float()
