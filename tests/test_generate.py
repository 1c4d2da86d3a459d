import pytest
import torch
import torch.nn.functional as F

from instructgpt.generate import SamplingParams, generate, sample_next, stream
from instructgpt.model import GPT, ModelConfig, Seq2Seq

V, EOS, PAD = 61, 2, 0


def model_for(family: str, arch: str = "gpt"):
    torch.manual_seed(0)
    kw = dict(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=32, arch=arch)
    cfg = ModelConfig.llama(n_kv_head=2, **kw) if family == "llama" else ModelConfig(**kw)
    return (Seq2Seq if arch == "seq2seq" else GPT)(cfg).eval()


@torch.no_grad()
def naive_greedy(model, prompt, n, eos=EOS):
    """The obviously-right twin: rerun the whole forward for every new token."""
    ids, out, logps = list(prompt), [], []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        logps.append(float(F.log_softmax(logits, -1)[tok]))
        ids.append(tok)
        if tok == eos:
            break
    return out, logps


PROMPTS = [[5, 9, 14, 3], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [40, 41]]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kv_cache_batched_greedy_equals_naive(family):
    m = model_for(family)
    gen = generate(m, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0), EOS, PAD)
    for i, p in enumerate(PROMPTS):
        want, want_logp = naive_greedy(m, p, 12)
        assert gen.token_lists()[i] == want
        torch.testing.assert_close(gen.logprobs[i, : len(want)], torch.tensor(want_logp), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_batched_equals_unbatched(family):
    m = model_for(family)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batch = generate(m, PROMPTS, params, EOS, PAD).token_lists()
    for i, p in enumerate(PROMPTS):
        assert generate(m, [p], params, EOS, PAD).token_lists()[0] == batch[i]


def test_logprobs_equal_full_forward_when_sampling():
    m = model_for("llama")
    gen = generate(m, PROMPTS, SamplingParams(max_new_tokens=9, temperature=1.0, seed=3), EOS, PAD)
    for i, p in enumerate(PROMPTS):
        new = gen.token_lists()[i]
        full = torch.tensor([p + new])
        logp = F.log_softmax(m(full)[0, len(p) - 1 : -1], -1).gather(-1, torch.tensor(new)[:, None])[:, 0]
        torch.testing.assert_close(gen.logprobs[i, : len(new)], logp, rtol=1e-5, atol=1e-5)


def test_stop_at_end_token_per_row():
    m = model_for("gpt2")
    params = SamplingParams(max_new_tokens=8, temperature=0)
    first = generate(m, PROMPTS, params, EOS, PAD).tokens[:, 0].tolist()
    # Declare one row's first greedy token the end token: that row stops after 1 token, the others go on.
    eos = first[0]
    gen = generate(m, PROMPTS, params, eos, PAD)
    assert gen.lengths[0] == 1 and gen.ended[0]
    assert (gen.tokens[0, 1:] == PAD).all() and (gen.logprobs[0, 1:] == 0).all()
    for i in range(1, 4):
        row = gen.token_lists()[i]
        assert (eos in row and row[-1] == eos) or len(row) == 8


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rows_stop_at_any_of_several_stop_ids(family):
    m = model_for(family)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    free = generate(m, PROMPTS, params, [], PAD).token_lists()
    stops = [free[0][2], free[2][4]]  # two rows end early, at different steps (if not earlier at the other id)
    gen = generate(m, PROMPTS, params, stops, PAD)
    for i, p in enumerate(PROMPTS):
        want = naive_greedy(m, p, 10, eos=None)[0]
        cut = next((k + 1 for k, t in enumerate(want) if t in stops), len(want))
        assert gen.token_lists()[i] == want[:cut]
        assert bool(gen.ended[i]) == (cut < len(want) or want[-1] in stops)
    assert gen.ended.sum() >= 2 and len(set(gen.lengths.tolist())) >= 2


def test_sampling_is_seeded_and_reproducible():
    m = model_for("gpt2")
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=7)
    a = generate(m, PROMPTS, p, EOS, PAD).tokens
    b = generate(m, PROMPTS, p, EOS, PAD).tokens
    c = generate(m, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.0, seed=8), EOS, PAD).tokens
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_top_k_and_top_p_restrict_the_support():
    torch.manual_seed(0)
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, SamplingParams(top_k=2), g).tolist()) == {0, 1}
    probs = logits[0].softmax(-1)  # 0.636, 0.234, 0.086, ...: top_p 0.8 keeps tokens 0 and 1
    assert probs[0] < 0.8 < probs[0] + probs[1]
    assert set(sample_next(logits, SamplingParams(top_p=0.8), g).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingParams(top_p=0.5), g).tolist()) == {0}
    assert sample_next(logits[:1], SamplingParams(temperature=0), g).item() == 0


def test_stream_yields_tokens_as_generate_returns_them():
    m = model_for("gpt2")
    params = SamplingParams(max_new_tokens=7, temperature=0)
    steps = [tok for tok, _, _ in stream(m, PROMPTS, params, EOS, PAD)]
    assert torch.equal(torch.stack(steps, 1), generate(m, PROMPTS, params, EOS, PAD).tokens)


def test_seq2seq_generation_equals_naive():
    m = model_for("gpt2", arch="seq2seq")
    start = 1
    gen = generate(m, PROMPTS, SamplingParams(max_new_tokens=8, temperature=0), EOS, PAD, start_id=start)
    for i, p in enumerate(PROMPTS):
        tgt, out = [start], []
        for _ in range(8):
            tok = int(m(torch.tensor([p]), torch.tensor([tgt]))[0, -1].argmax())
            out.append(tok)
            tgt.append(tok)
            if tok == EOS:
                break
        assert gen.token_lists()[i] == out


@pytest.mark.parametrize("prompts,params,message", [
    ([[1, 2, V]], SamplingParams(max_new_tokens=4), "outside the vocabulary"),
    ([[1] * 49], SamplingParams(max_new_tokens=4), "context of 48"),
    ([[1] * 40], SamplingParams(max_new_tokens=9), "exceeds the model's context of 48"),
    ([[1, 2]], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([[1, 2]], SamplingParams(top_p=0.0), "top_p"),
    ([], SamplingParams(), "no prompts"),
])
def test_bad_requests_are_clear_errors(prompts, params, message):
    with pytest.raises(ValueError, match=message):
        generate(model_for("gpt2"), prompts, params, EOS, PAD)


def test_bad_pad_id_is_a_clear_error():
    with pytest.raises(ValueError, match="pad_id 61 outside"):
        generate(model_for("gpt2"), PROMPTS, SamplingParams(max_new_tokens=2), EOS, V)

