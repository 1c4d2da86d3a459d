"""Full fine-tuning or LoRA, and the memory levers, the same way in every training stage (the flags are
`TrainConfig`'s: --lora-rank, --lora-alpha, --lora-dropout, --lora-targets, --activation-checkpointing).

    model = load_model(args.init)
    lora = prepare(model, cfg, trainable=("score_head",))   # before prepare_model (FSDP, compile, DDP) and
    fwd = prepare_model(model, runtime)                     # before the optimizer, which then holds the
    optimizer = make_optimizer(model, cfg, runtime)         # adapters (and the head) only
    ckpt = Checkpointer(out, cfg.keep_last, weights=checkpoint_weights(lora))
    ...
    ckpt.export(model, extra={"stage": ..., **lora_record(lora, args.init, fingerprint["--init"])})  # merged
    write_adapter(model, lora, args.init, out)              # OUT/adapter/, PEFT's files

With LoRA the base weights of --init stay frozen: step checkpoints hold the adapters, a kept-trainable head and
their optimizer state (resume loads --init again, whose digest the run's fingerprint holds), and the stage's
model.safetensors (and best/) is merged, a plain model that every later stage, chat, serve and export-hf read as
before. The adapter is also written alone, OUT/adapter/, in PEFT's format for the Hugging Face export of
--init (`instructgpt export-hf --src OUT --adapter` writes both). A reward model has none: PEFT's adapter would
not hold its trained score head.

A model used for its forward pass only (a reference, a reward model) is `frozen`: with bf16 compute on CUDA its
weights are held in bf16, half the memory. With LoRA, the reference of DPO is the policy with its adapters off
(`lora.adapters_off`): no second copy at all. So is PPO's reward model when the value model starts from it
(`BaseScorer`): the value model's base weights with its adapters off and the reward model's own head.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from .checkpoint import Weights, model_tensors
from .distributed import Runtime, unwrap
from .errors import UserError
from .hf_arch import hf_family
from .lora import (
    LoRAConfig,
    adapters_off,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merged_state_dict,
    save_peft_adapter,
)
from .memory import set_activation_checkpointing
from .model import GPT, ScalarModel, last_token_index
from .train import TrainConfig

ADAPTER = "adapter"  # OUT/adapter/: adapter_config.json and adapter_model.safetensors (PEFT's names)


def prepare(model: nn.Module, cfg: TrainConfig, trainable: tuple[str, ...] = ()) -> LoRAConfig | None:
    """Make the plain model (just loaded from --init) train as the flags say, in place: with --lora-rank, LoRA
    adapters on --lora-targets and every other weight frozen but those named in `trainable` (a reward model's
    "score_head"); with --activation-checkpointing, every block recomputed in the backward pass. Call after
    `train.setup` (the adapters' initialisation draws from the seeded generator), before `prepare_model` and
    `make_optimizer`. Returns the LoRA settings, None for full fine-tuning."""
    lora = cfg.lora()
    if lora is not None:
        try:
            apply_lora(model, lora, trainable)
        except UserError as e:  # a target that names no layer of this model
            raise UserError(f"--lora-targets {' '.join(lora.targets)}: {e}") from None
    if cfg.activation_checkpointing:
        set_activation_checkpointing(model, True)
    return lora


def describe(model: nn.Module, lora: LoRAConfig | None) -> str:
    """One line on what trains: "LoRA rank 8 (alpha 16) on attn, mlp: 294,912 of 12,640,256 parameters train
    (2.33%)"."""
    params = list(unwrap(model).parameters())  # a tied parameter once
    total = sum(p.numel() for p in params)
    if lora is None:
        return f"full fine-tuning: all {total:,} parameters train"
    trained = sum(p.numel() for p in params if p.requires_grad)
    return (f"LoRA rank {lora.rank} (alpha {lora.alpha:g}) on {', '.join(lora.targets)}: {trained:,} of {total:,} "
            f"parameters train ({100 * trained / total:.2f}%)")


def published_tensors(model: nn.Module) -> dict[str, Tensor] | None:
    """The weights of a published model: merged when it has adapters (a collective under FSDP, on rank 0)."""
    return merged_state_dict(model) if lora_layers(model) else model_tensors(model)


def checkpoint_weights(lora: LoRAConfig | None) -> Weights:
    """What the stage's Checkpointer keeps: every weight for full fine-tuning; for LoRA the trained tensors in
    step checkpoints (and best/), merged weights where a model is published (OUT/, best/)."""
    if lora is None:
        return Weights()
    return Weights(gather=lora_state_dict, load=load_lora_state_dict, publish=published_tensors, trained_only=True)


def frozen(model: nn.Module, runtime: Runtime) -> nn.Module:
    """A model kept for its forward pass only (DPO's reference when it is a copy of --init): no gradients, eval
    mode, and with bf16 compute on CUDA its weights held in bf16, where autocast would compute with them anyway.
    On the CPU, and with --dtype float32, it keeps fp32."""
    model.requires_grad_(False).eval()
    if runtime.device.type == "cuda" and runtime.dtype == torch.bfloat16:
        hold_in(model, torch.bfloat16)
    return model


def hold_in(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every floating-point parameter cast to `dtype`, in place (tied ones stay tied). Buffers keep their dtype:
    RoPE's inverse frequencies stay fp32, as Hugging Face keeps them."""
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return model


def lora_record(lora: LoRAConfig | None, init: Path, init_digest: dict | None) -> dict:
    """{"lora": ...} for the exported config.json of a LoRA run ({} otherwise): the settings and the base the
    adapter goes on (--init, and the digest of its files at training time, which `export-hf --adapter` checks)."""
    if lora is None:
        return {}
    return {"lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": list(lora.targets),
                     "base": str(Path(init).resolve()), "base_files": init_digest}}


def write_adapter(model: nn.Module, lora: LoRAConfig | None, init: Path, out: Path,
                  log: Callable[[str], None] = print) -> Path | None:
    """OUT/adapter/: the trained adapter alone in PEFT's format, over the Hugging Face export of --init (its
    base_model_name_or_path). Written for a language model of a family Hugging Face holds (GPT-2 or Llama
    style); None, and nothing written, for full fine-tuning, a reward model or (`log` says why) another
    architecture. Every rank calls (under FSDP the adapters are gathered); rank 0 writes."""
    base = unwrap(model)
    if lora is None or not isinstance(base, GPT):
        return None
    try:
        hf_family(base.config)
    except UserError as e:
        log(f"note: no {ADAPTER}/ in PEFT's format ({e}); {out}/model.safetensors holds the merged model")
        return None
    return save_peft_adapter(model, lora, str(Path(init).resolve()), Path(out) / ADAPTER)


__all__ = ["ADAPTER", "checkpoint_weights", "describe", "frozen", "hold_in", "lora_record", "prepare",
           "published_tensors", "write_adapter"]


class BaseScorer(nn.Module):
    """The reward model computed by a value model that started from it and trains LoRA adapters and its own
    copy of the score head: the value model's trunk with its adapters off (the reward model's frozen base
    weights, exactly) and the reward model's head as it was, frozen. PPO with LoRA then holds one copy of the
    reward model's base weights for both, as the reference is the policy with its adapters off.

    Build it before the value model trains (its head is copied here). The value model is held by reference,
    not as a submodule: this module's parameters and state dict are the frozen head's alone."""

    def __init__(self, value_model: ScalarModel):
        super().__init__()
        if not lora_layers(value_model):
            raise ValueError("BaseScorer needs a value model with LoRA adapters (its base is the reward model)")
        self._value = (value_model,)  # a tuple: not registered, so not in parameters() or state_dict()
        self.config = value_model.config
        self.score_head = copy.deepcopy(value_model.score_head).requires_grad_(False)

    def forward(self, idx, attention_mask=None, position_ids=None, segment_ids=None) -> Tensor:
        """The reward model's values (B, T), one per position."""
        value = self._value[0]
        with adapters_off(value):
            h = value.transformer(idx, attention_mask, position_ids, segment_ids)  # (B, T, C)
        return self.score_head(h).squeeze(-1)

    def score(self, idx: Tensor, attention_mask: Tensor) -> Tensor:
        """One score (B,) per sequence, at its last real token (as `ScalarModel.score`)."""
        values = self(idx, attention_mask)
        return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)
