import pytest
import torch
import torch.nn.functional as F

from instructgpt.model import (
    GPT,
    PRESETS,
    KVCache,
    ModelConfig,
    ScalarModel,
    Seq2Seq,
    attention,
    count_params,
    last_token_index,
    positions_from_mask,
)

V = 97


def gpt2_cfg(**kw):
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)


def llama_cfg(**kw):
    return ModelConfig.llama(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **kw)


FAMILIES = {"gpt2": gpt2_cfg, "llama_gqa": llama_cfg}


@pytest.fixture(params=list(FAMILIES))
def cfg(request):
    return FAMILIES[request.param]()


def make(cls, cfg, seed=0):
    torch.manual_seed(seed)
    return cls(cfg).eval()


def test_families_differ_as_configured():
    g, l = make(GPT, gpt2_cfg()), make(GPT, llama_cfg())
    assert hasattr(g.transformer, "wpe") and not hasattr(l.transformer, "wpe")
    assert g.lm_head.weight is g.transformer.wte.weight  # tied
    assert l.lm_head.weight is not l.transformer.wte.weight
    assert all(p is None for n, p in l.named_parameters() if n.endswith("bias"))
    # GQA: the fused projection holds H query heads and 2 K key/value heads.
    assert l.transformer.h[0].attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 8, 32)
    assert g.transformer.h[0].attn.qkv_proj.weight.shape == (3 * 32, 32)
    assert g.transformer.wte.weight.shape[0] == 128  # vocabulary padded to a multiple of 64


def test_gpt2_124m_parameter_count():
    cfg = ModelConfig(**PRESETS["gpt2-124m"])
    n = count_params(GPT(cfg))
    assert 124_000_000 < n < 125_000_000


def test_residual_projection_init_is_scaled():
    cfg = ModelConfig(vocab_size=V, block_size=32, n_layer=8, n_head=4, n_embd=256)
    m = make(GPT, cfg)
    std_proj = m.transformer.h[0].attn.o_proj.weight.std().item()
    std_qkv = m.transformer.h[0].attn.qkv_proj.weight.std().item()
    assert abs(std_qkv - 0.02) < 0.002
    assert abs(std_proj - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8)


def test_causality(cfg):
    m = make(GPT, cfg)
    x = torch.randint(0, V, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, V, (2, 8))
    torch.testing.assert_close(m(x)[:, :12], m(y)[:, :12], rtol=0, atol=0)
    assert not torch.allclose(m(x)[:, 12:], m(y)[:, 12:])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_sequence_alone(cfg, side):
    m = make(GPT, cfg)
    seqs = [torch.randint(0, V, (n,)) for n in (5, 11, 8)]
    T = 11
    idx = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        idx[i, sl], mask[i, sl] = s, 1
    logits = m(idx, attention_mask=mask)
    for i, s in enumerate(seqs):
        alone = m(s[None])[0]
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        torch.testing.assert_close(logits[i, sl], alone, rtol=1e-5, atol=1e-5)
        assert logits[i, sl].argmax(-1).tolist() == alone.argmax(-1).tolist()
    assert torch.isfinite(logits).all()  # padding rows stay finite


def test_segments_do_not_attend_to_each_other(cfg):
    m = make(GPT, cfg)
    a, b = torch.randint(0, V, (6,)), torch.randint(0, V, (9,))
    packed = torch.cat([a, b])[None]
    seg = torch.tensor([[0] * 6 + [1] * 9])
    pos = torch.tensor([list(range(6)) + list(range(9))])
    out = m(packed, position_ids=pos, segment_ids=seg)[0]
    torch.testing.assert_close(out[:6], m(a[None])[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[6:], m(b[None])[0], rtol=1e-5, atol=1e-5)


def test_fixed_shape_cache_step_equals_the_full_forward(cfg):
    """The engine's decode step (every cache slot read, a prebuilt additive 4-D mask hiding padding and
    unwritten slots, explicit positions, no id check) against the slow twin: the whole left-padded
    sequence through the plain forward with a 2-D mask."""
    m = make(GPT, cfg)
    idx = torch.randint(1, V, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0  # row 0 is left-padded
    S_max = 10
    cache = KVCache(cfg.n_layer, 2, cfg.kv_heads, S_max, cfg.head_dim, "cpu", torch.float32)
    with torch.no_grad():
        m(idx[:, :6], mask[:, :6], cache=cache)  # prefill the first 6 tokens
        cache.fixed_shape = True
        bias = torch.full((2, 1, 1, S_max), float("-inf"))
        bias[:, 0, 0, :7] = torch.where(mask.bool(), 0.0, float("-inf"))
        pos = mask.sum(1, keepdim=True) - 1  # the 7th token's position in each row
        step = m(idx[:, 6:], bias, position_ids=pos, cache=cache, check_ids=False)[:, -1]
        full = m(idx, mask)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert cache.length == 7


def test_positions_follow_the_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 1, 2, 2, 2]]
    assert last_token_index(mask).tolist() == [4, 4, 2]


@pytest.mark.parametrize("side", ["left", "right"])
def test_scalar_score_same_alone_and_in_any_padded_batch(cfg, side):
    m = make(ScalarModel, cfg)
    seqs = [torch.randint(0, V, (n,)) for n in (3, 10, 7)]
    for T in (10, 14):
        idx = torch.full((3, T), 5)
        mask = torch.zeros(3, T, dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
            idx[i, sl], mask[i, sl] = s, 1
        batch = m.score(idx, mask)
        for i, s in enumerate(seqs):
            alone = m.score(s[None], torch.ones(1, len(s), dtype=torch.long))
            torch.testing.assert_close(batch[i], alone[0], rtol=1e-5, atol=1e-5)


def test_seq2seq_cross_attention_and_source_padding():
    cfg = ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, arch="seq2seq")
    m = make(Seq2Seq, cfg)
    src = torch.randint(0, V, (1, 7))
    tgt = torch.randint(0, V, (1, 5))
    base = m(src, tgt)
    changed = src.clone()
    changed[0, 2] = (changed[0, 2] + 1) % V
    assert not torch.allclose(m(changed, tgt), base)  # the decoder sees the encoder
    # Padded source positions change nothing, whatever their token.
    for pad_tok in (0, 13):
        padded = torch.cat([torch.full((1, 4), pad_tok), src], 1)
        mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], 1)
        torch.testing.assert_close(m(padded, tgt, src_mask=mask), base, rtol=1e-5, atol=1e-5)
    # The decoder is causal.
    tgt2 = tgt.clone()
    tgt2[0, 3:] = (tgt2[0, 3:] + 1) % V
    torch.testing.assert_close(m(src, tgt2)[:, :3], base[:, :3], rtol=0, atol=0)
    # The encoder is bidirectional: a late source token changes the encoding of an early one.
    late = src.clone()
    late[0, -1] = (late[0, -1] + 1) % V
    assert not torch.allclose(m.encode(src)[:, 0], m.encode(late)[:, 0])
    # Shared embeddings.
    assert m.decoder.wte is m.encoder.wte


def test_rope_scaling_llama3_changes_only_low_frequencies():
    from instructgpt.model import rope_inv_freq

    base = ModelConfig.llama(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=64)
    scaled = ModelConfig.llama(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=64, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024})
    a, b = rope_inv_freq(base), rope_inv_freq(scaled)
    assert a[0] == b[0]  # highest frequency untouched
    torch.testing.assert_close(b[-1], a[-1] / 8)


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_head=4, n_kv_head=3), "divisible by n_kv_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(arch="rnn"), "arch"),
])
def test_inconsistent_config_is_a_clear_error(bad, message):
    kw = dict(vocab_size=V, block_size=32, n_layer=1, n_head=4, n_embd=32) | bad
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kw)


def test_bad_input_ids_and_length():
    m = make(GPT, gpt2_cfg())
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        m(torch.tensor([[1, 2, V]]))
    with pytest.raises(ValueError, match="context of 32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_bf16_attention_on_the_cpu_runs_in_fp32():
    """bf16 on the CPU attends in fp32 (its bf16 kernel is several times slower) and gives bf16 back: exactly
    fp32 attention of the bf16 inputs, rounded once, for a causal, a masked and a grouped-query call."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 7, 8, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 7, 8, generator=g).bfloat16() for _ in range(2))
    mask = torch.rand(2, 1, 7, 7, generator=g) > 0.3
    mask[..., 0] = True
    for m, causal in ((None, True), (mask, False)):
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=m, is_causal=causal,
                                              enable_gqa=True).bfloat16()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast would otherwise attend in bf16
            got = attention(q, k, v, m, 0.0, causal, gqa=True)
        assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    # fp32 is left alone
    f = attention(q.float(), k.float(), v.float(), None, 0.0, True, gqa=True)
    assert f.dtype == torch.float32


def test_a_bf16_autocast_forward_on_the_cpu_is_close_to_fp32(cfg):
    model = make(GPT, cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(idx)
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.05 * full.abs().max()
