"""Where and how a process runs: device, dtype, seeds, threads, and the process group under torchrun.

Every stage calls `init_runtime` (through `train.setup`) once, then `prepare_model` for the module to call in
its loop (DDP, FSDP2 or torch.compile); `rank_rows` gives each rank its slice of a global batch, so N
processes train on exactly what one process with N times the batch would. Nothing here knows a stage.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from .errors import UserError


@dataclass
class Runtime:
    """Where and how this process trains."""

    device: torch.device  # the device of the model and batches
    dtype: torch.dtype  # compute dtype: bfloat16 means bf16 autocast over fp32 weights
    autocast: Callable[[], contextlib.AbstractContextManager]  # a fresh context per forward pass
    rank: int = 0  # this process among world_size (torchrun's RANK)
    world_size: int = 1  # processes training together (torchrun's WORLD_SIZE)
    is_main: bool = True  # rank 0: the one that writes files and prints
    local_rank: int = 0  # this process among those of its machine (torchrun's LOCAL_RANK)
    compile: bool = False  # whether stages should torch.compile their models
    fsdp: bool = False  # models are sharded with FSDP2 (fully_shard) instead of wrapped in DDP
    threads: int = field(default_factory=torch.get_num_threads)  # CPU threads of torch's intra-op pool

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_threads() -> int:
    """CPU cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; checks that a requested CUDA device exists."""
    name = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    return dev


def launch_rank() -> int:
    """This process's rank as torchrun set it (RANK), 0 otherwise; known before the process group exists."""
    return int(os.environ.get("RANK", 0))


def init_runtime(device: str = "auto", dtype: str = "auto", seed: int = 1337, compile: bool | None = None,
                 fsdp: bool = False, timeout_minutes: float = 30.0) -> Runtime:
    """Pick the device and dtype, seed every generator, size the CPU thread pool, enable TF32 on CUDA,
    and join the process group when started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK).

    `timeout_minutes` bounds every collective: when a rank dies without an elastic agent to stop the job
    (srun, mpirun) or hangs, the others fail after this long instead of waiting for NCCL's or gloo's own
    default, which differs by backend and version."""
    rank = launch_rank()
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))

    device = resolve_device(device)
    if device.type == "cuda":
        if world_size > 1 and device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                             timeout=datetime.timedelta(minutes=timeout_minutes), **kwargs)
        atexit.register(_leave_process_group)

    dtype_name = dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    compute_dtype = getattr(torch, dtype_name)
    if compute_dtype == torch.bfloat16:
        def autocast() -> contextlib.AbstractContextManager:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    # One intra-op thread per core this process owns, shared between the ranks of a CPU machine.
    threads = max(1, default_threads() // (world_size if device.type == "cpu" else 1))
    torch.set_num_threads(threads)
    # Denormal floats (tiny gradients and Adam moments late in training) are 10-100x slower on x86 CPUs;
    # flushing them to zero changes nothing that matters and keeps steps from slowing down as loss falls.
    torch.set_flush_denormal(True)
    seed_everything(seed)
    compile_ = device.type == "cuda" if compile is None else compile
    return Runtime(device=device, dtype=compute_dtype, autocast=autocast, rank=rank, world_size=world_size,
                   is_main=rank == 0, local_rank=local_rank, compile=compile_, threads=threads,
                   fsdp=fsdp and world_size > 1)



def _leave_process_group() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def finish_distributed() -> None:
    """After a command that finished on every rank: wait until every rank's collectives are done, then
    leave the process group, before the interpreter starts tearing down. (The exit handler only destroys
    it, without the barrier, since after an error the other ranks may never reach one.) A gloo rank that
    left it to interpreter shutdown aborted now and then ("terminate called without an active exception")."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def prepare_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """The module to call in the loop: sharded in place with FSDP2 (runtime.fsdp), compiled when
    runtime.compile, wrapped in DDP when distributed without FSDP. Keep the plain `model` for the
    optimizer and the checkpoints (they unwrap the wrappers: canonical keys), and build the optimizer
    AFTER this call: sharding replaces the parameters."""
    model = model.to(runtime.device)
    if runtime.fsdp:
        shard_model(model, runtime)
    if runtime.compile:
        model = torch.compile(model)
    if runtime.distributed and not runtime.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    return model


def shard_model(model: nn.Module, runtime: Runtime) -> nn.Module:
    """FSDP2 in place: each Transformer block is one shard group (its weights are gathered just before it
    runs and freed after), then the root (embeddings, final norm, heads). Every parameter becomes a
    DTensor sharded on dim 0 over all ranks; the module keeps its class (an FSDP subclass of it). A frozen
    model (a reference) can be sharded too: its forward is then a collective that every rank must call.
    With bf16 on CUDA, weights are gathered in bf16 (`mixed_precision`)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    policy = mixed_precision(runtime)
    options = {"mesh": mesh} if policy is None else {"mesh": mesh, "mp_policy": policy}
    for module in model.modules():
        if type(module).__name__ == "Block":
            fully_shard(module, **options)
    fully_shard(model, **options)
    return model


def mixed_precision(runtime: Runtime):
    """FSDP2's MixedPrecisionPolicy for bf16 compute on CUDA; None otherwise (--dtype float32, or the CPU: the
    weights are gathered and used as they are stored, in fp32). Each block's weights are all-gathered in bf16
    and computed with in bf16 (half the communication, and half the memory of a gathered block), so the
    residual stream is bf16 too, as in torchtitan; gradients are reduce-scattered in fp32 (a sum over ranks of
    bf16 terms loses bits), and the sharded master weights and the optimizer's moments stay fp32. Autocast
    still computes in fp32 what it always does (softmax, norms, and the losses, which upcast: invariant 13)."""
    if runtime.device.type != "cuda" or runtime.dtype != torch.bfloat16:
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in unwrap(model).parameters())


def rank_rows(batch: Any, runtime: Runtime) -> Any:
    """This rank's share of a global batch: rows [rank * n, (rank + 1) * n) with n = rows / world_size,
    of a list, a tensor, or a tuple or dict of tensors (all with the same number of rows). Every rank draws
    the same global batch from the same generator and keeps its slice, so N processes with batch B train
    on exactly what one process with batch N x B does."""
    if runtime.world_size == 1:
        return batch
    if isinstance(batch, dict):
        return {k: rank_rows(v, runtime) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(rank_rows(v, runtime) for v in batch)
    n = len(batch) // runtime.world_size
    if n * runtime.world_size != len(batch):
        raise ValueError(f"a global batch of {len(batch)} rows does not split over {runtime.world_size} ranks")
    return batch[runtime.rank * n:(runtime.rank + 1) * n]


def all_ranks_finished(runtime: Runtime) -> Callable[[Tensor], bool] | None:
    """For `generate(..., all_finished=...)` under torchrun: generation stops when every row of every rank
    has ended (invariant 12), so sharded (FSDP) forwards stay collective and no rank waits on another."""
    if not runtime.distributed:
        return None

    def finished_everywhere(finished: Tensor) -> bool:
        flag = finished.all().to(torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    return finished_everywhere


def all_reduce_sums(sums: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Per-rank sums (of metrics) added over all ranks, in one all-reduce; unchanged in one process."""
    if not runtime.distributed or not sums:
        return dict(sums)
    t = torch.tensor(list(sums.values()), dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(t)
    return dict(zip(sums, t.tolist()))



def all_reduce(x: Tensor, runtime: Runtime | None, op: str = "sum") -> Tensor:
    """x summed over the ranks under torchrun (op "max": their largest); x itself in one process."""
    if runtime is None or not runtime.distributed:
        return x
    x = x.clone()
    reduce_op = torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM
    torch.distributed.all_reduce(x, op=reduce_op)
    return x


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) outside torchrun."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (nothing in one process)."""
    if rank_and_world()[1] > 1:
        torch.distributed.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return model
