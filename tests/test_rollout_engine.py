"""Group rollouts through the continuous-batching engine (each prompt prefilled once for its G samples) against
the static batch and against a slow twin that reruns the whole forward of every sample for every new token:
the same Rollout layout, the same tokens as the twin, log-probabilities a full forward agrees with, the
distribution softmax(logits / T), and a rollout that is a function of the generator's state."""

import pytest
import torch
from conftest import one_thread_pool

from instructgpt.batching import pad
from instructgpt.generate import SamplingParams, generate_many
from instructgpt.losses import response_logprobs
from instructgpt.model import GPT, ModelConfig
from instructgpt.rl import PPOConfig, rollout

V, PAD, STOPS = 32, 0, [2, 19]  # 19: a token the tiny policy draws about 1 time in 9
PROMPTS = [[5, 9, 14, 3], [7, 8], [11, 12, 13, 14, 15, 16, 17], [20, 3]]  # lengths differ: left padding
G = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny forwards on one thread: two threads spinning at every barrier of a loaded machine are 100x slower."""
    yield from one_thread_pool()


def tiny_policy(vocab: int = V, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, block_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: logits spread over a few units, not near-uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


def grouped(prompts: list[list[int]], g: int) -> list[list[int]]:
    """Each prompt g times side by side, as the ppo stage lays out a group."""
    return [p for p in prompts for _ in range(g)]


def run(policy, prompts, max_new=12, temperature=0.8, seed=0, g=G, shared=True, stops=STOPS):
    params = SamplingParams(max_new_tokens=max_new, temperature=temperature)
    gen = torch.Generator().manual_seed(seed)
    return rollout(policy, grouped(prompts, g), params, stops, PAD, gen, group_size=g, shared_prefill=shared), gen


# ----------------------------------------------------------------------------------------------------
# Layout


@pytest.mark.parametrize("shared", [True, False])
def test_the_rollout_layout_is_the_same_whichever_way_it_samples(shared: bool) -> None:
    """Rows in the order given (group i at rows i*G .. i*G + G - 1), the prompt left-padded, then the response:
    real tokens where response_mask is 1, a prefix of each row; `ended` exactly where the last real token is a
    stop id (and no stop id before it); pad after the end; a row that did not end ran to max_new_tokens."""
    policy, max_new = tiny_policy(), 12
    ro, _ = run(policy, PROMPTS, max_new=max_new, shared=shared)
    rows = grouped(PROMPTS, G)
    prompt, prompt_mask = pad(rows, PAD, "left")
    B, P = prompt.shape
    assert ro.prompt_len == P and ro.ids.shape[0] == B
    assert torch.equal(ro.ids[:, :P], prompt) and torch.equal(ro.attention_mask[:, :P], prompt_mask)
    R = ro.ids.size(1) - P
    lengths = ro.response_mask.sum(1)
    assert ro.response_mask.shape == (B, R) and int(lengths.max()) == R <= max_new
    assert torch.equal(ro.response_mask, (torch.arange(R)[None] < lengths[:, None]).long())  # a prefix per row
    assert torch.equal(ro.attention_mask[:, P:], ro.response_mask)
    for row, n, ended in zip(ro.response.tolist(), lengths.tolist(), ro.ended.tolist()):
        assert n >= 1 and all(t == PAD for t in row[n:])
        assert not any(t in STOPS for t in row[:n - 1])
        assert ended == (row[n - 1] in STOPS)
        assert ended or n == max_new
    assert bool(ro.ended.any()) and bool((~ro.ended).any())  # both kinds of row: the checks above can fail
    assert len(set(lengths.tolist())) > 2
    assert ro.response_lists() == [row[:n] for row, n in zip(ro.response.tolist(), lengths.tolist())]


def test_groups_must_be_side_by_side_copies_of_one_prompt() -> None:
    policy, params, gen = tiny_policy(), SamplingParams(max_new_tokens=4), torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="same prompt"):
        rollout(policy, [[5, 6], [5, 6], [7], [5, 6]], params, STOPS, PAD, gen, group_size=2)
    with pytest.raises(ValueError, match="groups of 2"):
        rollout(policy, [[5, 6], [5, 6], [7]], params, STOPS, PAD, gen, group_size=2)


# ----------------------------------------------------------------------------------------------------
# Against the slow twin


@torch.no_grad()
def naive_groups(policy: GPT, prompts, g: int, max_new: int, temperature: float, generator: torch.Generator):
    """The obviously-right twin of a group rollout: group i seeds its own generator with the i-th of the seeds
    drawn from `generator`; at each step its samples that are still running (in sample order) each rerun the
    whole forward of their prompt and tokens so far, and draw from softmax(logits / T) with one multinomial."""
    seeds = torch.randint(2**62, (len(prompts),), generator=generator).tolist()
    out = []
    for prompt, seed in zip(prompts, seeds):
        gi = torch.Generator().manual_seed(seed)
        samples: list[list[int]] = [[] for _ in range(g)]
        for _ in range(max_new):
            live = [s for s in samples if not (s and s[-1] in STOPS)]
            if not live:
                break
            # the running samples all hold as many tokens (they started together): one unpadded batch
            logits = policy(torch.tensor([prompt + s for s in live]))[:, -1]  # (live, V)
            toks = torch.multinomial((logits.float() / temperature).softmax(-1), 1, generator=gi)[:, 0]
            for s, t in zip(live, toks.tolist()):
                s.append(t)
        out += samples
    return out


def test_shared_prefill_samples_what_each_sample_decoded_alone_samples() -> None:
    """Tokens equal the twin's exactly (same draws from the same generators; the twin has no cache, no
    shared prefill, no batch); the generator ends where the twin's does; and the engine's log-probabilities of
    those tokens are what a full forward over the rollout's ids gives (within 1e-5)."""
    policy, max_new, T = tiny_policy(), 12, 0.8
    ro, gen = run(policy, PROMPTS, max_new=max_new, temperature=T, seed=3)
    twin_gen = torch.Generator().manual_seed(3)
    want = naive_groups(policy, PROMPTS, G, max_new, T, twin_gen)
    assert ro.response_lists() == want
    assert torch.equal(gen.get_state(), twin_gen.get_state())
    assert len({tuple(r) for r in want}) > len(PROMPTS)  # a group's samples differ: they were drawn

    params = SamplingParams(max_new_tokens=max_new, temperature=T)
    engine = generate_many(policy, PROMPTS, params, STOPS, PAD, max_batch=len(PROMPTS) * G, n=G,
                           generator=torch.Generator().manual_seed(3))
    assert engine.token_lists() == want
    mask = ro.response_mask.float()
    full = response_logprobs(policy, ro.ids, ro.attention_mask, ro.prompt_len) * mask  # (B, R), temperature 1
    torch.testing.assert_close(engine.logprobs[:, : mask.size(1)], full, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------
# The distribution


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """The p-value of Pearson's chi-square test of counts (V,) against probabilities (V,): cells expected fewer
    than 5 times pooled into one, the statistic's tail P(chi2_{cells - 1} >= x) = Q((cells - 1) / 2, x / 2)."""
    expected = probs.double() * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big].double(), counts[~big].double().sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    x = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(dof, x / 2))


@pytest.mark.parametrize("shared", [True, False])
def test_first_tokens_follow_softmax_of_logits_over_temperature(shared: bool) -> None:
    """N first tokens of each of two prompts against softmax(logits / T) by Pearson's chi-square: a p-value
    above 1e-6 (the right sampler fails once in a million runs). The same counts against softmax(logits), the
    distribution at T = 1, get a p-value below 1e-6: the check has the power to tell them apart."""
    vocab, N, T = 8, 2000, 1.5
    policy = tiny_policy(vocab=vocab, seed=2)  # first-token probabilities between 0.02 and 0.35
    prompts = [[6], [1, 2]]
    ro, _ = run(policy, prompts, max_new=1, temperature=T, g=N, shared=shared, stops=[7])
    first = ro.response[:, 0].view(len(prompts), N)  # (prompts, N)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            logits = policy(torch.tensor([prompt]))[0, -1].double()  # (V,)
        counts = torch.bincount(first[i], minlength=vocab)
        assert chi_square_p(counts, (logits / T).softmax(-1)) > 1e-6, counts
        assert chi_square_p(counts, logits.softmax(-1)) < 1e-6, counts


# ----------------------------------------------------------------------------------------------------
# Reproducibility


def test_the_rollout_is_a_function_of_the_generator_state() -> None:
    """The same seed gives the same rollout, another seed another; the generator advances by B / G draws
    whatever was sampled (a resumed run, restoring its state, samples on as if never stopped)."""
    policy = tiny_policy()
    a, gen_a = run(policy, PROMPTS, seed=7)
    b, gen_b = run(policy, PROMPTS, seed=7)
    c, _ = run(policy, PROMPTS, seed=8)
    for name in ("ids", "attention_mask", "response_mask", "ended"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.response_lists() != c.response_lists()
    _, gen_short = run(policy, PROMPTS, seed=7, max_new=2)
    assert torch.equal(gen_a.get_state(), gen_b.get_state())
    assert torch.equal(gen_a.get_state(), gen_short.get_state())


def test_groups_of_one_and_shared_prefill_off_sample_the_static_batch() -> None:
    """With nothing to share (G = 1) or shared_prefill off, the rollout is the static batch's, row for row: the
    sampling a 1-process run shares with N ranks (each row's noise from its place in the global batch)."""
    policy = tiny_policy()
    static, _ = run(policy, PROMPTS, g=G, shared=False)
    alone, _ = run(policy, grouped(PROMPTS, G), g=1, shared=True)
    shared, _ = run(policy, PROMPTS, g=G, shared=True)
    assert static.response_lists() == alone.response_lists() != shared.response_lists()
    assert PPOConfig().shared_prefill  # on by default


def test_a_grouped_rollout_decodes_with_the_engine_at_full_width(monkeypatch) -> None:
    """The engine decodes every row of the batch at once (max_batch B) and prefills each prompt once."""
    from instructgpt import engine as engine_module

    seen = []
    real_prefill = engine_module.DecodeBatch.prefill

    def prefill(self, slots, prompts, *args, **kwargs):
        seen.append((self.B, [list(p) for p in prompts]))
        return real_prefill(self, slots, prompts, *args, **kwargs)

    monkeypatch.setattr(engine_module.DecodeBatch, "prefill", prefill)
    run(tiny_policy(), PROMPTS)
    assert seen == [(len(PROMPTS) * G, PROMPTS)]
