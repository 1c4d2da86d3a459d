"""Group RL's advantages, KL estimator and loss aggregations against plain Python loops."""

import math
import statistics

import pytest
import torch

from instructgpt.advantages import (
    group_index,
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
from instructgpt.losses import compute_rewards, masked_mean

# ----------------------------------------------------------------------------------------------------
# The slow, obviously right twins: one Python loop over the groups


def groups_of(index: list[int]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for i, g in enumerate(index):
        out.setdefault(g, []).append(i)
    return out


def grpo_loop(scores: list[float], index: list[int], eps: float, scale: str) -> list[float]:
    adv = [0.0] * len(scores)
    for members in groups_of(index).values():
        rs = [scores[i] for i in members]
        mean = statistics.fmean(rs)  # exactly rounded: a group of equal scores has exactly their mean
        for i in members:
            adv[i] = scores[i] - mean if scale == "none" else (scores[i] - mean) / (statistics.stdev(rs) + eps)
    return adv


def rloo_loop(scores: list[float], index: list[int]) -> list[float]:
    adv = [0.0] * len(scores)
    for members in groups_of(index).values():
        for i in members:
            others = [scores[j] for j in members if j != i]
            adv[i] = scores[i] - sum(others) / len(others)
    return adv


def reinforce_pp_loop(rewards: list[list[float]], lengths: list[int]) -> list[list[float]]:
    returns = []
    for r, n in zip(rewards, lengths):
        g, row = 0.0, [0.0] * len(r)
        for t in reversed(range(n)):
            g += r[t]
            row[t] = g
        returns.append(row)
    real = [returns[b][t] for b, n in enumerate(lengths) for t in range(n)]
    mean, std = statistics.fmean(real), statistics.pstdev(real)
    return [[(returns[b][t] - mean) / std if t < n else 0.0 for t in range(len(r))]
            for b, (r, n) in enumerate(zip(rewards, lengths))]


def random_batch(G: int, n_groups: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n_groups * G, generator=g, dtype=torch.float64)
    scores[:G] = scores[0]  # a group whose answers all score alike: no signal, and no division by zero
    return scores


def check_sums_to_zero(adv: torch.Tensor, index: torch.Tensor) -> None:
    for g in index.unique():
        assert abs(float(adv[index == g].sum())) < 1e-9


# ----------------------------------------------------------------------------------------------------
# Advantages of whole responses


@pytest.mark.parametrize("G", [2, 3, 4, 8])
@pytest.mark.parametrize("scale", ["std", "none"])
def test_grpo_equals_loop_and_sums_to_zero_in_each_group(G: int, scale: str) -> None:
    scores = random_batch(G, 5, seed=G)
    index = torch.arange(len(scores)) // G
    want = torch.tensor(grpo_loop(scores.tolist(), index.tolist(), 1e-6, scale), dtype=torch.float64)
    torch.testing.assert_close(grpo_advantages(scores, G, scale=scale), want, rtol=1e-12, atol=1e-12)
    # the same groups given by index, shuffled, and with indices that skip numbers
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(grpo_advantages(scores[perm], index[perm] * 3, scale=scale), want[perm],
                               rtol=1e-12, atol=1e-12)
    adv = grpo_advantages(scores, G, scale=scale)
    check_sums_to_zero(adv, index)
    assert adv[:G].abs().max() == 0  # all alike: nothing to learn from that prompt
    assert adv.abs().max() > 0.1


def test_grpo_std_and_dr_grpo_differ_by_the_group_std() -> None:
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 5.0, 1.0])
    std, none = grpo_advantages(scores, 3, eps=0.0), grpo_advantages(scores, 3, scale="none")
    torch.testing.assert_close(none[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]))
    torch.testing.assert_close(std[:3], none[:3] / statistics.stdev([1.0, 0.0, 0.0]))
    # fp32 scores come back in fp32, and integer ones (0/1 verifiable rewards) as fp32
    assert std.dtype == torch.float32 and grpo_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32


def test_a_group_of_equal_fp32_scores_gets_exactly_zero() -> None:
    """Summing 1.3 seven times in fp32 misses 7 x 1.3 by an ulp; divided by that group's std (an ulp too) the
    naive (r - mean) / (std + eps) hands out advantages of about 0.1 for nothing."""
    scores = torch.tensor([1.3] * 7 + [0.0] * 6 + [1.0], dtype=torch.float32)
    adv = grpo_advantages(scores, 7)
    assert adv[:7].abs().max() == 0 and adv[7:].abs().max() > 0.3
    assert rloo_advantages(scores, 7)[:7].abs().max() == 0


@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_rloo_equals_loop_and_sums_to_zero_in_each_group(G: int) -> None:
    scores = random_batch(G, 4, seed=10 + G)
    index = torch.arange(len(scores)) // G
    want = torch.tensor(rloo_loop(scores.tolist(), index.tolist()), dtype=torch.float64)
    adv = rloo_advantages(scores, G)
    torch.testing.assert_close(adv, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rloo_advantages(scores, index), want, rtol=1e-12, atol=1e-12)
    check_sums_to_zero(adv, index)
    # the leave-one-out baseline is the group-mean one, scaled by G / (G - 1)
    torch.testing.assert_close(adv, G / (G - 1) * grpo_advantages(scores, G, scale="none"))


def test_groups_of_one_reduce_to_reinforce_or_are_refused() -> None:
    scores = torch.tensor([0.5, -1.0, 2.0])
    torch.testing.assert_close(reinforce_advantages(scores), scores)
    assert reinforce_advantages(scores).data_ptr() != scores.data_ptr()  # a copy: scores stay untouched
    with pytest.raises(ValueError, match="RLOO needs at least 2"):
        rloo_advantages(scores, 1)
    with pytest.raises(ValueError, match="GRPO needs at least 2"):
        grpo_advantages(scores, 1)
    with pytest.raises(ValueError, match="GRPO needs at least 2"):  # index form: group 7 has one member
        grpo_advantages(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 0, 7]))


def test_group_index_checks_its_input() -> None:
    assert group_index(3, 6).tolist() == [0, 0, 0, 1, 1, 1]
    assert group_index(torch.tensor([10**12, 5, 10**12]), 3).tolist() == [1, 0, 1]
    with pytest.raises(ValueError, match="do not split"):
        group_index(4, 6)
    with pytest.raises(ValueError, match="shape"):
        group_index(torch.tensor([0, 0]), 3)
    with pytest.raises(ValueError, match="non-negative"):
        group_index(torch.tensor([0, -1]), 2)
    with pytest.raises(ValueError, match="scale"):
        grpo_advantages(torch.zeros(4), 2, scale="mean")


# ----------------------------------------------------------------------------------------------------
# Advantages per token


def ragged(B: int, T: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[1] = 1, T  # a reply of just its end token, and one that fills the batch
    return (torch.arange(T)[None] < lengths[:, None]).double(), lengths.tolist()


def test_sequence_to_tokens_fills_the_response_and_not_the_padding() -> None:
    mask, lengths = ragged(5, 7, seed=0)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    tok = sequence_to_tokens(adv, mask)
    for b, n in enumerate(lengths):
        assert tok[b, :n].tolist() == [adv[b].item()] * n and tok[b, n:].abs().sum() == 0


@pytest.mark.parametrize("B,T", [(6, 9), (16, 4), (3, 1)])
def test_reinforce_pp_equals_loop_with_masked_mean_0_and_std_1(B: int, T: int) -> None:
    mask, lengths = ragged(B, T, seed=B * T)
    g = torch.Generator().manual_seed(B)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref_logp = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    rewards, _ = compute_rewards(scores, logp, ref_logp, mask, beta=0.1)  # the KL penalty path, reused
    adv = reinforce_pp_advantages(rewards, mask, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor(reinforce_pp_loop(rewards.tolist(), lengths), dtype=torch.float64),
                               rtol=1e-10, atol=1e-10)
    n = mask.sum()
    assert abs(float(masked_mean(adv, mask))) < 1e-10
    assert abs(float(((adv**2) * mask).sum() / n) - 1) < 1e-10
    assert float((adv * (1 - mask)).abs().sum()) == 0
    # with no KL penalty, the first token's return is the whole score: advantages follow the scores' order
    plain, _ = compute_rewards(scores, logp, ref_logp, mask, beta=0.0)
    first = reinforce_pp_advantages(plain, mask)[:, 0]
    assert first.argsort().tolist() == scores.argsort().tolist()


# ----------------------------------------------------------------------------------------------------
# KL as a loss term


def test_k3_is_nonnegative_zero_at_equality_and_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 50, generator=g) * 8
    ref = logp + torch.randn(4, 50, generator=g) * torch.logspace(-6, 0.5, 50)  # tiny to large gaps
    k3 = kl_k3(logp, ref)
    assert bool((k3 >= 0).all()) and float(k3.max()) > 0.1
    assert float(kl_k3(logp, logp).abs().max()) == 0
    for b in range(4):
        for t in range(50):
            d = float(ref[b, t]) - float(logp[b, t])
            assert math.isclose(float(k3[b, t]), math.exp(d) - d - 1, rel_tol=1e-4, abs_tol=1e-7)
    mask = torch.zeros(4, 50)
    mask[:, :10] = 1
    masked = kl_k3(logp, ref, mask)
    assert masked[:, 10:].abs().sum() == 0 and torch.equal(masked[:, :10], k3[:, :10])


def test_k3_estimates_the_kl_of_samples_from_the_policy() -> None:
    g = torch.Generator().manual_seed(1)
    pi = torch.softmax(torch.randn(6, generator=g), 0)
    ref = torch.softmax(torch.randn(6, generator=g), 0)
    y = torch.multinomial(pi, 200_000, replacement=True, generator=g)
    estimate = kl_k3(pi.log()[y], ref.log()[y]).double().mean()
    exact = (pi * (pi.log() - ref.log())).sum()
    assert abs(float(estimate) - float(exact)) < 0.01 * float(exact) + 2e-3


def test_k3_gradient_is_one_minus_the_ratio() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.5, -2.0, -0.1])
    kl_k3(logp, ref).sum().backward()
    torch.testing.assert_close(logp.grad, 1 - (ref - logp.detach()).exp())


# ----------------------------------------------------------------------------------------------------
# Loss aggregations


def test_aggregations_equal_their_loops() -> None:
    mask, lengths = ragged(5, 8, seed=3)
    loss = torch.randn(5, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    loss_l = loss.tolist()
    tokens = [loss_l[b][t] for b, n in enumerate(lengths) for t in range(n)]
    assert math.isclose(float(token_mean(loss, mask)), sum(tokens) / len(tokens), rel_tol=1e-12)
    per_seq = [sum(loss_l[b][:n]) / n for b, n in enumerate(lengths)]
    assert math.isclose(float(sequence_mean(loss, mask)), sum(per_seq) / 5, rel_tol=1e-12)
    per_seq_sum = [sum(loss_l[b][:n]) / 8 for b, n in enumerate(lengths)]
    assert math.isclose(float(token_sum_norm(loss, mask, max_len=8)), sum(per_seq_sum) / 5, rel_tol=1e-12)
    # the three weigh long and short replies differently: they differ on ragged batches
    values = [float(token_mean(loss, mask)), float(sequence_mean(loss, mask)), float(token_sum_norm(loss, mask, 8))]
    assert len({round(v, 9) for v in values}) == 3


def test_aggregations_split_into_rank_shares_that_add_up() -> None:
    mask, _ = ragged(6, 5, seed=4)
    loss = torch.randn(6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    halves = [(loss[:3], mask[:3]), (loss[3:], mask[3:])]
    n_tok, n_seq = mask.sum(), torch.tensor(6.0, dtype=torch.float64)
    torch.testing.assert_close(sum(token_mean(x, m, n_tok) for x, m in halves), token_mean(loss, mask))
    torch.testing.assert_close(sum(sequence_mean(x, m, n_seq) for x, m in halves), sequence_mean(loss, mask))
    torch.testing.assert_close(sum(token_sum_norm(x, m, 5, n_seq) for x, m in halves), token_sum_norm(loss, mask, 5))


def test_aggregations_refuse_what_cannot_be_averaged() -> None:
    mask = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(ValueError, match="response 1 has no token"):
        sequence_mean(torch.ones(2, 2), mask)
    with pytest.raises(ValueError, match="max_len"):
        token_sum_norm(torch.ones(2, 2), mask, 0)
