"""GGUF files (llama.cpp's format) as a source for `instructgpt import-hf`.

A .gguf file holds in one place what a Hugging Face folder spreads over config.json, the weights,
tokenizer.json and tokenizer_config.json. `read_gguf` turns it into what hf.py takes from a folder:

    general.architecture, ARCH.*   an HF config dict: llama, qwen2 or qwen3 (others are refused by name)
    tensors                        `GGUFWeights`: HF names and shapes, dequantised to fp32 when taken
                                   (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K)
    tokenizer.ggml.*               a `tokenizers.Tokenizer`: byte-level BPE from the vocabulary and merges,
                                   the pre-tokenizer that `tokenizer.ggml.pre` names, control tokens special
    tokenizer.chat_template, ids   the model's chat template and special tokens as HF's files
                                   (chat_template.jinja, tokenizer_config.json, generation_config.json)

llama.cpp's converter reorders the rows of a Llama-architecture q and k projection, head by head, for its
RoPE kernel, which rotates adjacent pairs (i, i + 1) where HF's and ours rotate (i, i + D/2); `unpermute`
puts them back (as transformers' GGUF loader does). Qwen2 and Qwen3 files keep HF's order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

# GGUF architecture -> the HF class name prefix; model_type is the architecture's own name.
ARCHS = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}
# ggml tensor types we dequantise (with gguf.quants.dequantize; tests check them against the block layout
# or transformers' own implementation).
TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# GGUF tensor names -> HF names: the model's ends, and a block's parts (blk.N.x -> model.layers.N.y).
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# How each `tokenizer.ggml.pre` splits text before BPE (llama.cpp's llama-vocab.cpp; HF's tokenizer.json of
# the same models): "gpt2" is GPT-2's regex inside ByteLevel, "smollm" the same after one digit per piece.
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"default": "gpt2", "gpt2": "gpt2", "smollm": "smollm", "llama3": _LLAMA3, "llama-bpe": _LLAMA3,
                  "llama-v3": _LLAMA3, "qwen2": _QWEN2, "deepseek-r1-qwen": _QWEN2}
# llama.cpp ignores merges for a word that is one token (HF's BPE ignore_merges) for these.
IGNORE_MERGES = {_LLAMA3}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values of special and added tokens
_MISSING = object()


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("reading a .gguf file needs the gguf package: pip install 'instructgpt[gguf]'") from None
    return gguf


class GGUFFile:
    """A .gguf file's metadata (by key) and tensors (by GGUF name), memory-mapped."""

    def __init__(self, path: str | Path):
        gguf = _gguf()
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such file (expected a .gguf file or a Hugging Face model folder)")
        try:
            self.reader = gguf.GGUFReader(str(self.path), "r")
        except Exception as e:  # the reader raises ValueError, struct errors or OSError for a bad file
            raise UserError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")

    def get(self, key: str, default=_MISSING):
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise UserError(f"{self.path}: no metadata key {key!r}")
            return default
        gguf = _gguf()
        kind = field.types[-1]

        def value(part):
            if kind == gguf.GGUFValueType.STRING:
                return bytes(part).decode("utf-8")
            return bool(part[0]) if kind == gguf.GGUFValueType.BOOL else part[0].item()

        try:
            values = [value(field.parts[i]) for i in field.data]
        except UnicodeDecodeError as e:
            raise UserError(f"{self.path}: metadata {key!r} is not valid UTF-8 ({e})") from None
        return values if field.types[0] == gguf.GGUFValueType.ARRAY else values[0]

    def arch_key(self, key: str, default=_MISSING):
        """A hyperparameter of the architecture (`llama.block_count`), one value for every layer."""
        value = self.get(f"{self.arch}.{key}", default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise UserError(f"{self.path}: {self.arch}.{key} differs between layers ({value[:8]}...); "
                                "layers of different shapes are not supported")
            value = value[0]
        return value


# ----------------------------------------------------------------------------------------------------
# Metadata -> an HF config


def hf_config(g: GGUFFile) -> dict:
    """The HF config.json a converter would have read to write this file."""
    if g.arch not in ARCHS:
        raise UserError(f"{g.path}: unsupported GGUF architecture {g.arch!r}; supported: {', '.join(ARCHS)}")
    if g.arch_key("expert_count", 0):
        raise UserError(f"{g.path}: a mixture of experts ({g.arch}.expert_count={g.arch_key('expert_count')}) "
                        "is not supported")
    if "token_embd.weight" not in g.tensors:
        raise UserError(f"{g.path}: no token_embd.weight tensor")
    C, H = g.arch_key("embedding_length"), g.arch_key("attention.head_count")
    D = g.arch_key("attention.key_length", C // H)
    unsupported = {"attention.value_length": (g.arch_key("attention.value_length", D), D),
                   "rope.dimension_count": (g.arch_key("rope.dimension_count", D), D)}
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise UserError(f"{g.path}: {g.arch}.{key}={value} differs from the head size {D}; not supported")
    theta = float(g.arch_key("rope.freq_base", 10000.0))
    return {
        "model_type": g.arch, "architectures": [ARCHS[g.arch] + "ForCausalLM"], "hidden_act": "silu",
        "hidden_size": C, "num_attention_heads": H, "num_key_value_heads": g.arch_key("attention.head_count_kv", H),
        "head_dim": D, "num_hidden_layers": g.arch_key("block_count"),
        "intermediate_size": g.arch_key("feed_forward_length"),
        "max_position_embeddings": g.arch_key("context_length"),
        "rms_norm_eps": g.arch_key("attention.layer_norm_rms_epsilon"),
        "rope_theta": theta, "rope_scaling": rope_scaling(g, theta, D),
        "vocab_size": int(g.tensors["token_embd.weight"].shape[-1]),  # GGUF lists dimensions innermost first
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }


def rope_scaling(g: GGUFFile, theta: float, D: int) -> dict | None:
    """HF's rope_scaling: linear from the metadata; Llama 3's from the `rope_freqs.weight` factors that
    llama.cpp stores instead of its parameters (recognised when they are the standard ones)."""
    kind = g.arch_key("rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        return {"rope_type": kind}  # hf.py names it as unsupported
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(g.arch_key("rope.scaling.factor"))}
    if "rope_freqs.weight" not in g.tensors:
        return None
    factors = np.asarray(dequantize(g, "rope_freqs.weight"), dtype=np.float64).reshape(-1)
    old, low, high, factor = 8192, 1.0, 4.0, float(factors.max())
    wavelen = 2 * math.pi * theta ** (np.arange(0, D, 2) / D)
    smooth = (old / wavelen - low) / (high - low)
    expected = np.where(wavelen < old / high, 1.0,
                        np.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if factors.shape != expected.shape or not np.allclose(factors, expected, rtol=1e-4):
        raise UserError(f"{g.path}: rope_freqs.weight holds RoPE frequency factors that are not Llama 3's "
                        "scaling (factor, low 1, high 4, original context 8192); not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old}


# ----------------------------------------------------------------------------------------------------
# Tensors


def dequantize(g: GGUFFile, name: str) -> np.ndarray:
    """A tensor's values as fp32, in HF's shape (GGUF's dimensions reversed)."""
    gguf = _gguf()
    t = g.tensors[name]
    kind = gguf.GGMLQuantizationType(t.tensor_type).name
    if kind not in TYPES:
        raise UserError(f"{g.path}: tensor {name} is of type {kind}, not supported; supported: {', '.join(TYPES)}")
    values = gguf.quants.dequantize(t.data, t.tensor_type)
    return np.array(values, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q or k rows (n_head * D, ...): per head, the rows of rotation pairs
    (0, D/2), (1, D/2 + 1), ... stored next to each other go back to the first and the second half."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def hf_name(name: str) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; unknown names stay as they are."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return name


class GGUFWeights:
    """A GGUF file's tensors under HF names, dequantised when taken; the interface of hf.HFWeights
    (take with a shape check, ignore, check_all_used), so that hf.py maps them as it maps a folder's."""

    def __init__(self, g: GGUFFile, hf: dict):
        self.g = g
        self._names = {hf_name(name): name for name in g.tensors}
        # Heads of the rows llama.cpp permuted (weights and any biases of q and k).
        H, K = hf["num_attention_heads"], hf["num_key_value_heads"]
        self._permuted = {"self_attn.q_proj": H, "self_attn.k_proj": K} if g.arch == "llama" else {}
        llama3 = (hf.get("rope_scaling") or {}).get("rope_type") == "llama3"
        self._used: set[str] = {"rope_freqs.weight"} if llama3 else set()  # read by rope_scaling
        bad = sorted({_type_name(t) for t in g.tensors.values()} - set(TYPES))
        if bad:
            raise UserError(f"{g.path}: tensor type(s) {', '.join(bad)} not supported; supported: {', '.join(TYPES)}")

    def __contains__(self, key: str) -> bool:
        return key in self._names

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self._names:
            raise UserError(f"{self.g.path}: missing tensor for {key} (expected shape {tuple(shape)})")
        name = self._names[key]
        values = dequantize(self.g, name)
        if tuple(values.shape) != tuple(shape):
            raise UserError(f"{self.g.path}: tensor {name} has shape {tuple(values.shape)}, "
                            f"the metadata implies {tuple(shape)}")
        heads = next((n for part, n in self._permuted.items() if f".{part}." in key), None)
        if heads is not None:
            values = unpermute(values, heads)
        self._used.add(key)
        return torch.from_numpy(np.ascontiguousarray(values))

    def ignore(self, key: str) -> None:
        self._used.add(key)

    def check_all_used(self) -> None:
        left = sorted(name for key, name in self._names.items() if key not in self._used)
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise UserError(f"{self.g.path}: tensor(s) the metadata does not account for: {shown}")


def _type_name(t) -> str:
    return _gguf().GGMLQuantizationType(t.tensor_type).name


# ----------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 bytes, in which byte-level BPE vocabularies are written."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in kept]
    return {**{b: chr(b) for b in kept}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def tokenizer(g: GGUFFile):
    """The `tokenizers.Tokenizer` the metadata describes (byte-level BPE only)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    kind, pre = g.get("tokenizer.ggml.model", None), g.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UserError(f"{g.path}: tokenizer model {kind!r} is not supported; supported: 'gpt2' (byte-level BPE)")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"{g.path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                        f"supported: {', '.join(PRE_TOKENIZERS)}")
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet (an added token with a real space, say) is respelled byte by byte.
    spelled = [t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = [tuple(m.split(" ")) for m in g.get("tokenizer.ggml.merges", [])]
    if len(vocab) != len(tokens) or any(len(m) != 2 for m in merges):
        raise UserError(f"{g.path}: the tokenizer's vocabulary has repeated tokens or its merges are not pairs")
    split = PRE_TOKENIZERS[pre]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=split in IGNORE_MERGES))
    if split in ("gpt2", "smollm"):
        steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        if split == "smollm":
            steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    else:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    if split == _QWEN2:
        tok.normalizer = normalizers.NFC()  # as Qwen2's tokenizer.json
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_end|>) are special; user-defined ones (<think>) are matched whole in text.
    # A control token outside the byte alphabet is a converter's mislabel, left an ordinary token.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, types)
                            if kind == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, types)
                    if kind == USER_DEFINED and t in vocab])
    return tok


def chat_files(g: GGUFFile) -> dict[str, str]:
    """The model's chat template and special tokens as the text of HF's files, for rendering conversations
    the model's way: chat_template.jinja (when the file has a template), tokenizer_config.json (the special
    tokens by name, add_bos_token) and generation_config.json (bos, pad, and every end-of-turn id)."""
    tokens = g.get("tokenizer.ggml.tokens")
    ids = {key: g.get(f"tokenizer.ggml.{key}_token_id", None) for key in ("bos", "eos", "padding", "unknown",
                                                                            "eot", "eom")}
    ids = {key: i for key, i in ids.items() if i is not None and 0 <= i < len(tokens)}
    names = {"bos_token": "bos", "eos_token": "eos", "pad_token": "padding", "unk_token": "unknown"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **{name: tokens[ids[key]] for name, key in names.items()
                                                                if key in ids},
              "add_bos_token": g.get("tokenizer.ggml.add_bos_token", False),
              "add_eos_token": g.get("tokenizer.ggml.add_eos_token", False), "clean_up_tokenization_spaces": False}
    ends = list(dict.fromkeys(ids[key] for key in ("eos", "eot", "eom") if key in ids))
    generation = {"bos_token_id": ids.get("bos"), "eos_token_id": ends[0] if len(ends) == 1 else ends,
                  "pad_token_id": ids.get("padding")}
    files = {name: json.dumps(content, indent=2) + "\n" for name, content in (
        ("tokenizer_config.json", config), ("generation_config.json", generation))}
    template = g.get("tokenizer.chat_template", None)
    if template is not None:
        files["chat_template.jinja"] = template
    return files


def read_gguf(path: str | Path) -> tuple[dict, GGUFWeights, object, dict[str, str]]:
    """A .gguf file -> (HF config dict, weights under HF names, tokenizers.Tokenizer, chat files)."""
    g = GGUFFile(path)
    hf = hf_config(g)
    return hf, GGUFWeights(g, hf), tokenizer(g), chat_files(g)


__all__ = ["GGUFFile", "GGUFWeights", "chat_files", "dequantize", "hf_config", "read_gguf", "tokenizer", "unpermute"]
