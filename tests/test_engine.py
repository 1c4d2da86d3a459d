"""The continuous-batching engine against its slow twin: each prompt decoded alone by rerunning the whole
forward for every new token. Rows end at different steps (several stop ids, different token budgets), join
mid-way, share a prompt's prefill, and run eagerly or through the compiled step."""

import pytest
import torch
import torch.nn.functional as F

from instructgpt.engine import Engine, Request, SamplingParams
from instructgpt.generate import generate, generate_many
from instructgpt.model import GPT, ModelConfig, Seq2Seq

V, PAD, START = 61, 0, 1
PROMPTS = [[5, 9, 14, 3], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [40, 41], [3, 30, 3], [8, 9, 10, 11, 12, 13],
           [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33], [50]]
BUDGETS = [12, 5, 16, 9, 20, 3, 11, 14]  # max_new_tokens per prompt
FAMILIES = [("gpt2", "gpt"), ("llama", "gpt"), ("gpt2", "seq2seq")]


def model_for(family: str, arch: str = "gpt"):
    torch.manual_seed(0)
    kw = dict(vocab_size=V, block_size=48, n_layer=2, n_head=4, n_embd=32, arch=arch)
    cfg = ModelConfig.llama(n_kv_head=2, **kw) if family == "llama" else ModelConfig(**kw)
    model = (Seq2Seq if arch == "seq2seq" else GPT)(cfg).eval()
    with torch.no_grad():  # larger weights than GPT-2's init: varied greedy replies, logits far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model


@torch.no_grad()
def naive(model, prompt, n, stops):
    """The obviously-right twin: one prompt alone, the whole forward rerun for every new token."""
    out, logps = [], []
    for _ in range(n):
        if isinstance(model, Seq2Seq):
            logits = model(torch.tensor([prompt]), torch.tensor([[START] + out]))[0, -1]
        else:
            logits = model(torch.tensor([list(prompt) + out]))[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        logps.append(float(F.log_softmax(logits, -1)[tok]))
        if tok in stops:
            break
    return out, logps


def pick_stops(model, k=2):
    """Stop ids that end some rows early, at different steps: tokens from the middle of greedy replies."""
    replies = [naive(model, p, n, ())[0] for p, n in zip(PROMPTS, BUDGETS)]
    stops = []
    for r in replies:
        if len(r) > 3 and r[2] not in stops and r[0] != r[2]:
            stops.append(r[2])
        if len(stops) == k:
            break
    return stops


def run(engine: Engine, requests, arrivals=None):
    """Step the engine, submitting requests[i] before step arrivals[i]; returns every sample's (tokens,
    logprobs, ended) and the steps at which each request produced its first and last tokens."""
    arrivals = arrivals or [0] * len(requests)
    out, span, step = {}, {}, 0
    while engine.busy or step <= max(arrivals):
        for r, a in zip(requests, arrivals):
            if a == step:
                engine.submit(r)
        for t in engine.step():
            toks, lps, _ = out.setdefault((id(t.request), t.index), ([], [], False))
            toks.append(t.token)
            lps.append(t.logprob)
            span[id(t.request)] = (span.get(id(t.request), (step,))[0], step)
            if t.done:
                out[id(t.request), t.index] = (toks, lps, t.ended)
        step += 1
    return out, span


def check_alone(model, requests, out, stops):
    for r in requests:
        want, want_lp = naive(model, r.prompt, r.params.max_new_tokens, stops)
        for i in range(r.n):
            toks, lps, ended = out[id(r), i]
            assert toks == want, (r.prompt, i)
            torch.testing.assert_close(torch.tensor(lps), torch.tensor(want_lp), rtol=0, atol=1e-5)
            assert ended == (want[-1] in stops)


@pytest.mark.parametrize("family,arch", FAMILIES)
def test_continuous_batching_equals_each_prompt_alone(family, arch):
    model = model_for(family, arch)
    stops = pick_stops(model)
    engine = Engine(model, stops, PAD, max_batch=3, cache_len=4, start_id=START)  # 8 prompts through 3 slots
    requests = [Request(p, SamplingParams(max_new_tokens=n, temperature=0)) for p, n in zip(PROMPTS, BUDGETS)]
    arrivals = [0, 0, 0, 1, 1, 2, 9, 40]  # some wait for a slot, one comes when the engine is idle
    out, span = run(engine, requests, arrivals)
    check_alone(model, requests, out, stops)
    lengths = [len(out[id(r), 0][0]) for r in requests]
    ended = [out[id(r), 0][2] for r in requests]
    assert len(set(lengths)) >= 4 and 2 <= sum(ended) < len(requests)  # rows end at different steps
    assert len({out[id(r), 0][0][-1] for r, e in zip(requests, ended) if e}) == 2  # at either stop id
    # Rows waited for a slot and joined while others were running; the cache grew past its first 4
    # positions meanwhile.
    first, last = {i: s[0] for i, s in span.items()}, {i: s[1] for i, s in span.items()}
    assert any(first[id(r)] > a for r, a in zip(requests, arrivals))
    assert any(first[id(a)] < first[id(b)] <= last[id(a)] for a in requests for b in requests)
    assert engine.batch.S > 4 and engine.prefills > 2


@pytest.mark.parametrize("family,arch", FAMILIES)
def test_a_prompts_samples_share_one_prefill(family, arch, monkeypatch):
    model = model_for(family, arch)
    stops = pick_stops(model)
    engine = Engine(model, stops, PAD, max_batch=8, start_id=START)
    prefilled = []
    prefill = engine.batch.prefill
    monkeypatch.setattr(engine.batch, "prefill", lambda slots, prompts, *a: prefilled.append(len(prompts))
                        or prefill(slots, prompts, *a))
    greedy = [Request(PROMPTS[i], SamplingParams(max_new_tokens=BUDGETS[i], temperature=0), n=3) for i in (0, 2)]
    out, _ = run(engine, greedy)
    assert prefilled == [2]  # two prompts, six samples: one prefill row per prompt
    check_alone(model, greedy, out, stops)
    # Sampled: each sample's log-probabilities are those of the full forward over its own tokens, so the
    # copied keys and values are the prompt's.
    sampled = Request(PROMPTS[6], SamplingParams(max_new_tokens=10, temperature=1.0, seed=5), n=4)
    out, _ = run(engine, [sampled])
    replies = [out[id(sampled), i][0] for i in range(4)]
    assert len({tuple(r) for r in replies}) > 1
    for i, reply in enumerate(replies):
        if arch == "seq2seq":
            logits = model(torch.tensor([sampled.prompt]), torch.tensor([[START] + reply[:-1]]))[0]
        else:
            logits = model(torch.tensor([sampled.prompt + reply]))[0, len(sampled.prompt) - 1: -1]
        want = F.log_softmax(logits, -1).gather(-1, torch.tensor(reply)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(out[id(sampled), i][1]), want, rtol=0, atol=1e-5)


def test_a_seeded_request_samples_the_same_whatever_shares_its_batch():
    model = model_for("llama")
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.95, seed=11)

    def samples(others, max_batch, arrivals=None):
        engine = Engine(model, [2], PAD, max_batch=max_batch)
        mine = Request(PROMPTS[3], params, n=2)
        rest = [Request(p, SamplingParams(max_new_tokens=n, temperature=0.7, seed=i)) for i, (p, n) in
                enumerate(zip(PROMPTS[:others], BUDGETS))]
        out, _ = run(engine, [*rest, mine], arrivals)
        return [out[id(mine), i][0] for i in range(2)]

    alone = samples(0, 2)
    assert samples(5, 3, [0, 0, 0, 1, 2, 3]) == alone  # waits for slots, joins mid-way
    assert samples(5, 16) == alone
    assert samples(0, 2) == alone
    other = Request(PROMPTS[3], SamplingParams(max_new_tokens=12, temperature=1.0, top_k=30, top_p=0.95, seed=12), n=2)
    out, _ = run(Engine(model, [2], PAD, max_batch=2), [other])
    assert [out[id(other), i][0] for i in range(2)] != alone


def test_generate_many_equals_generate_and_keeps_prompt_order():
    model = model_for("gpt2")
    stops = pick_stops(model)
    params = [SamplingParams(max_new_tokens=n, temperature=0) for n in BUDGETS]
    many = generate_many(model, PROMPTS, params, stops, PAD, max_batch=3, n=2)
    assert many.tokens.shape[0] == 2 * len(PROMPTS)
    for i, (p, q) in enumerate(zip(PROMPTS, params)):
        alone = generate(model, [p], q, stops, PAD)
        for j in (2 * i, 2 * i + 1):
            assert many.token_lists()[j] == alone.token_lists()[0]
            n = int(alone.lengths[0])
            torch.testing.assert_close(many.logprobs[j, :n], alone.logprobs[0, :n], rtol=0, atol=1e-5)
            assert bool(many.ended[j]) == bool(alone.ended[0])
    sampled = SamplingParams(max_new_tokens=8, temperature=1.0, seed=4)
    a = generate_many(model, PROMPTS, sampled, stops, PAD, max_batch=2, n=2)
    b = generate_many(model, PROMPTS, sampled, stops, PAD, max_batch=16, n=2)
    assert a.token_lists() == b.token_lists()


def test_cancel_frees_slots_for_the_queue():
    model = model_for("llama")
    engine = Engine(model, [], PAD, max_batch=2)
    long = Request(PROMPTS[0], SamplingParams(max_new_tokens=30, temperature=0), n=2)
    waiting = Request(PROMPTS[2], SamplingParams(max_new_tokens=6, temperature=0))
    engine.submit(long)
    engine.submit(waiting)
    got = []
    for step in range(40):
        if step == 3:
            engine.cancel(long, 1)  # one sample: its slot goes to the waiting request at the next step
        if step == 6:
            engine.cancel(long)
        got += [(step, t.request is long, t.index, t.token) for t in engine.step()]
        if not engine.busy:
            break
    assert not engine.busy and step < 15
    assert not [g for g in got if g[1] and ((g[2] == 1 and g[0] >= 3) or g[0] >= 6)]
    mine = [tok for s, is_long, _, tok in got if not is_long]
    assert mine == naive(model, waiting.prompt, 6, ())[0] and min(s for s, is_long, *_ in got if not is_long) == 3


@pytest.mark.slow
@pytest.mark.parametrize("family,arch", [("llama", "gpt"), ("gpt2", "seq2seq")])
def test_the_compiled_step_equals_each_prompt_alone(family, arch):
    model = model_for(family, arch)
    stops = pick_stops(model)
    engine = Engine(model, stops, PAD, max_batch=3, cache_len=40, start_id=START, compile=True)
    requests = [Request(p, SamplingParams(max_new_tokens=n, temperature=0), n=1 + i % 2)
                for i, (p, n) in enumerate(zip(PROMPTS[:6], BUDGETS))]
    out, _ = run(engine, requests, [0, 0, 1, 2, 3, 5])
    check_alone(model, requests, out, stops)


@pytest.mark.parametrize("request_, message", [
    (Request([1] * 40, SamplingParams(max_new_tokens=9)), "exceeds the model's context of 48"),
    (Request([], SamplingParams()), "prompt 0 is empty"),
    (Request([1, V], SamplingParams()), "outside the vocabulary"),
    (Request([1, 2], SamplingParams(), n=5), "n must be between 1 and the engine's 4 slots"),
    (Request([1, 2], SamplingParams(top_p=0)), "top_p"),
])
def test_requests_the_engine_cannot_run_are_clear_errors(request_, message):
    with pytest.raises(ValueError, match=message):
        Engine(model_for("gpt2"), [2], PAD, max_batch=4).submit(request_)
