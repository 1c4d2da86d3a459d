"""The state of a run beside its weights, for exact resume: every generator's state (python, numpy, torch, CUDA)
and the optimizer's, as full tensors whatever the sharding, so that a checkpoint is the same whatever wrote it
(one process, DDP, or FSDP over any number of ranks) and loads into any of them (`checkpoint.Checkpointer`).

Only tensors, ints, floats and lists: everything here loads with `torch.load(weights_only=True)` (invariant 10).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import Tensor

from .distributed import rank_and_world


def rng_state() -> dict:
    """Every global generator's state, as tensors, ints and lists only (loadable with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": list(random.getstate()[1]),  # (version, 625 ints, gauss); the ints are the state
        "python_gauss": random.getstate()[2],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version = random.getstate()[0]
    random.setstate((version, tuple(state["python"]), state["python_gauss"]))
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
        "has_gauss": state["numpy_has_gauss"],
        "gauss": state["numpy_gauss"],
    })
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def full_copy(t: Tensor) -> Tensor:
    """A full CPU copy of a tensor or a DTensor (collective for a DTensor)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` laid out as `like` (a DTensor: this rank's shard, cut locally; no communication)."""
    if not hasattr(like, "full_tensor"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """optimizer.state_dict() with full tensors, on rank 0 (None elsewhere); a collective under FSDP."""
    state = optimizer.state_dict()
    if not any(hasattr(v, "full_tensor") for s in state["state"].values() for v in s.values()):
        return state if rank_and_world()[0] == 0 else None
    full = {i: {k: full_copy(v) if isinstance(v, Tensor) else v for k, v in sorted(s.items())}
            for i, s in sorted(state["state"].items())}
    return {**state, "state": full} if rank_and_world()[0] == 0 else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (`optimizer_state`); a sharded parameter's moments keep only its shard."""
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
    for i, s in state["state"].items():
        p = params[int(i)]
        for k, v in s.items():
            if isinstance(v, Tensor) and hasattr(p, "full_tensor") and tuple(v.shape) == tuple(p.shape):
                s[k] = shard_like(v, p)
    optimizer.load_state_dict(state)
