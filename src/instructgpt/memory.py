"""Activation checkpointing: keep only each transformer block's input in the forward pass and recompute the
block during the backward pass (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
https://arxiv.org/abs/1604.06174).

Activations kept for the backward pass fall from every intermediate tensor of every block (attention
inputs, q/k/v, the 4C-wide MLP hidden state, norms: tens of B T C per block) to one B T C per block plus
one block's intermediates during its recomputation, for about one more forward pass of compute.

The block itself is not wrapped in another module: its `forward` is replaced on the instance, so parameter
names, state dict keys, the module's class (FSDP shards blocks by class) and hooks stay as they were.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .distributed import unwrap
from .model import Block


def _checkpointed_forward(block: Block, *args, **kwargs):
    forward = type(block).forward  # the class's own forward (an FSDP subclass keeps Block's)
    # Only when a backward pass will follow: in eval or under no_grad there is nothing to save or recompute.
    if block.training and torch.is_grad_enabled():
        # Non-reentrant: keyword arguments, inputs that need no grad, and the RNG state restored for the
        # recomputation (dropout masks are the same both times).
        return checkpoint(forward, block, *args, use_reentrant=False, **kwargs)
    return forward(block, *args, **kwargs)


def set_activation_checkpointing(model: nn.Module, on: bool) -> int:
    """Checkpoint every transformer block of `model` (GPT, ScalarModel, Seq2Seq's encoder and decoder) when
    `on`, or undo it; returns the number of blocks. Takes effect in training mode with gradients enabled;
    eval and no_grad forwards are unchanged. Call before torch.compile, before or after FSDP sharding."""
    blocks = [m for m in unwrap(model).modules() if isinstance(m, Block)]
    if not blocks:
        raise ValueError(f"set_activation_checkpointing: no transformer block in {type(model).__name__}")
    for block in blocks:
        if on:
            # A bound method in the instance's __dict__: nn.Module.__call__ finds it before the class's, and
            # copy.deepcopy rebinds it to the copy.
            block.forward = types.MethodType(_checkpointed_forward, block)
        else:
            block.__dict__.pop("forward", None)
    return len(blocks)


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether `set_activation_checkpointing(model, True)` is in effect."""
    return any("forward" in m.__dict__ for m in unwrap(model).modules() if isinstance(m, Block))


__all__ = ["activation_checkpointing", "set_activation_checkpointing"]
