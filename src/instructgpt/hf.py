"""Hugging Face interoperability: import a local GPT-2 or Llama-family checkpoint or a GGUF file, export ours.

Import (`import_hf`, `instructgpt import-hf`) reads only JSON and safetensors: `config.json`, the weights
(`model.safetensors`, or shards listed in `model.safetensors.index.json`) and `tokenizer.json`. It never
unpickles (DESIGN invariant 10): a folder with only `pytorch_model.bin` is refused with a hint to convert.
A .gguf file (llama.cpp's format) is read by gguf.py into the same config, weights and tokenizer.

Supported layouts, mapped onto ours (model.py):

    GPT2LMHeadModel             Conv1D weights are (in, out): transposed into nn.Linear's (out, in)
    Llama / Mistral / Qwen2 /   q, k, v stacked into one qkv_proj (rows [q (H*D), k (K*D), v (K*D)]), gate and up
    Qwen3ForCausalLM            into one fc (rows [gate (I), up (I)]); Qwen2's q/k/v biases: attention_bias,
                                Qwen3's q_norm/k_norm: qk_norm, a head_dim other than hidden_size / heads: head_size
    *ForSequenceClassification  (num_labels=1) a ScalarModel: HF's bias-free score -> score_head

The model's own chat template and special tokens are kept beside our checkpoint under HF's names (CHAT_FILES):
copied from the folder (the template also out of tokenizer_config.json), or from a GGUF's metadata. A model
with a template keeps its tokenizer unchanged, and every stage renders conversations with that template
(chat.py, template.py), stopping at its end-of-turn token.

A model without a template (a base model) gets ours, which needs six special tokens (<|pad|> <|bos|> <|eos|>
<|system|> <|user|> <|assistant|>). Those the tokenizer lacks are added as special tokens at the end of its
vocabulary (inside the HF matrix when it has unused rows past the tokenizer, as Qwen2's has); their embedding
and unembedding rows start as the mean of the rows of the original tokens. A mean unembedding row can never
win an argmax (its logit is the mean of the others), so greedy decoding of the imported model is unchanged
until fine-tuning.

Export is hf_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import torch
import torch.nn as nn
import tyro

from .chat import BUILTIN_TEMPLATE, BUILTIN_TEMPLATE_SPACED
from .checkpoint import atomic_write, load_state_dict, save_model
from .errors import UserError
from .model import ModelConfig, build_model
from .tokenizer import SPECIAL_TOKENS, Tokenizer

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
CHAT_FILES = ("chat_template.jinja", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
PICKLED = ("pytorch_model.bin", "pytorch_model.bin.index.json", "tf_model.h5", "flax_model.msgpack")

GPT2_ARCHS = {"GPT2LMHeadModel": "gpt", "GPT2ForSequenceClassification": "scalar"}
LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LLAMA_ARCHS = {f"{name}{head}": kind for name in ("Llama", "Mistral", "Qwen2", "Qwen3")
               for head, kind in (("ForCausalLM", "gpt"), ("ForSequenceClassification", "scalar"))}
# Buffers some checkpoints carry that are not weights: GPT-2's causal-mask tables, old Llama's RoPE table.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")
# Where our export keeps the score head's bias, which HF's bias-free score layer cannot hold (Llama style).
SCORE_BIAS_KEY = "instructgpt_score_bias"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# Reading a Hugging Face folder


class HFWeights:
    """The tensors of a local HF checkpoint (one safetensors file or shards), read lazily by name.

    `take` checks the shape and remembers what was used, so that `check_all_used` can name leftovers
    (a config that does not describe the weights) instead of silently dropping them."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = folder
        files = self._weight_files(folder)
        self._where: dict[str, Path] = {}
        self._handles = {}
        for file in files:
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:  # the library raises its own error type or OSError for a bad file
                raise UserError(f"{file}: cannot read safetensors weights ({e})") from None
            self._where.update(dict.fromkeys(self._handles[file].keys(), file))
        self._used: set[str] = set()

    @staticmethod
    def _weight_files(folder: Path) -> list[Path]:
        if (folder / HF_WEIGHTS).is_file():
            return [folder / HF_WEIGHTS]
        if (folder / HF_INDEX).is_file():
            try:
                weight_map = json.loads((folder / HF_INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{folder / HF_INDEX}: not a valid safetensors index ({e})") from None
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise UserError(f"{folder}: shard(s) listed in {HF_INDEX} are missing: {', '.join(missing)}")
            return files
        shards = sorted(folder.glob("*.safetensors"))
        if shards:
            return shards
        pickled = [name for name in PICKLED if (folder / name).is_file()] + sorted(
            p.name for p in folder.glob("pytorch_model-*.bin"))
        if pickled:
            raise UserError(
                f"{folder}: only pickled weights ({', '.join(pickled)}); instructgpt never unpickles checkpoints. "
                "Convert them to safetensors first, for example with transformers in a trusted environment: "
                "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, safe_serialization=True)")
        raise UserError(f"{folder}: no weights found (expected {HF_WEIGHTS} or {HF_INDEX} with its shards)")

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self._where:
            raise UserError(f"{self.folder}: missing weight {key} (expected shape {tuple(shape)})")
        tensor = self._handles[self._where[key]].get_tensor(key)
        if tuple(tensor.shape) != tuple(shape):
            raise UserError(f"{self.folder}: weight {key} has shape {tuple(tensor.shape)}, "
                            f"the config implies {tuple(shape)}")
        self._used.add(key)
        return tensor

    def ignore(self, key: str) -> None:
        self._used.add(key)

    def check_all_used(self) -> None:
        left = sorted(k for k in self._where if k not in self._used and not k.endswith(IGNORED_SUFFIXES))
        if left:
            shown = ", ".join(left[:8]) + (f" and {len(left) - 8} more" if len(left) > 8 else "")
            raise UserError(f"{self.folder}: weight(s) the config does not account for: {shown}")


def read_hf_config(folder: Path) -> tuple[dict, str, str]:
    """The HF config, its family ("gpt2" or "llama") and what it holds ("gpt" or "scalar")."""
    path = folder / HF_CONFIG
    if not folder.is_dir():
        raise UserError(f"{folder}: not a folder (expected a local Hugging Face model folder)")
    if not path.is_file():
        raise UserError(f"{folder}: no {HF_CONFIG} (expected a Hugging Face model folder)")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    model_type, archs = hf.get("model_type"), hf.get("architectures") or []
    arch = archs[0] if len(archs) == 1 else None
    if model_type == "gpt2" and (arch is None or arch in GPT2_ARCHS):
        family, kind = "gpt2", GPT2_ARCHS.get(arch, "gpt")
    elif model_type in LLAMA_TYPES and (arch is None or arch in LLAMA_ARCHS):
        family, kind = "llama", LLAMA_ARCHS.get(arch, "gpt")
    else:
        raise UserError(f"{path}: unsupported model (model_type={model_type!r}, architectures={archs}); "
                        f"supported: {', '.join(sorted(GPT2_ARCHS) + sorted(LLAMA_ARCHS))}")
    if kind == "scalar":
        n_labels = len(hf.get("id2label") or {"0": ""}) if "num_labels" not in hf else hf["num_labels"]
        if n_labels != 1:
            raise UserError(f"{path}: a sequence classifier with {n_labels} labels; a reward model has 1")
    return hf, family, kind


def _need(hf: dict, key: str, source: Path):
    if key not in hf or hf[key] is None:
        raise UserError(f"{source}: missing {key!r}")
    return hf[key]


def _check(ok: bool, source: Path, message: str) -> None:
    if not ok:
        raise UserError(f"{source}: unsupported: {message}")


def gpt2_model_config(hf: dict, vocab_size: int, source: Path) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    # gelu_new and gelu_pytorch_tanh are both the tanh approximation our MLP computes.
    _check(act in ("gelu_new", "gelu_pytorch_tanh"), source, f"activation_function {act!r}")
    _check(hf.get("scale_attn_weights", True), source, "scale_attn_weights=false")
    _check(not hf.get("scale_attn_by_inverse_layer_idx", False), source, "scale_attn_by_inverse_layer_idx")
    _check(not hf.get("add_cross_attention", False), source, "add_cross_attention")
    return ModelConfig.gpt2(
        vocab_size=vocab_size, block_size=_need(hf, "n_positions", source), n_layer=_need(hf, "n_layer", source),
        n_head=_need(hf, "n_head", source), n_embd=_need(hf, "n_embd", source), intermediate_size=hf.get("n_inner"),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True))


def _rope(hf: dict, source: Path) -> tuple[float, dict | None]:
    """RoPE base and scaling from either config format: transformers 5 (`rope_parameters`) or 4
    (`rope_theta` + `rope_scaling`)."""
    params = dict(hf.get("rope_parameters") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params or dict(hf.get("rope_scaling") or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    _check(kind in ("default", "linear", "llama3"), source, f"rope type {kind!r} (supported: linear, llama3)")
    _check(hf.get("partial_rotary_factor", 1.0) == 1.0, source, "partial_rotary_factor")
    if kind == "default":
        return float(theta), None
    return float(theta), {"rope_type": kind, **scaling}


def llama_model_config(hf: dict, vocab_size: int, source: Path) -> ModelConfig:
    model_type = hf["model_type"]
    C, H = _need(hf, "hidden_size", source), _need(hf, "num_attention_heads", source)
    K = hf.get("num_key_value_heads") or H
    D = hf.get("head_dim") or (128 if model_type == "qwen3" else C // H)  # transformers' defaults
    block_size = _need(hf, "max_position_embeddings", source)
    _check(hf.get("hidden_act", "silu") == "silu", source, f"hidden_act {hf.get('hidden_act')!r}")
    _check(not hf.get("mlp_bias", False), source, "mlp_bias")
    if model_type in ("llama", "qwen3"):
        # Their attention_bias also puts a bias on o_proj, which our attention lacks.
        _check(not hf.get("attention_bias", False), source, f"attention_bias on a {model_type} model")
    window = hf.get("sliding_window")
    qwen_sliding = hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or [])
    sliding = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and qwen_sliding)
    if sliding and window is not None and window < block_size:
        raise UserError(f"{source}: sliding-window attention over {window} tokens is shorter than "
                        f"the context of {block_size} (max_position_embeddings); our attention is global, so "
                        f"the model would differ beyond {window} tokens. Set max_position_embeddings to "
                        f"{window} or less in a copy of the folder to import it with a shorter context")
    theta, scaling = _rope(hf, source)
    return ModelConfig.llama(
        vocab_size=vocab_size, block_size=block_size, n_layer=_need(hf, "num_hidden_layers", source), n_head=H,
        n_kv_head=K if K != H else None, n_embd=C, intermediate_size=_need(hf, "intermediate_size", source),
        norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
        attention_bias=True if model_type == "qwen2" else None,  # Qwen2: biases on q, k and v only
        head_size=D if D * H != C else None, qk_norm=model_type == "qwen3",
        tie_embeddings=hf.get("tie_word_embeddings", False))


# ----------------------------------------------------------------------------------------------------
# Weights: HF names and layouts -> ours


def _gpt2_tensors(w: HFWeights, cfg: ModelConfig, n_hf: int, kind: str) -> dict[str, torch.Tensor]:
    # The original GPT-2 checkpoints store the trunk without the "transformer." prefix.
    p = "transformer." if "transformer.wte.weight" in w or "wte.weight" not in w else ""
    C, I, L = cfg.n_embd, cfg.hidden_dim, cfg.n_layer

    def linear(name: str, n_in: int, n_out: int) -> dict[str, torch.Tensor]:
        # Conv1D stores (in, out); nn.Linear wants (out, in).
        return {"weight": w.take(f"{name}.weight", (n_in, n_out)).t(), "bias": w.take(f"{name}.bias", (n_out,))}

    def norm(name: str) -> dict[str, torch.Tensor]:
        return {"weight": w.take(f"{name}.weight", (C,)), "bias": w.take(f"{name}.bias", (C,))}

    out = {"transformer.wte.weight": w.take(f"{p}wte.weight", (n_hf, C)),
           "transformer.wpe.weight": w.take(f"{p}wpe.weight", (cfg.block_size, C))}
    parts: list[tuple[str, dict]] = [("transformer.ln_f", norm(f"{p}ln_f"))]
    for i in range(L):
        hp, op = f"{p}h.{i}.", f"transformer.h.{i}."
        parts += [
            (op + "ln_1", norm(hp + "ln_1")),
            (op + "attn.qkv_proj", linear(hp + "attn.c_attn", C, 3 * C)),  # columns [q, k, v] already
            (op + "attn.o_proj", linear(hp + "attn.c_proj", C, C)),
            (op + "ln_2", norm(hp + "ln_2")),
            (op + "mlp.fc", linear(hp + "mlp.c_fc", C, I)),
            (op + "mlp.proj", linear(hp + "mlp.c_proj", I, C)),
        ]
    for prefix, tensors in parts:
        out.update({f"{prefix}.{k}": v for k, v in tensors.items()})
    out.update(_head_tensors(w, cfg, n_hf, kind, "lm_head.weight", "score.weight"))
    return out


def _llama_tensors(w: HFWeights, cfg: ModelConfig, n_hf: int, kind: str) -> dict[str, torch.Tensor]:
    C, I, D = cfg.n_embd, cfg.hidden_dim, cfg.head_dim
    H, K = cfg.n_head, cfg.kv_heads
    out = {"transformer.wte.weight": w.take("model.embed_tokens.weight", (n_hf, C)),
           "transformer.ln_f.weight": w.take("model.norm.weight", (C,))}
    for i in range(cfg.n_layer):
        hp, op = f"model.layers.{i}.", f"transformer.h.{i}."
        q, k, v = (w.take(f"{hp}self_attn.{n}_proj.weight", (m * D, C)) for n, m in (("q", H), ("k", K), ("v", K)))
        out[op + "attn.qkv_proj.weight"] = torch.cat([q, k, v])  # rows [q (H*D), k (K*D), v (K*D)]
        if cfg.attention_bias:
            out[op + "attn.qkv_proj.bias"] = torch.cat(
                [w.take(f"{hp}self_attn.{n}_proj.bias", (m * D,)) for n, m in (("q", H), ("k", K), ("v", K))])
        if cfg.qk_norm:
            out.update({f"{op}attn.{n}_norm.weight": w.take(f"{hp}self_attn.{n}_norm.weight", (D,)) for n in "qk"})
        out[op + "attn.o_proj.weight"] = w.take(hp + "self_attn.o_proj.weight", (C, H * D))
        gate, up = (w.take(f"{hp}mlp.{n}_proj.weight", (I, C)) for n in ("gate", "up"))
        out[op + "mlp.fc.weight"] = torch.cat([gate, up])  # rows [gate (I), up (I)]: silu(gate) * up
        out[op + "mlp.proj.weight"] = w.take(hp + "mlp.down_proj.weight", (C, I))
        out[op + "ln_1.weight"] = w.take(hp + "input_layernorm.weight", (C,))
        out[op + "ln_2.weight"] = w.take(hp + "post_attention_layernorm.weight", (C,))
    out.update(_head_tensors(w, cfg, n_hf, kind, "lm_head.weight", "score.weight"))
    return out


def _head_tensors(w: HFWeights, cfg: ModelConfig, n_hf: int, kind: str, lm_key: str, score_key: str) -> dict:
    C = cfg.n_embd
    if kind == "scalar":
        return {"score_head.weight": w.take(score_key, (1, C))}
    if cfg.tie_embeddings:
        if lm_key in w:
            w.ignore(lm_key)  # some tied checkpoints store the shared matrix twice
        return {}
    return {"lm_head.weight": w.take(lm_key, (n_hf, C))}


def _resize_vocab(rows: torch.Tensor, n_real: int, new_ids: list[int], cfg: ModelConfig) -> torch.Tensor:
    """HF rows (n_hf, C) -> ours (padded_vocab, C): HF rows first; rows of new tokens (and of any id past
    the HF matrix) the mean of the rows of the tokenizer's original tokens; padding rows zero."""
    rows = rows.float()
    mean = rows[:n_real].mean(0)
    out = torch.zeros(cfg.padded_vocab, rows.size(1))
    n = min(rows.size(0), cfg.vocab_size)
    out[:n] = rows[:n]
    out[n:cfg.vocab_size] = mean
    for i in new_ids:
        out[i] = mean
    return out


# ----------------------------------------------------------------------------------------------------
# Tokenizer and chat template


def import_tokenizer(source, files: dict[str, str]) -> tuple[Tokenizer, int, list[int]]:
    """A folder's tokenizer.json (or a `tokenizers.Tokenizer` read from a GGUF) and the model's chat files:
    (tokenizer, size before adding, ids of added tokens). A model with a chat template keeps its tokenizer as
    it is and renders with its template; one without gets our six special tokens where missing."""
    import tokenizers
    from tokenizers import AddedToken

    raw, path = source, Path(source) / TOKENIZER if isinstance(source, Path) else None
    if path is not None:
        if not path.is_file():
            raise UserError(f"{source}: no {TOKENIZER}; the import needs the fast-tokenizer file (a folder with "
                            "only a sentencepiece tokenizer.model can be converted by saving its AutoTokenizer)")
        try:
            raw = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise UserError(f"{path}: not a valid tokenizer file ({e})") from None
    size = raw.get_vocab_size(with_added_tokens=True)
    template = files.get("chat_template.jinja")
    has_ours = all(raw.token_to_id(t) is not None for t in SPECIAL_TOKENS)
    if template is not None and not (has_ours and template in (BUILTIN_TEMPLATE, BUILTIN_TEMPLATE_SPACED)):
        config, generation = (_json_file(files, name, source) for name in ("tokenizer_config.json",
                                                                          "generation_config.json"))
        stop = generation.get("eos_token_id", [])
        return Tokenizer(raw, config, template, [stop] if isinstance(stop, int) else stop), size, []
    missing = [t for t in SPECIAL_TOKENS if raw.token_to_id(t) is None]
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    tok = Tokenizer(raw, space_after_role=template == BUILTIN_TEMPLATE_SPACED)
    return tok, size, [raw.token_to_id(t) for t in missing]


def _json_file(files: dict[str, str], name: str, source) -> dict:
    try:
        value = json.loads(files.get(name, "{}"))
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: {name} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{source}: {name} must hold a JSON object")
    return value


def chat_files(folder: Path) -> dict[str, str]:
    """The folder's CHAT_FILES as they are, and its chat template as chat_template.jinja when only
    tokenizer_config.json holds it (a string, or the template named "default" of a list)."""
    files = {name: (folder / name).read_text(encoding="utf-8") for name in CHAT_FILES if (folder / name).is_file()}
    try:
        template = json.loads(files.get("tokenizer_config.json", "{}")).get("chat_template")
    except (json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"{folder / 'tokenizer_config.json'}: not a JSON object ({e})") from None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if isinstance(template, str):
        files.setdefault("chat_template.jinja", template)
    return files


# ----------------------------------------------------------------------------------------------------
# Import


def _import(src: Path, dtype: torch.dtype) -> tuple[nn.Module, Tokenizer, dict, dict]:
    """(model, tokenizer, HF config, chat files) of an HF folder or a .gguf file (via gguf.read_gguf)."""
    if src.suffix.lower() == ".gguf" or src.is_file():
        from .gguf import read_gguf

        (hf, weights, tokenizer_source, files), family, kind, where = read_gguf(src), "llama", "gpt", src
    else:
        hf, family, kind = read_hf_config(src)
        weights, tokenizer_source, files, where = HFWeights(src), src, chat_files(src), src / HF_CONFIG
    tok, n_tok, new_ids = import_tokenizer(tokenizer_source, files)
    n_hf = _need(hf, "vocab_size", where)
    cfg = (gpt2_model_config if family == "gpt2" else llama_model_config)(hf, max(n_hf, tok.vocab_size), where)
    tensors = (_gpt2_tensors if family == "gpt2" else _llama_tensors)(weights, cfg, n_hf, kind)
    weights.check_all_used()
    n_real = min(n_tok, n_hf)
    for key in ("transformer.wte.weight", "lm_head.weight"):
        if key in tensors:
            tensors[key] = _resize_vocab(tensors[key], n_real, new_ids, cfg)
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    if kind == "scalar":
        tensors["score_head.bias"] = torch.tensor([float(hf.get(SCORE_BIAS_KEY, 0.0))])
    model = build_model(cfg, scalar=kind == "scalar")
    load_state_dict(model, tensors, str(src))
    return model.to(dtype).eval(), tok, hf, files


def import_hf(src: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Tokenizer]:
    """A local HF folder or .gguf file -> (our GPT or ScalarModel, its Tokenizer with its chat template, or
    with our chat special tokens when it has none).

    The model's vocab_size covers the HF matrix and every tokenizer id (new special tokens included). Raises
    UserError for an unsupported architecture or tensor type, pickled-only weights, a missing weight, a
    weight of the wrong shape, or weights the config does not account for."""
    return _import(Path(src), dtype)[:2]


def import_command(
    src: Annotated[Path | None, tyro.conf.Positional, tyro.conf.arg(metavar="SRC")] = None, *, out: Path,
    src_flag: Annotated[Path | None, tyro.conf.arg(name="src", metavar="SRC")] = None,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> None:
    """Import a Hugging Face checkpoint folder or a GGUF file (GPT-2, Llama, Mistral, Qwen2 or Qwen3).

    Writes OUT/model.safetensors, OUT/config.json, OUT/tokenizer.json, and the model's own chat template and
    special tokens: OUT/chat_template.jinja, tokenizer_config.json, special_tokens_map.json,
    generation_config.json. A model without a chat template gets our special tokens added to its tokenizer
    where missing (their embeddings the mean of the others).

    Args:
        src: an HF model folder (config.json, safetensors weights, tokenizer.json) or a .gguf file.
        out: the checkpoint folder to write.
        src_flag: the same as SRC.
        dtype: dtype of the stored weights.
    """
    if (src is None) == (src_flag is None):
        raise UserError("give the model to import once: instructgpt import-hf SRC --out DIR")
    src = Path(src or src_flag)
    model, tok, hf, files = _import(src, DTYPES[dtype])
    save_model(model, out, extra={"imported_from": {"path": str(src), "format": "hf" if src.is_dir() else "gguf",
                                                    "model_type": hf.get("model_type"),
                                                    "architectures": hf.get("architectures")}})
    tok.save(Path(out))
    for name in CHAT_FILES:  # the source's, and no stale one of an earlier import into OUT
        (Path(out) / name).unlink(missing_ok=True)
        if name in files:
            atomic_write(Path(out) / name, lambda tmp, t=files[name]: Path(tmp).write_text(t, encoding="utf-8"))
    cfg = model.config
    print(f"imported {src} -> {out}: {hf.get('model_type')}, {cfg.n_layer} layers, {cfg.n_embd} wide, "
          f"vocab {cfg.vocab_size}, {sum(p.numel() for p in model.parameters()):,} parameters")


__all__ = ["HFWeights", "import_command", "import_hf"]
