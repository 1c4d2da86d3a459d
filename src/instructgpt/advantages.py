"""Critic-free advantages for group RL (GRPO, Dr. GRPO, RLOO, REINFORCE, REINFORCE++), the k3 KL estimator,
and the ways to turn a per-token loss into one number. Each is a small function with its formula; stages
compose them with `losses` (whose `compute_rewards` puts the KL penalty into per-token rewards and whose
`policy_loss` is the clipped surrogate). Nothing here knows a stage, a file or a flag.

Shapes: B responses; G responses per prompt (a group); T response positions of right-padded responses, with a
(B, T) mask that is 1 on real tokens (a prefix of each row). Scores are (B,), one per response. Groups are
given either as G, the size of contiguous groups (rows 0..G-1 answer the first prompt, G..2G-1 the second ...),
or as a (B,) tensor of group indices (any non-negative integers; rows with the same index share a prompt).
Under torchrun every group lives on one rank; only REINFORCE++'s whitening spans the ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .distributed import Runtime
from .losses import masked_mean, masked_whiten

# ----------------------------------------------------------------------------------------------------
# Groups


def group_index(group: Tensor | int, B: int, device: torch.device | None = None) -> Tensor:
    """The (B,) group index of each response, in 0..n-1 for n groups: for contiguous groups of G, i // G."""
    if isinstance(group, int):
        if group < 1 or B % group:
            raise ValueError(f"{B} responses do not split into groups of {group}")
        return torch.arange(B, device=device) // group
    if group.shape != (B,):
        raise ValueError(f"group indices have shape {tuple(group.shape)}, expected ({B},)")
    if group.is_floating_point() or (B and int(group.min()) < 0):
        raise ValueError("group indices must be non-negative integers")
    return torch.unique(group, return_inverse=True)[1].to(device)  # 0..n-1, however sparse the given ones


def group_sums(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """For each of the B entries of x, the sum of x over its group and the size of its group, both (B,)."""
    n = int(idx.max()) + 1 if idx.numel() else 0
    sums = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    counts = torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, idx, torch.ones_like(x))
    return sums[idx], counts[idx]


def group_centred(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """x minus the mean of its group, and the group sizes, both (B,). The mean is taken of x minus the group's
    largest value, so that a group whose scores are all equal gets exactly 0, not rounding noise that the
    division by its (equally tiny) std would blow up."""
    n = int(idx.max()) + 1 if idx.numel() else 0
    top = torch.zeros(n, dtype=x.dtype, device=x.device).scatter_reduce(0, idx, x, "amax", include_self=False)
    shifted = x - top[idx]
    sums, counts = group_sums(shifted, idx)
    return shifted - sums / counts, counts


def _float(scores: Tensor) -> Tensor:
    """Scores as floating point of at least fp32 precision (float64 stays float64)."""
    return scores.to(torch.promote_types(scores.dtype, torch.float32))


def _sizes(counts: Tensor, what: str) -> None:
    if bool((counts < 2).any()):
        raise ValueError(f"{what} needs at least 2 responses per prompt: a group of one has no baseline")


# ----------------------------------------------------------------------------------------------------
# Advantages of whole responses, (B,)


def reinforce_advantages(scores: Tensor) -> Tensor:
    """Plain REINFORCE (Williams, 1992) without a baseline: A_i = r_i. The reference the baselines below improve
    on; with G = 1 it is what a group estimator would have to reduce to."""
    return _float(scores).clone()


def grpo_advantages(scores: Tensor, group: Tensor | int, eps: float = 1e-6, scale: str = "std") -> Tensor:
    """GRPO's group-relative advantage (Shao et al., 2024, DeepSeekMath section 4.1.2,
    https://arxiv.org/abs/2402.03300), the score against the other answers to the same prompt:

        A_i = (r_i - mean_group(r)) / (std_group(r) + eps)      scale="std"
        A_i =  r_i - mean_group(r)                               scale="none": Dr. GRPO (Liu et al., 2025,
                                                                 https://arxiv.org/abs/2503.20783)

    std is the sample standard deviation (Bessel-corrected, as TRL and OpenRLHF take it). Dr. GRPO drops it
    because dividing by it weights prompts whose answers all score alike (too easy or too hard) the most.

    Args:
        scores: (B,) one score per response.
        group: G for contiguous groups, or (B,) group indices; every group needs at least 2 responses.
    Returns:
        (B,) advantages; they sum to 0 within each group.
    """
    if scale not in ("std", "none"):
        raise ValueError(f'scale must be "std" or "none", got {scale!r}')
    r = _float(scores)
    idx = group_index(group, r.numel(), r.device)
    centred, counts = group_centred(r, idx)
    _sizes(counts, "GRPO")
    if scale == "none":
        return centred
    var = group_sums(centred**2, idx)[0] / (counts - 1)
    return centred / (var.sqrt() + eps)


def rloo_advantages(scores: Tensor, group: Tensor | int) -> Tensor:
    """REINFORCE Leave-One-Out (Ahmadian et al., 2024, section 3.2, https://arxiv.org/abs/2402.14740; Kool et
    al., 2019): each response's baseline is the mean score of the other G - 1 answers to its prompt,

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j = G/(G-1) * (r_i - mean_group(r)),

    an unbiased baseline, since it does not depend on response i.

    Args:
        scores: (B,) one score per response.
        group: G for contiguous groups, or (B,) group indices; every group needs at least 2 responses.
    Returns:
        (B,) advantages; they sum to 0 within each group.
    """
    r = _float(scores)
    idx = group_index(group, r.numel(), r.device)
    centred, counts = group_centred(r, idx)
    _sizes(counts, "RLOO")
    return counts / (counts - 1) * centred


# ----------------------------------------------------------------------------------------------------
# Advantages per token, (B, T)


def sequence_to_tokens(adv: Tensor, mask: Tensor) -> Tensor:
    """A response's advantage (B,) given to each of its tokens (B, T); 0 on padding."""
    return adv[:, None] * mask


def reinforce_pp_advantages(token_rewards: Tensor, mask: Tensor, eps: float = 1e-8,
                            runtime: Runtime | None = None) -> Tensor:
    """REINFORCE++ (Hu, 2025, section 3, https://arxiv.org/abs/2501.03262): no critic, no groups; the
    return-to-go of the per-token rewards with gamma = 1, whitened over every response token of the batch:

        G_t = sum_{k >= t} r_k,    A_t = (G_t - mean(G)) / std(G)

    The per-token rewards are `losses.compute_rewards`'s: -beta * (log pi_old - log pi_ref) at every token plus
    the score at the last one, so G_t is the score minus the KL penalty still to come.

    Args:
        token_rewards: (B, T) per-token rewards, 0 on padding.
        mask: (B, T) 1 on real response tokens.
        runtime: under torchrun, the mean and std are taken over the tokens of every rank.
    Returns:
        (B, T) advantages with masked mean 0 and standard deviation 1 (population), 0 on padding.
    """
    r = token_rewards * mask
    returns = r.flip(1).cumsum(1).flip(1)  # (B, T): G_t, the sum of r_k for k >= t
    return masked_whiten(returns, mask, eps, runtime)


# ----------------------------------------------------------------------------------------------------
# KL as a loss term


def kl_k3(logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-token KL(pi || pi_ref) by Schulman's k3 estimator (http://joschu.net/blog/kl-approx.html), the one
    GRPO adds to its loss (DeepSeekMath equation 4):

        k3 = exp(d) - d - 1,   d = log pi_ref(y_t) - log pi(y_t)

    unbiased for y_t ~ pi and, unlike log pi - log pi_ref, never negative. `losses.compute_rewards` is the
    other way: the KL as a penalty in the rewards.

    Args:
        logp, ref_logp: (B, T) log-probabilities of the sampled tokens under the policy and the reference.
        mask: (B, T) 1 on real tokens; padding gets 0.
    Returns:
        (B, T) k3, in fp32 or wider.
    """
    d = _float(ref_logp) - _float(logp)
    # expm1 keeps precision where d is small (k3 ~ d^2 / 2); rounding can still leave it a hair below zero
    k3 = (torch.expm1(d) - d).clamp(min=0)
    return k3 if mask is None else k3 * mask


# ----------------------------------------------------------------------------------------------------
# From a per-token loss (B, T) to the number to minimise


def token_mean(loss: Tensor, mask: Tensor, n: Tensor | None = None) -> Tensor:
    """Mean over every response token of the batch (DAPO, Yu et al., 2025, section 3.3,
    https://arxiv.org/abs/2503.14476): a long response weighs as many tokens as it has.

        L = sum_{i,t} l_{i,t} / sum_i |y_i|

    With `n`, the token count of every rank, this rank's share (see `losses.masked_mean`)."""
    return masked_mean(loss, mask, n)


def sequence_mean(loss: Tensor, mask: Tensor, n: Tensor | None = None) -> Tensor:
    """Mean over responses of each response's mean over its tokens (GRPO, DeepSeekMath equation 3): every
    response weighs the same, so a token of a long one weighs less.

        L = 1/B * sum_i 1/|y_i| * sum_t l_{i,t}

    With `n`, the number of responses of every rank, this rank's share of the mean over all of them."""
    lengths = mask.sum(1)  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError(f"response {int((lengths == 0).nonzero()[0])} has no token to average over")
    per_seq = (loss * mask).sum(1) / lengths  # (B,)
    return per_seq.sum() / (per_seq.numel() if n is None else n)


def token_sum_norm(loss: Tensor, mask: Tensor, max_len: int, n: Tensor | None = None) -> Tensor:
    """Dr. GRPO's aggregation (Liu et al., 2025, section 3.1, https://arxiv.org/abs/2503.20783): each response's
    token sum divided by one constant, the generation limit, then the mean over responses. Unlike
    `sequence_mean` it does not favour short correct answers and long wrong ones.

        L = 1/B * sum_i 1/max_len * sum_t l_{i,t}

    With `n`, the number of responses of every rank, this rank's share of the mean over all of them."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    return (loss * mask).sum() / (max_len * (loss.size(0) if n is None else n))
