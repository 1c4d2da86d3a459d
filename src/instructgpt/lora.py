"""LoRA: a trainable low-rank update beside each targeted linear layer of a frozen model.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (https://arxiv.org/abs/2106.09685), §4.1:

    y = W x + b + (B A dropout(x)) * alpha / r        A (r, in), B (out, r), r << min(in, out)

A starts Kaiming-uniform and B at zero (PEFT's initialisation), so the adapted model starts as the base model.

A LoRA layer keeps the base layer's own `weight` and `bias` parameters under their names, beside `lora_A`
and `lora_B`: `transformer.h.0.attn.qkv_proj.weight` is the same key with or without adapters, so export
code that reads base weights by name keeps working, and only the adapter keys are new.

How a stage uses it:

    apply_lora(model, cfg, trainable=("score_head",))   # wrap the targets, freeze the rest
    with adapters_off(model): ...                        # the reference model of DPO / PPO, no second copy
    lora_state_dict(model) / load_lora_state_dict(...)   # what step checkpoints hold (with the optimizer)
    merge_lora(model) or merged_state_dict(model)        # the stage's model.safetensors: plain weights
    save_peft_adapter(model, cfg, base, folder)          # the adapter in PEFT's files, over an HF export

Our attention fuses q, k and v into one `qkv_proj` and the SwiGLU MLP fuses gate and up into one `fc`: each
fused projection gets ONE adapter (one A, one B over all its rows). In PEFT's format for Hugging Face's
separate q/k/v (gate/up) layers that adapter is written exactly as three (two) adapters sharing A, each with
its rows of B: the rows of B A x that belong to q are B_q A x.

Shapes: B batch, T time, C channels, r adapter rank.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import atomic_write, canonical_key, model_tensors
from .distributed import rank_and_world, unwrap
from .errors import UserError
from .model import GPT, ModelConfig

# Where each target name puts adapters: (parent module, linear layer) name pairs inside a Block (model.py).
SELF_ATTN = (("attn", "qkv_proj"), ("attn", "o_proj"))
CROSS_ATTN = (("cross_attn", "q_proj"), ("cross_attn", "kv_proj"), ("cross_attn", "o_proj"))
MLP_LAYERS = (("mlp", "fc"), ("mlp", "proj"))
TARGETS: dict[str, tuple[tuple[str, str], ...]] = {
    "attn": SELF_ATTN + CROSS_ATTN,  # every attention projection (the seq2seq decoder's cross-attention too)
    "mlp": MLP_LAYERS,
    "qkv_proj": (("attn", "qkv_proj"),),  # fused q, k, v of self-attention
    "c_attn": (("attn", "qkv_proj"),),  # GPT-2's name for it
    "o_proj": (("attn", "o_proj"), ("cross_attn", "o_proj")),
    "q_proj": (("cross_attn", "q_proj"),),  # ours: the cross-attention query (self-attention's is fused)
    "kv_proj": (("cross_attn", "kv_proj"),),
    "fc": (("mlp", "fc"),),  # MLP input: C -> I (gelu) or fused gate and up C -> 2I (swiglu)
    "c_fc": (("mlp", "fc"),),
    "gate_up_proj": (("mlp", "fc"),),
    "proj": (("mlp", "proj"),),  # MLP output I -> C
    "down_proj": (("mlp", "proj"),),
    "c_proj": (("attn", "o_proj"), ("mlp", "proj")),  # GPT-2 names both output projections c_proj
}
# Hugging Face names of layers that are one fused layer here: adapting one part alone is not expressible.
FUSED = {"k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "fc", "up_proj": "fc"}

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """Which layers get adapters and how large they are."""

    rank: int = 8  # r: width of the low-rank update; trainable numbers per layer are r (in + out)
    alpha: float = 16.0  # the update is scaled by alpha / r: a new r needs no new learning rate (paper §4.1)
    dropout: float = 0.0  # on the adapter's input only (the frozen path sees x); model.set_dropout leaves it
    targets: tuple[str, ...] = ("attn", "mlp")  # names in TARGETS: groups ("attn", "mlp") or layer names

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        checks = [
            (self.rank > 0, f"lora rank must be positive, got {self.rank}"),
            (self.alpha > 0, f"lora alpha must be positive, got {self.alpha}"),
            (0.0 <= self.dropout < 1.0, f"lora dropout must be in [0, 1), got {self.dropout}"),
            (len(self.targets) > 0, "lora targets must name at least one layer"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid LoRA config: {message}")
        for name in self.targets:
            if name in FUSED:
                raise UserError(f"invalid LoRA config: target {name!r} is part of the fused {FUSED[name]!r} "
                                f"projection here; target {FUSED[name]!r} (one adapter over all of it)")
            if name not in TARGETS:
                raise UserError(f"invalid LoRA config: unknown target {name!r}; known: {', '.join(TARGETS)}")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update: x (..., in) -> (..., out).

    Holds the base layer's own weight (out, in) and bias (out,) parameters, frozen, under the same names;
    `enabled = False` computes the base layer alone, bit for bit."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        for p in (self.weight, self.bias):
            if p is not None:
                p.requires_grad_(False)
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear's default)
        self.rank, self.scale = rank, alpha / rank
        # A float, not an nn.Dropout: model.set_dropout sets the model's dropout modules, not this one.
        self.dropout = dropout
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if not self.enabled:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout else x
        return y + F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scale  # (..., r) -> (..., out)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + B A alpha / r (out, in) in the base weight's dtype, summed in fp32."""
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
        return (self.weight.float() + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"rank={self.rank}, scale={self.scale:g}, dropout={self.dropout}, enabled={self.enabled}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRA layer by its (canonical) module name, in module order."""
    return {canonical_key(name): m for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)}


def _need_layers(model: nn.Module, what: str) -> dict[str, LoRALinear]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{what}: the model has no LoRA adapters (call apply_lora first)")
    return layers


def _full(t: Tensor) -> Tensor:
    """A full CPU copy of a tensor, or of an FSDP DTensor (then a collective: every rank calls). A copy even
    on the CPU, where .cpu() would return the parameter itself: a snapshot must not change with training."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu", copy=True).contiguous()


def apply_lora(model: nn.Module, cfg: LoRAConfig, trainable: tuple[str, ...] = ()) -> list[str]:
    """Replace the target linear layers with LoRA layers, in place, and freeze every other parameter except
    those under the module or parameter names in `trainable` (a reward or value model's "score_head").

    Call it on the plain model, before `distributed.prepare_model` (sharding, compiling, DDP) and before
    building the optimizer. Returns the names of the wrapped layers. Raises UserError when a target or a
    `trainable` name matches nothing in this model, ValueError when the model already has adapters."""
    model = unwrap(model)
    if lora_layers(model):
        raise ValueError("apply_lora: the model already has LoRA adapters")
    sites: list[tuple[str, nn.Module, str]] = []  # (full name, parent module, attribute)
    matched: set[str] = set()
    for parent_name, parent in model.named_modules():
        pair_parent = parent_name.rsplit(".", 1)[-1]
        for leaf, child in parent.named_children():
            hits = {t for t in cfg.targets if (pair_parent, leaf) in TARGETS[t]}
            if hits and isinstance(child, nn.Linear):
                sites.append((f"{parent_name}.{leaf}", parent, leaf))
                matched |= hits
    unmatched = [t for t in cfg.targets if t not in matched]
    if unmatched:
        hint = (" (self-attention's q, k and v are one fused projection here: target 'qkv_proj')"
                if "q_proj" in unmatched else "")
        raise UserError(f"LoRA targets {', '.join(map(repr, unmatched))} match no layer of this "
                        f"{type(model).__name__}{hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, parent, leaf in sites:
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), cfg.rank, cfg.alpha, cfg.dropout))
    params = list(model.named_parameters(remove_duplicate=False))  # a tied weight under each of its names
    for name in trainable:
        kept = [p for key, p in params if key == name or key.startswith(name + ".")]
        if not kept:
            raise UserError(f"cannot keep {name!r} trainable: no such module or parameter in "
                            f"{type(model).__name__}")
        for p in kept:
            p.requires_grad_(True)
    return [canonical_key(name) for name, _, _ in sites]


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base weights alone, exactly: the frozen reference policy
    of DPO and PPO is the policy with its adapters off. Each layer's switch is restored afterwards."""
    layers = list(_need_layers(model, "adapters_off").values())
    before = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, enabled in zip(layers, before):
            layer.enabled = enabled


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return model.get_submodule(parent), leaf


def merge_lora(model: nn.Module) -> nn.Module:
    """Turn every LoRA layer into a plain nn.Linear holding W + B A alpha / r, in place; returns the model,
    whose state dict then has the keys of a model that never had adapters. For an unsharded model; to keep
    training afterwards, or under FSDP, save `merged_state_dict(model)` instead."""
    model = unwrap(model)
    for name, layer in _need_layers(model, "merge_lora").items():
        parent, leaf = _parent(model, name)
        with torch.device("meta"):  # no memory for the weights about to be replaced
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        linear.weight = nn.Parameter(layer.merged_weight(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = layer.bias
        setattr(parent, leaf, linear)
    return model


def merged_state_dict(model: nn.Module) -> dict[str, Tensor] | None:
    """The weights `merge_lora` would leave, without changing the model: full tensors under canonical keys, a
    tied weight once, as `checkpoint.save_model(model, folder, tensors=...)` takes them. Like
    `checkpoint.model_tensors`, a collective under FSDP (every rank calls) with the result on rank 0 only."""
    layers = _need_layers(model, "merged_state_dict")
    tensors = model_tensors(model)
    merged = {}
    for name, layer in layers.items():
        W, A, B = (_full(t) for t in (layer.weight, layer.lora_A, layer.lora_B))
        merged[name] = (W.float() + (B.float() @ A.float()) * layer.scale).to(W.dtype)  # as merged_weight
    if tensors is None:
        return None
    for name, weight in merged.items():
        del tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"]
        tensors[f"{name}.weight"] = weight
    return tensors


# ----------------------------------------------------------------------------------------------------
# Adapter-only state: what step checkpoints and resume hold


def _trained(model: nn.Module) -> dict[str, nn.Parameter]:
    _need_layers(model, "the adapter state")
    return {canonical_key(name): p for name, p in unwrap(model).named_parameters() if p.requires_grad}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The tensors that train: every adapter's lora_A and lora_B and the parameters apply_lora kept
    trainable (a score head), full CPU copies under canonical names. A collective under FSDP."""
    return {name: _full(p) for name, p in _trained(model).items()}


def load_lora_state_dict(model: nn.Module, tensors: dict[str, Tensor], source: str = "adapter state") -> None:
    """Load what `lora_state_dict` returned into a model prepared with the same `apply_lora`, strictly:
    UserError naming `source` and every missing, unexpected or misshapen key. A sharded parameter keeps
    its own shard."""
    own = _trained(model)
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    missing, unexpected = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or unexpected:
        parts = [f"{what}: {', '.join(keys)}" for what, keys in (("missing key(s)", missing),
                                                                ("unexpected key(s)", unexpected)) if keys]
        raise UserError(f"{source}: adapters do not match the model: {'; '.join(parts)}")
    for key, p in own.items():
        if tuple(tensors[key].shape) != tuple(p.shape):
            raise UserError(f"{source}: {key} has shape {tuple(tensors[key].shape)}, "
                            f"the model expects {tuple(p.shape)}")
    with torch.no_grad():
        for key, p in own.items():
            value = tensors[key].to(device=p.device, dtype=p.dtype)
            if hasattr(p, "full_tensor"):
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None)
            p.copy_(value)


# ----------------------------------------------------------------------------------------------------
# PEFT's adapter format, over the Hugging Face export of the base model (hf_export.py)


def _hf_sites(name: str, cfg: ModelConfig) -> list[tuple[str, slice]]:
    """Our LoRA layer `transformer.h.{i}.{parent}.{leaf}` -> the HF modules (names as hf_tensors exports
    the base model) and the rows of our B that each takes."""
    _, _, i, parent, leaf = name.split(".")
    if cfg.position == "learned":  # GPT-2: fused c_attn as ours, one module each
        hf = {("attn", "qkv_proj"): "attn.c_attn", ("attn", "o_proj"): "attn.c_proj",
              ("mlp", "fc"): "mlp.c_fc", ("mlp", "proj"): "mlp.c_proj"}[parent, leaf]
        return [(f"transformer.h.{i}.{hf}", slice(None))]
    prefix = f"model.layers.{i}."
    H, K, D, I = cfg.n_head, cfg.kv_heads, cfg.head_dim, cfg.hidden_dim
    if (parent, leaf) == ("attn", "qkv_proj"):  # rows [q (H*D), k (K*D), v (K*D)]
        return [(prefix + "self_attn.q_proj", slice(0, H * D)),
                (prefix + "self_attn.k_proj", slice(H * D, (H + K) * D)),
                (prefix + "self_attn.v_proj", slice((H + K) * D, (H + 2 * K) * D))]
    if (parent, leaf) == ("mlp", "fc"):  # rows [gate (I), up (I)]
        return [(prefix + "mlp.gate_proj", slice(0, I)), (prefix + "mlp.up_proj", slice(I, 2 * I))]
    hf = {("attn", "o_proj"): "self_attn.o_proj", ("mlp", "proj"): "mlp.down_proj"}[parent, leaf]
    return [(prefix + hf, slice(None))]


def peft_adapter(model: nn.Module, cfg: LoRAConfig, base_model_name_or_path: str) -> tuple[dict, dict[str, Tensor]]:
    """(adapter_config.json's content, adapter_model.safetensors' tensors) as PEFT writes a LoRA adapter of
    a causal language model, for the HF model `hf_export.export_hf` makes of the base. A fused adapter is split
    exactly: the same A for each HF layer, B cut by rows. `peft.PeftModel.from_pretrained(hf_model,
    folder)` then computes what our model computes with its adapters on. A collective under FSDP."""
    model = unwrap(model)
    if not isinstance(model, GPT):
        raise UserError(f"PEFT export supports language models (GPT), not {type(model).__name__}: "
                        "merge the adapters into the model and export that instead")
    layers = _need_layers(model, "peft_adapter")
    others = sorted(k for k in _trained(model) if not k.endswith((".lora_A", ".lora_B")))
    if others:
        raise UserError(f"PEFT's adapter would not hold the base parameters trained with it ({', '.join(others)}): "
                        "merge the adapters into the model and export that instead")
    mc = model.config
    tensors: dict[str, Tensor] = {}
    modules: set[str] = set()
    for name, layer in layers.items():
        if layer.rank != cfg.rank or not math.isclose(layer.scale, cfg.alpha / cfg.rank):
            raise ValueError(f"peft_adapter: {name} has rank {layer.rank} and scale {layer.scale:g}, "
                             f"the LoRA config says rank {cfg.rank}, alpha {cfg.alpha}")
        A, B = _full(layer.lora_A).float(), _full(layer.lora_B).float()  # (r, in), (out, r)
        for hf_name, rows in _hf_sites(name, mc):
            key = f"base_model.model.{hf_name}"
            # A clone each: safetensors refuses tensors that share memory.
            tensors[f"{key}.lora_A.weight"] = A.clone()
            tensors[f"{key}.lora_B.weight"] = B[rows].clone()
            # The layer's own name, but "attn.c_proj" for GPT-2: a bare "c_proj" would also match mlp.c_proj.
            modules.add(".".join(hf_name.split(".")[-2:]) if hf_name.endswith("c_proj") else hf_name.split(".")[-1])
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model_name_or_path),
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(modules),
        "bias": "none", "fan_in_fan_out": mc.position == "learned",  # GPT-2's Conv1D stores (in, out)
        "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
        "alpha_pattern": {}, "revision": None,
    }
    return config, tensors


def save_peft_adapter(model: nn.Module, cfg: LoRAConfig, base_model_name_or_path: str, folder: str | Path) -> Path:
    """Write folder/adapter_config.json and folder/adapter_model.safetensors (each atomically). Under FSDP
    every rank calls (the adapters are gathered) and rank 0 writes."""
    from safetensors.torch import save_file

    config, tensors = peft_adapter(model, cfg, base_model_name_or_path)
    folder = Path(folder)
    if rank_and_world()[0] != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / ADAPTER_WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(folder / ADAPTER_CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
    return folder


__all__ = [
    "LoRAConfig", "LoRALinear", "TARGETS", "adapters_off", "apply_lora", "load_lora_state_dict", "lora_layers",
    "lora_state_dict", "merge_lora", "merged_state_dict", "peft_adapter", "save_peft_adapter",
]
