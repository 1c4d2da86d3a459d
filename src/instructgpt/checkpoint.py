"""Weights on disk: `model.safetensors` + `config.json`, canonical keys, strict loading.

Nothing here unpickles: weights are safetensors, the config is JSON.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import UserError
from .model import ModelConfig, build_model

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def canonical_key(key: str) -> str:
    """`module._orig_mod.transformer.h.0...` -> `transformer.h.0...`."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model


def model_kind(model: nn.Module) -> str:
    from .model import GPT, ScalarModel, Seq2Seq

    model = unwrap(model)
    for cls, kind in ((GPT, "gpt"), (ScalarModel, "scalar"), (Seq2Seq, "seq2seq")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"not an instructgpt model: {type(model).__name__}")


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical keys; a tied unembedding is stored once (under the embedding's name)."""
    model = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue  # a tied parameter: loading re-ties it
        seen.add(ptr)
        out[canonical_key(key)] = tensor.detach().contiguous().cpu()
    return out


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, folder: str | Path, extra: dict | None = None) -> None:
    """Write `folder/model.safetensors` and `folder/config.json` (each file atomically)."""
    folder = Path(folder)
    model = unwrap(model)
    config = {"kind": model_kind(model), "model": model.config.to_dict(), **(extra or {})}
    tensors = state_dict_for_saving(model)
    _atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG} (expected a checkpoint folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(path.read_text())
        ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a valid instructgpt model config ({e})") from None
    return config


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with a message naming every missing and unexpected key."""
    model = unwrap(model)
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    expected = set(state_dict_for_saving(model))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {', '.join(unexpected)}")
        raise UserError(f"{source}: weights do not match the model: {'; '.join(parts)}")
    own = model.state_dict()
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(own[key].shape)}")
    # strict=False only because a tied unembedding is stored once; every key was checked above.
    model.load_state_dict(tensors, strict=False)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read safetensors weights ({e})") from None


def load_model(folder: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model `folder/config.json` describes and load its weights strictly.

    `kind` ("gpt", "scalar", "seq2seq") checks what the caller expects; a "scalar" request on a "gpt"
    checkpoint starts a reward model from a language model: the unembedding is dropped and the scalar
    head is freshly initialised (the paper's RM starts from the SFT model)."""
    folder = Path(folder)
    config = read_config(folder)
    stored = config["kind"]
    cfg = ModelConfig.from_dict(config["model"])
    tensors = load_tensors(folder / WEIGHTS)
    if kind is None or kind == stored:
        model = build_model(cfg, scalar=stored == "scalar")
        load_state_dict(model, tensors, str(folder / WEIGHTS))
    elif kind == "scalar" and stored == "gpt":
        model = build_model(cfg, scalar=True)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
        tensors.update({k: v for k, v in model.state_dict().items() if k.startswith("score_head.")})
        load_state_dict(model, tensors, str(folder / WEIGHTS))
    else:
        raise UserError(f"{folder}: holds a {stored!r} model, expected {kind!r}")
    return model.to(device)
