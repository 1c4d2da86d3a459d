"""Hugging Face import/export: parity with `transformers` on the same weights (logits, padded batches,
greedy generation, reward scores), round trips, and clear errors. Tiny random models built here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import tokenizers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from instructgpt.batching import pad  # noqa: E402
from instructgpt.chat import render_prompt  # noqa: E402
from instructgpt.checkpoint import save_model  # noqa: E402
from instructgpt.cli import main as cli_main  # noqa: E402
from instructgpt.errors import UserError  # noqa: E402
from instructgpt.generate import SamplingParams, generate  # noqa: E402
from instructgpt.hf import SCORE_BIAS_KEY, import_command, import_hf  # noqa: E402
from instructgpt.hf_export import export_hf  # noqa: E402
from instructgpt.model import GPT, ModelConfig, ScalarModel, positions_from_mask  # noqa: E402
from instructgpt.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

WORDS = ("the cat sat on a mat while seven dogs ran past quickly and every bird sang loudly near "
         "old rivers under bright stars").split()
TEXT = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(60)]
SAMPLE = "the seven dogs sang near a river, 1234 times!"


def hf_tokenizer_file(folder: Path) -> int:
    """A GPT-2-like byte-level BPE (with <|endoftext|>) in folder/tokenizer.json; returns its size."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random norms and biases too (HF and we initialise them to 1 and 0, which would hide mistakes)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def build_hf(folder: Path, family: str, n_extra_rows: int = 0, shard: bool = False, head: str = "lm", **overrides):
    """Save a tiny random HF model with its tokenizer; returns the HF model (eval mode)."""
    n_tok = hf_tokenizer_file(folder)
    V = n_tok + n_extra_rows  # HF matrices may have rows past the tokenizer (Qwen2 does)
    common = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.1)
    if family == "gpt2":
        config = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, **common)
    else:
        cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}[family]
        config = cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, head_dim=8, **common)
    for k, v in overrides.items():
        setattr(config, k, v)
    if head == "score":
        config.num_labels = 1
        config.pad_token_id = 0
    auto = transformers.AutoModelForSequenceClassification if head == "score" else transformers.AutoModelForCausalLM
    torch.manual_seed(0)
    model = auto.from_config(config)
    perturb(model)
    model.save_pretrained(folder, max_shard_size="40KB" if shard else "1GB")
    return model.eval()


def padded_batch(V: int, lengths=(11, 7, 3), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in lengths]
    return pad(prompts, 0, "left")


def assert_same_logits(ours: torch.nn.Module, hf, n_tok: int, replaced: frozenset[int] = frozenset()) -> None:
    """Same logits on a left-padded batch of ids below n_tok, over HF's vocabulary except the rows our
    import `replaced` (special tokens given ids inside HF's unused rows)."""
    idx, mask = padded_batch(n_tok)
    V = hf.config.vocab_size
    with torch.no_grad():
        mine = ours(idx, mask)[..., :V]
        theirs = hf(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    keep = torch.tensor([i not in replaced for i in range(V)])
    assert theirs.shape[-1] == V
    torch.testing.assert_close(mine[real][:, keep], theirs[real][:, keep], atol=1e-5, rtol=1e-5)


def assert_same_greedy(ours: GPT, tok: Tokenizer, hf, V: int, n_new: int = 10) -> None:
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (9, 4, 6)]
    params = SamplingParams(max_new_tokens=n_new, temperature=0)
    mine = generate(ours, prompts, params, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert not mine.ended.any()  # the new tokens' mean rows never win an argmax
    idx, mask = pad(prompts, 0, "left")
    with torch.no_grad():
        out = hf.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, use_cache=True, pad_token_id=0)
    assert mine.tokens.tolist() == out[:, idx.size(1):].tolist()


# ----------------------------------------------------------------------------------------------------
# Import


CASES = {
    "gpt2": dict(family="gpt2"),
    "gpt2-untied-sharded": dict(family="gpt2", shard=True, tie_word_embeddings=False),
    "llama-gqa-llama3-rope": dict(family="llama", rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral-tied-linear-rope": dict(family="mistral", tie_word_embeddings=True, sliding_window=64,
                                     rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "qwen2-bias-extra-rows": dict(family="qwen2", n_extra_rows=20),
    "qwen3-qk-norm-head-dim-16": dict(family="qwen3", head_dim=16),
    "llama-head-dim-16-tied": dict(family="llama", head_dim=16, tie_word_embeddings=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_transformers(tmp_path, case):
    hf = build_hf(tmp_path / "hf", **CASES[case])
    model, tok = import_hf(tmp_path / "hf")
    V = hf.config.vocab_size
    assert isinstance(model, GPT)
    # The six special tokens are new ids at the end of the tokenizer, with the mean embedding.
    n_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).get_vocab_size()
    assert sorted(tok.special_ids) == list(range(n_tok, n_tok + len(SPECIAL_TOKENS)))
    assert model.config.vocab_size == max(V, n_tok + len(SPECIAL_TOKENS))
    wte = model.transformer.wte.weight
    torch.testing.assert_close(wte[tok.eos_id], wte[:n_tok].mean(0))
    if case.startswith("qwen2"):
        assert model.config.attention_bias and not model.config.bias
    assert model.config.qk_norm == case.startswith("qwen3")
    assert model.config.head_dim == getattr(hf.config, "head_dim", 32 // 4)  # GPT-2's config has no head_dim
    assert_same_logits(model, hf, n_tok, replaced=tok.special_ids)
    assert_same_greedy(model, tok, hf, n_tok)


def test_import_command_writes_a_checkpoint_and_keeps_the_chat_files(tmp_path):
    import tyro

    build_hf(tmp_path / "hf", "llama")
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer_config = json.dumps({"eos_token": "<|endoftext|>", "chat_template": template})
    (tmp_path / "hf" / "tokenizer_config.json").write_text(tokenizer_config)
    (tmp_path / "hf" / "generation_config.json").write_text('{"eos_token_id": [0]}')
    cli_main(["import-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])  # as the README writes it
    assert {p.name for p in (tmp_path / "ours").iterdir()} == {
        "model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "tokenizer_config.json",
        "generation_config.json"}
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == template
    assert (tmp_path / "ours" / "tokenizer_config.json").read_text() == tokenizer_config  # copied as it is
    assert (tmp_path / "ours" / "generation_config.json").read_text() == '{"eos_token_id": [0]}'
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["kind"] == "gpt" and config["imported_from"]["model_type"] == "llama"
    assert config["imported_from"]["format"] == "hf"
    assert Tokenizer.load(tmp_path / "ours").vocab_size == config["model"]["vocab_size"]
    for name in ("tokenizer_config.json", "generation_config.json"):
        (tmp_path / "hf" / name).unlink()
    tyro.cli(import_command, args=["--src", str(tmp_path / "hf"), "--out", str(tmp_path / "ours")])  # old spelling
    assert not any((tmp_path / "ours" / name).exists() for name in ("chat_template.jinja", "tokenizer_config.json"))
    with pytest.raises(UserError, match="give the model to import once"):
        import_command(tmp_path / "hf", out=tmp_path / "x", src_flag=tmp_path / "hf")


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_qwen3_and_explicit_head_dim_round_trip(tmp_path, family):
    """head_dim 16 with hidden_size 32 and 4 heads (not 32 / 4); Qwen3 with its per-head q/k RMSNorm:
    HF -> ours -> HF gives the same logits, and ours -> HF -> ours the same weights."""
    hf = build_hf(tmp_path / "hf", family, head_dim=16)
    model, tok = import_hf(tmp_path / "hf")
    assert (model.config.head_size, model.config.qk_norm) == (16, family == "qwen3")
    n_tok = tokenizers.Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).get_vocab_size()
    assert_same_logits(model, hf, n_tok, replaced=tok.special_ids)
    save_model(model, tmp_path / "ours")
    tok.save(tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "export", log=lambda _: None)
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(again).__name__ == {"qwen3": "Qwen3ForCausalLM", "llama": "LlamaForCausalLM"}[family]
    assert again.config.head_dim == 16
    idx, mask = padded_batch(n_tok)
    with torch.no_grad():
        before, after = (m(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
                         for m in (hf, again))
    real = mask.bool()
    torch.testing.assert_close(after[real][:, :n_tok], before[real][:, :n_tok], atol=1e-4, rtol=1e-4)
    reimported, _ = import_hf(tmp_path / "export")
    assert reimported.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, reimported.state_dict()[key]), key


def test_import_then_export_then_import_is_identity(tmp_path):
    for family in ("gpt2", "qwen2"):
        build_hf(tmp_path / family, family, n_extra_rows=5)
        model, tok = import_hf(tmp_path / family)
        save_model(model, tmp_path / f"{family}-ours")
        tok.save(tmp_path / f"{family}-ours")
        export_hf(tmp_path / f"{family}-ours", tmp_path / f"{family}-export", log=lambda _: None)
        again, tok2 = import_hf(tmp_path / f"{family}-export")
        assert again.config == model.config and tok2.vocab_size == tok.vocab_size
        a, b = model.state_dict(), again.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------------
# Export


@pytest.fixture(scope="module")
def our_tokenizer() -> Tokenizer:
    return Tokenizer.train_bpe(TEXT, vocab_size=300, min_frequency=1)


def our_checkpoint(folder: Path, tok: Tokenizer | None, scalar: bool = False, **cfg) -> torch.nn.Module:
    base = ModelConfig.gpt2 if cfg.pop("style", "gpt2") == "gpt2" else ModelConfig.llama
    config = base(vocab_size=tok.vocab_size if tok else 300, block_size=64, n_layer=2, n_head=4, n_embd=32, **cfg)
    torch.manual_seed(0)
    model = (ScalarModel if scalar else GPT)(config)
    perturb(model)
    save_model(model, folder)
    if tok is not None:
        tok.save(folder)
    return model.eval()


EXPORTS = {
    "gpt2": dict(style="gpt2"),
    "gpt2-untied": dict(style="gpt2", tie_embeddings=False),
    "llama-gqa": dict(style="llama", n_kv_head=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "qwen2-tied": dict(style="llama", attention_bias=True, tie_embeddings=True, n_kv_head=1),
    "qwen3-head-size-16": dict(style="llama", qk_norm=True, head_size=16, n_kv_head=2),
    "llama-head-size-16": dict(style="llama", head_size=16),
}


@pytest.mark.parametrize("case", list(EXPORTS))
def test_export_loads_in_transformers(tmp_path, our_tokenizer, case):
    tok = our_tokenizer
    ours = our_checkpoint(tmp_path / "ours", tok, **EXPORTS[case])
    export_hf(tmp_path / "ours", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM"}
    assert type(hf).__name__ == expected[case.split("-")[0]]
    assert hf.config.vocab_size == tok.vocab_size
    assert_same_logits(ours, hf, tok.vocab_size)
    assert_same_greedy(ours, tok, hf, tok.vocab_size)

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok(SAMPLE)["input_ids"] == tok.encode(SAMPLE)
    assert (hf_tok.pad_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    assert hf_tok.decode(tok.encode(SAMPLE)) == SAMPLE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": SAMPLE}]
    chat = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert hf_tok(chat)["input_ids"] == render_prompt(tok, messages)

    again, _ = import_hf(tmp_path / "hf")  # export then import: the same weights, pad rows aside
    V = tok.vocab_size
    for key, value in ours.state_dict().items():
        other = again.state_dict()[key]
        if key in ("transformer.wte.weight", "lm_head.weight"):
            value, other = value[:V], other[:V]
        assert torch.equal(value, other), key


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_export_reward_model_scores(tmp_path, our_tokenizer, style):
    tok = our_tokenizer
    ours = our_checkpoint(tmp_path / "ours", tok, scalar=True, style=style)
    with torch.no_grad():
        ours.score_head.bias.fill_(0.75)
    save_model(ours, tmp_path / "ours")
    notes = []
    export_hf(tmp_path / "ours", tmp_path / "hf", log=notes.append)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == ("GPT2" if style == "gpt2" else "Llama") + "ForSequenceClassification"
    # GPT-2's LayerNorm bias absorbs the score bias exactly; Llama's RMSNorm cannot, so HF's scores are
    # shifted by it, and the export says so.
    shift = 0.0 if style == "gpt2" else 0.75
    assert bool(notes) == (style == "llama")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get(SCORE_BIAS_KEY, 0.0) == shift
    texts = ["the cat sat", "seven dogs ran past quickly and every bird sang", "old rivers"]
    ids = [tok.encode(t) for t in texts]
    for side in ("left", "right"):
        T = max(map(len, ids))
        idx = torch.full((len(ids), T), tok.pad_id)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, row in enumerate(ids):
            sl = slice(T - len(row), T) if side == "left" else slice(0, len(row))
            idx[i, sl], mask[i, sl] = torch.tensor(row), 1
        with torch.no_grad():
            mine = ours.score(idx, mask)
            theirs = hf(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits[:, 0]
        torch.testing.assert_close(theirs + shift, mine, atol=1e-5, rtol=1e-5)
    again, _ = import_hf(tmp_path / "hf")  # the bias comes back from config.json
    assert isinstance(again, ScalarModel)
    with torch.no_grad():
        torch.testing.assert_close(again.score(idx, mask), mine, atol=1e-5, rtol=1e-5)


def test_export_without_tokenizer_writes_weights_and_says_so(tmp_path):
    our_checkpoint(tmp_path / "ours", None)
    notes = []
    export_hf(tmp_path / "ours", tmp_path / "hf", log=notes.append)
    assert len(notes) == 1 and "no tokenizer.json" in notes[0]
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("cfg", [dict(norm="rmsnorm"), dict(qk_norm=True), dict(head_size=16),
                                 dict(style="llama", qk_norm=True, attention_bias=True)])
def test_export_refuses_a_mixed_architecture(tmp_path, our_tokenizer, cfg):
    our_checkpoint(tmp_path / "ours", our_tokenizer, **cfg)
    with pytest.raises(UserError, match="no Hugging Face architecture matches"):
        export_hf(tmp_path / "ours", tmp_path / "hf")


# ----------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_architecture(tmp_path):
    hf_tokenizer_file(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(UserError, match=r"unsupported model \(model_type='bert'.*BertForMaskedLM.*Qwen3ForCausalLM"):
        import_hf(tmp_path)


def test_qwen3_attention_bias_is_refused(tmp_path):
    build_hf(tmp_path, "qwen3", attention_bias=True)  # a bias on o_proj too, which our attention lacks
    with pytest.raises(UserError, match=r"config.json: unsupported: attention_bias on a qwen3 model"):
        import_hf(tmp_path)


def test_pickled_only_checkpoint_is_refused_without_unpickling(tmp_path):
    build_hf(tmp_path, "gpt2")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(UserError, match="only pickled weights.*pytorch_model.bin.*safetensors"):
        import_hf(tmp_path)


def test_missing_weight_is_named(tmp_path):
    build_hf(tmp_path, "llama")
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing weight model\.layers\.1\.mlp\.up_proj\.weight"):
        import_hf(tmp_path)


def test_wrong_shape_and_unexplained_weights_are_named(tmp_path):
    build_hf(tmp_path, "gpt2")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_inner": 64}))
    with pytest.raises(UserError, match=r"transformer\.h\.0\.mlp\.c_fc\.weight has shape \(32, 128\)"):
        import_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layer": 1}))
    with pytest.raises(UserError, match=r"config does not account for: transformer\.h\.1\."):
        import_hf(tmp_path)


def test_sliding_window_shorter_than_context_is_refused(tmp_path):
    build_hf(tmp_path, "mistral", sliding_window=32)
    with pytest.raises(UserError, match="sliding-window attention over 32 tokens"):
        import_hf(tmp_path)
