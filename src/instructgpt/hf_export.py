"""Export our checkpoint as a Hugging Face folder (`export_hf`, `instructgpt export-hf`) that
`transformers.AutoModelForCausalLM` / `AutoModelForSequenceClassification` and `AutoTokenizer` load without
custom code: GPT-2 style models as GPT2*, Llama style as Llama* (Qwen2* when the q/k/v projection alone has
biases, Qwen3* with qk_norm). The vocabulary is unpadded to `vocab_size`.

A model with the built-in chat format gets it as a Jinja template with `{% generation %}` markers
(`chat.builtin_template`), so other tools can mask the assistant's tokens; an imported model keeps its own
tokenizer files and template.

A stage trained with LoRA exports as its merged model (the default), or with `--adapter` as what PEFT users
load: the base model it was trained over (the stage's --init) and, in OUT/adapter/, the adapter in PEFT's
format (`export_adapter`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from .chat import builtin_template
from .checkpoint import CONFIG, WEIGHTS, atomic_write, load_model, read_config
from .errors import UserError
from .finetune import ADAPTER
from .hf import HF_CONFIG, HF_WEIGHTS, SCORE_BIAS_KEY, TOKENIZER
from .hf_arch import hf_family
from .lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from .model import GPT, ModelConfig, ScalarModel
from .resume import file_digest
from .tokenizer import SPECIAL_TOKENS, Tokenizer

# ----------------------------------------------------------------------------------------------------
# Export


def hf_config(cfg: ModelConfig, kind: str, tok: Tokenizer | None, score_bias: float = 0.0) -> dict:
    """The HF config.json of our model."""
    family = hf_family(cfg)
    head = "ForSequenceClassification" if kind == "scalar" else ("LMHeadModel" if family == "gpt2" else "ForCausalLM")
    name = {"gpt2": "GPT2", "llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    ids = dict(zip(("bos_token_id", "eos_token_id", "pad_token_id"),
                   (tok.bos_id, tok.eos_id, tok.pad_id) if tok is not None else (None,) * 3))
    out: dict = {"architectures": [name + head], "model_type": family, "vocab_size": cfg.vocab_size,
                 "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": "float32", "use_cache": True,
                 "initializer_range": 0.02, **ids}
    if kind == "scalar":
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, problem_type="regression")
        if score_bias:
            out[SCORE_BIAS_KEY] = score_bias
    if family == "gpt2":
        return {**out, "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.intermediate_size,  # None: 4C in both
                "activation_function": "gelu_pytorch_tanh", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.attn_dropout,
                "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "reorder_and_upcast_attn": False}
    scaling = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    rope_parameters = {"rope_type": "default", **(scaling or {}), "rope_theta": cfg.rope_theta}
    out.update({
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.norm_eps,
        "attention_dropout": cfg.attn_dropout,
        # transformers 5 reads rope_parameters; 4.x reads rope_theta and rope_scaling.
        "rope_parameters": rope_parameters, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
    })
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer,
                   layer_types=["full_attention"] * cfg.n_layer)
    return out


def hf_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """Our weights under HF names and layouts, vocabulary unpadded, plus the score bias HF could not
    take (0 when it was folded in or the model has no score head)."""
    cfg = model.config
    family = hf_family(cfg)
    V, D, H, K, I = cfg.vocab_size, cfg.head_dim, cfg.n_head, cfg.kv_heads, cfg.hidden_dim
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {}
    left_bias = 0.0
    trunk = "transformer." if family == "gpt2" else "model."
    if family == "gpt2":
        out["transformer.wte.weight"] = sd["transformer.wte.weight"][:V]
        out.update({k: sd[k] for k in ("transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias")})
        for i in range(cfg.n_layer):
            op, hp = f"transformer.h.{i}.", f"transformer.h.{i}."
            for ours, theirs in (("ln_1", "ln_1"), ("ln_2", "ln_2"), ("attn.qkv_proj", "attn.c_attn"),
                                 ("attn.o_proj", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                weight = sd[f"{op}{ours}.weight"]
                out[f"{hp}{theirs}.weight"] = weight if ours.startswith("ln") else weight.t()  # Conv1D: (in, out)
                out[f"{hp}{theirs}.bias"] = sd[f"{op}{ours}.bias"]
    else:
        out["model.embed_tokens.weight"] = sd["transformer.wte.weight"][:V]
        out["model.norm.weight"] = sd["transformer.ln_f.weight"]
        for i in range(cfg.n_layer):
            op, hp = f"transformer.h.{i}.", f"model.layers.{i}."
            for part in ("weight", "bias") if family == "qwen2" else ("weight",):  # rows [q (H*D), k (K*D), v (K*D)]
                rows = sd[f"{op}attn.qkv_proj.{part}"].split([H * D, K * D, K * D])
                out.update({f"{hp}self_attn.{n}_proj.{part}": r for n, r in zip("qkv", rows)})
            if cfg.qk_norm:
                out.update({f"{hp}self_attn.{n}_norm.weight": sd[f"{op}attn.{n}_norm.weight"] for n in "qk"})
            out[hp + "self_attn.o_proj.weight"] = sd[op + "attn.o_proj.weight"]
            gate, up = sd[op + "mlp.fc.weight"].split([I, I])
            out.update({hp + "mlp.gate_proj.weight": gate, hp + "mlp.up_proj.weight": up,
                        hp + "mlp.down_proj.weight": sd[op + "mlp.proj.weight"],
                        hp + "input_layernorm.weight": sd[op + "ln_1.weight"],
                        hp + "post_attention_layernorm.weight": sd[op + "ln_2.weight"]})
    if isinstance(model, ScalarModel):
        weight, bias = sd["score_head.weight"], float(sd["score_head.bias"][0])
        out["score.weight"] = weight
        norm_bias = trunk + "ln_f.bias"
        if norm_bias in out and bias != 0.0 and float(weight.pow(2).sum()) > 0:
            # HF's score layer has no bias. With a LayerNorm bias beta before it, w.(g n + beta) + b equals
            # w.(g n + beta + b w / |w|^2): the constant moves into beta and the scores stay the same.
            out[norm_bias] = out[norm_bias] + bias * weight[0] / weight.pow(2).sum()
        else:
            left_bias = bias
    elif not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"][:V]
    return {k: v.contiguous() for k, v in out.items()}, left_bias


def tokenizer_files(tok: Tokenizer, cfg: ModelConfig) -> dict[str, dict]:
    """tokenizer_config.json, special_tokens_map.json and generation_config.json for AutoTokenizer and
    generate(): a plain PreTrainedTokenizerFast over tokenizer.json, our special tokens, left padding. A model
    with its own chat template keeps its special tokens and template."""
    stop = list(tok.stop_ids) if len(tok.stop_ids) > 1 else tok.eos_id
    generation = {"bos_token_id": tok.bos_id, "eos_token_id": stop, "pad_token_id": tok.pad_id}
    if tok.chat_template is not None:
        config = {"tokenizer_class": "PreTrainedTokenizerFast", **tok.config, "chat_template": tok.chat_template}
        return {"tokenizer_config.json": config, "generation_config.json": generation}
    names = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    extra = [t for t in SPECIAL_TOKENS if t not in names.values()]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", **names, "additional_special_tokens": extra,
        "model_max_length": cfg.block_size, "padding_side": "left", "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False, "chat_template": builtin_template(tok),
    }
    return {"tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": {**names, "additional_special_tokens": extra},
            "generation_config.json": generation}


def export_hf(model_dir: str | Path, out_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """Our checkpoint folder (GPT or ScalarModel) -> an HF folder that transformers' Auto classes load.

    The tokenizer is taken from `model_dir/tokenizer.json`; without it only the weights and config are
    written (and `log` says so)."""
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model = load_model(model_dir)
    if not isinstance(model, GPT | ScalarModel):
        raise UserError(f"{model_dir}: only GPT and scalar (reward) models can be exported to Hugging Face")
    cfg = model.config
    kind = "scalar" if isinstance(model, ScalarModel) else "gpt"
    tok = None
    if (model_dir / TOKENIZER).is_file():
        tok = Tokenizer.load(model_dir / TOKENIZER)
        if tok.vocab_size > cfg.vocab_size:
            raise UserError(f"{model_dir}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}")
    else:
        log(f"note: {model_dir} has no {TOKENIZER}: exporting the weights and config only (no tokenizer, "
            "no bos/eos/pad ids); copy the run's tokenizer.json there and export again for a complete folder")
    tensors, score_bias = hf_tensors(model)
    config = hf_config(cfg, kind, tok, score_bias)
    if score_bias:
        log(f"note: HF's {config['architectures'][0]} has no bias on its score layer and an RMSNorm without "
            f"bias precedes it, so the exported scores are ours minus {score_bias:.6g} (kept in config.json "
            f"as {SCORE_BIAS_KEY}); rankings and preference probabilities are unchanged")
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / HF_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    files = {HF_CONFIG: config}
    if tok is not None:
        files.update(tokenizer_files(tok, cfg))
        if kind == "scalar":
            del files["generation_config.json"]  # a classifier does not generate
        tok.save(out_dir / TOKENIZER)
    for name, content in files.items():
        atomic_write(out_dir / name, lambda tmp, c=content: Path(tmp).write_text(json.dumps(c, indent=2) + "\n"))
    return out_dir


def export_adapter(src: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """A stage folder trained with --lora-rank -> OUT: the Hugging Face export of the base model it was trained
    over (its --init, which SRC/config.json records with the digest of its files), and OUT/adapter/: the stage's
    adapter in PEFT's format, naming OUT as its base. Then `peft.PeftModel.from_pretrained(
    AutoModelForCausalLM.from_pretrained(OUT), OUT / "adapter")` computes what SRC/model.safetensors (the merged
    model) computes. A base whose files changed since the training is refused: the adapter would not fit it."""
    src, out = Path(src), Path(out)
    record = read_config(src).get("lora")
    if record is None:
        raise UserError(f"--adapter: {src} was not trained with LoRA (its {CONFIG} has no 'lora' entry); export its "
                        "model without --adapter")
    adapter = src / ADAPTER
    if not ((adapter / ADAPTER_CONFIG).is_file() and (adapter / ADAPTER_WEIGHTS).is_file()):
        raise UserError(f"--adapter: {src} has no {ADAPTER}/ with {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (only "
                        "language models of GPT-2 or Llama style get one); export its merged model without --adapter")
    base = Path(record["base"])
    if not base.is_dir():
        raise UserError(f"--adapter: {base}, the base model {src} was trained over (its --init), is not there any "
                        "more; export the merged model without --adapter")
    for name in (WEIGHTS, CONFIG):
        recorded = (record.get("base_files") or {}).get(name)
        if recorded is not None and (not (base / name).is_file() or file_digest(base / name) != recorded):
            raise UserError(f"--adapter: {base / name} changed since {src} was trained over it, so the adapter "
                            "would not give the stage's model; export the merged model without --adapter")
    export_hf(base, out, log)
    config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(out.resolve())
    atomic_write(out / ADAPTER / ADAPTER_WEIGHTS, lambda tmp: shutil.copyfile(adapter / ADAPTER_WEIGHTS, tmp))
    atomic_write(out / ADAPTER / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def export_command(src: Path, out: Path, adapter: bool = False) -> None:
    """Export our checkpoint (language or reward model) as a Hugging Face model folder.

    GPT-2 style models become GPT2LMHeadModel / GPT2ForSequenceClassification, Llama style ones
    LlamaForCausalLM / LlamaForSequenceClassification (Qwen2* with q/k/v biases, Qwen3* with qk_norm).
    SRC/tokenizer.json is exported with them when present.

    Args:
        src: our checkpoint folder (model.safetensors + config.json, and tokenizer.json).
        out: the folder to write (config.json, model.safetensors, tokenizer files).
        adapter: for a stage trained with --lora-rank: export the base model it was trained over (its --init) to
            OUT and its adapter in PEFT's format to OUT/adapter/, instead of the merged model; peft's
            PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(OUT), OUT/adapter) is then the
            stage's model.
    """
    if adapter:
        export_adapter(src, out)
        print(f"exported the base of {src} -> {out}, its adapter -> {out / ADAPTER}")
        return
    export_hf(src, out)
    print(f"exported {src} -> {out}")


__all__ = ["export_adapter", "export_command", "export_hf", "hf_config", "hf_tensors"]
