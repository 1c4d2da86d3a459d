"""Which Hugging Face architecture computes exactly what one of our model configs computes: the export's
(`hf_export`) and that of a LoRA adapter in PEFT's format (`finetune.write_adapter`), which names the layers of
that export."""

from __future__ import annotations

from .errors import UserError
from .model import ModelConfig


def hf_family(cfg: ModelConfig) -> str:
    """"gpt2", "llama", "qwen2" or "qwen3": the HF architecture that computes exactly what this config does."""
    attn_bias = cfg.bias if cfg.attention_bias is None else cfg.attention_bias
    if cfg.arch != "gpt":
        raise UserError("only decoder-only models can be exported to Hugging Face (not seq2seq)")
    gpt2 = (cfg.position, cfg.norm, cfg.mlp, cfg.bias, attn_bias) == ("learned", "layernorm", "gelu", True, True)
    if gpt2 and cfg.head_dim * cfg.n_head == cfg.n_embd and not cfg.qk_norm:
        if cfg.kv_heads != cfg.n_head:
            raise UserError("GPT-2 has no grouped-query attention: cannot export n_kv_head < n_head")
        return "gpt2"
    if (cfg.position, cfg.norm, cfg.mlp, cfg.bias) == ("rope", "rmsnorm", "swiglu", False) and not (
            cfg.qk_norm and attn_bias):  # Qwen3's attention_bias would also put a bias on o_proj
        return "qwen3" if cfg.qk_norm else "qwen2" if attn_bias else "llama"
    raise UserError(f"no Hugging Face architecture matches position={cfg.position}, norm={cfg.norm}, mlp={cfg.mlp}, "
                    f"bias={cfg.bias}, attention_bias={cfg.attention_bias}, qk_norm={cfg.qk_norm}, head_size="
                    f"{cfg.head_size}: export supports GPT-2 style (learned, layernorm, gelu, biases) and Llama style")
