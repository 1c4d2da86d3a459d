"""The small training library every stage composes: set-up, optimizer, schedule, one optimizer step,
atomic checkpoints with exact resume, metrics and a progress bar.

A stage reads top to bottom with these pieces (see `pretrain.py`):

    runtime = setup(cfg)
    model = GPT(model_cfg).to(runtime.device)
    optimizer = make_optimizer(model, cfg, runtime)
    ckpt = Checkpointer(out, cfg.keep_last)
    state = ckpt.load(ckpt.latest(), {"model": model}, {"model": optimizer}) if resuming else {...}
    for step in range(state["step"], cfg.max_steps):
        stats = train_step(model, optimizer, micro_batches, loss_sum_fn, n_targets_fn, cfg, runtime, step)
        ...
    ckpt.export(model)

No trainer class: the loop stays in the stage. Losses are normalised by the number of target tokens over
all micro-batches and ranks of a step (invariant 6), so gradient accumulation and data parallelism give
the same update as one big batch. Checkpoints are written to a temporary folder and renamed (invariant 9);
everything but the weights is loaded with `torch.load(weights_only=True)` or JSON (invariant 10).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from . import checkpoint
from .errors import UserError

# ----------------------------------------------------------------------------------------------------
# Configuration and runtime


@dataclass
class TrainConfig:
    """Optimisation, schedule, device and bookkeeping of one training stage."""

    batch_size: int = 16  # sequences per micro-batch (per rank)
    grad_accum: int = 1  # micro-batches per optimizer step (each step sees batch_size * grad_accum * ranks)
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr: float | None = None  # floor of the cosine decay, reached at max_steps; None means lr / 10
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr over this many steps
    max_steps: int = 1000  # optimizer steps in the whole run (the cosine ends here)
    weight_decay: float = 0.1  # AdamW decoupled decay, only on matrices (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.99 suits small models and small batches)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    seed: int = 1337  # seeds python, numpy and torch (model init, dropout, data order)
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or auto = cuda if available else cpu
    dtype: str = "auto"  # "float32" or "bfloat16" (autocast); auto = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off on CPU
    eval_interval: int = 250  # evaluate every this many steps (and at the end)
    log_interval: int = 10  # log metrics (and sync the device for the loss) every this many steps
    checkpoint_interval: int = 500  # save a resumable checkpoint every this many steps (and at the end)
    keep_last: int = 2  # keep this many step checkpoints; older ones are deleted (0 keeps all)
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer state over ranks (FSDP2), not DDP

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.min_lr is None or 0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr], got {self.min_lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}"),
            (self.eval_interval >= 1, f"--eval-interval must be at least 1, got {self.eval_interval}"),
            (self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}"),
            (self.checkpoint_interval >= 1,
             f"--checkpoint-interval must be at least 1, got {self.checkpoint_interval}"),
            (self.keep_last >= 0, f"--keep-last must be >= 0, got {self.keep_last}"),
            (self.dtype in ("auto", "float32", "bfloat16"),
             f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


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


def setup(cfg: TrainConfig) -> Runtime:
    """Pick the device and dtype, seed every generator, size the CPU thread pool, enable TF32 on CUDA,
    and join the process group when started by torchrun (RANK / WORLD_SIZE / LOCAL_RANK)."""
    cfg.validate()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))

    device = resolve_device(cfg.device)
    if device.type == "cuda":
        if world_size > 1 and device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
        atexit.register(_leave_process_group)

    dtype_name = cfg.dtype
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    dtype = getattr(torch, dtype_name)
    if dtype == torch.bfloat16:
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
    seed_everything(cfg.seed)
    compile_ = device.type == "cuda" if cfg.compile is None else cfg.compile
    return Runtime(device=device, dtype=dtype, autocast=autocast, rank=rank, world_size=world_size,
                   is_main=rank == 0, local_rank=local_rank, compile=compile_, threads=threads,
                   fsdp=cfg.fsdp and world_size > 1)


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
    model (a reference) can be sharded too: its forward is then a collective that every rank must call."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
    for module in model.modules():
        if type(module).__name__ == "Block":
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in checkpoint.unwrap(model).parameters())


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


def maybe_compile(model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> nn.Module:
    """The same as `prepare_model` (cfg is already folded into runtime.compile)."""
    return prepare_model(model, runtime)


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases (1-D) and embedding tables are not decayed.
    A tied parameter (embedding = unembedding) appears once, without decay since it is an embedding."""
    model = checkpoint.unwrap(model)
    if runtime.fsdp and not is_sharded(model):
        raise RuntimeError("under FSDP, build the optimizer after prepare_model (sharding replaces the parameters)")
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or id(p) in embeddings else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel for the whole update, on CUDA and (since torch 2.4) on the CPU, where it measured
    # 4x faster than the multi-tensor loop for a 0.8M-parameter model (0.6 vs 2.3 ms per step).
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=(cfg.beta1, cfg.beta2), fused=True)


def examples_per_step(cfg: TrainConfig, runtime: Runtime) -> int:
    """Examples in one optimizer step: batch_size x grad_accum on every rank (each its slice, `rank_rows`)."""
    return cfg.batch_size * cfg.grad_accum * runtime.world_size


def epoch_schedule(n_examples: int, epochs: float, max_steps: int | None, cfg: TrainConfig,
                   runtime: Runtime) -> tuple[int, int]:
    """(steps per epoch, total steps) for `epochs` passes over n_examples, or max_steps when given; sets
    cfg.max_steps to the total (the learning-rate schedule's length)."""
    steps_per_epoch = math.ceil(n_examples / examples_per_step(cfg, runtime))
    cfg.max_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    return steps_per_epoch, cfg.max_steps


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps (step 0 gets lr / warmup_steps), then a cosine from lr down to
    min_lr at max_steps, min_lr after."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.final_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.final_lr + coeff * (cfg.lr - cfg.final_lr)


# ----------------------------------------------------------------------------------------------------
# Loss and one optimizer step


def token_cross_entropy(logits: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """SUM over non-ignored targets of -log p(target): logits (..., V), targets (...). Computed in fp32
    (log-softmax in fp32 even under bf16 autocast, invariant 13); divide by the step's target count."""
    V = logits.size(-1)
    return nn.functional.cross_entropy(
        logits.float().reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


class EmptyTargetsError(UserError):
    """A step whose micro-batches hold no target token: nothing to learn from, and a division by zero."""


class DivergedError(RuntimeError):
    """The loss or the gradient norm is NaN or infinite."""


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: list,
    loss_sum_fn: Callable[[nn.Module, Any], Tensor],
    n_targets_fn: Callable[[Any], int],
    cfg: TrainConfig,
    runtime: Runtime,
    step: int,
    *,
    sync: bool = True,
) -> dict:
    """One optimizer step over `micro_batches` (gradient accumulation), token-weighted.

    `loss_sum_fn(model, mb)` returns the SUM of the per-token losses of a micro-batch and
    `n_targets_fn(mb)` its number of target tokens. Each micro-batch contributes loss_sum / N where N
    counts the targets of every micro-batch on every rank, so the update is the mean over all tokens of
    the step however they are split (DDP averages gradients over ranks, hence the factor world_size).

    Returns {"loss": mean per-token loss, "grad_norm", "lr", "tokens"}. With sync=False, "loss" and
    "grad_norm" stay 0-d tensors on the device (no host sync): call float() at log intervals only.
    """
    lr = lr_at(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # 1. count the targets of the whole step, over every rank, before any backward
    n_local = sum(int(n_targets_fn(mb)) for mb in micro_batches)
    n_total = n_local
    if runtime.distributed:
        t = torch.tensor(n_local, dtype=torch.long, device=runtime.device)
        torch.distributed.all_reduce(t)
        n_total = int(t)
    if n_total == 0:
        raise EmptyTargetsError(
            f"step {step}: no target tokens in any of the {len(micro_batches)} micro-batch(es) "
            "(every label is masked); check the loss mask of the data"
        )
    scale = runtime.world_size / n_total

    # 2. forward and backward of each micro-batch; DDP all-reduces (FSDP reduce-scatters) gradients on the
    #    last one only
    loss_sum = torch.zeros((), device=runtime.device)
    last = len(micro_batches) - 1
    no_sync = getattr(model, "no_sync", None)  # DDP
    gradient_sync = getattr(checkpoint.unwrap(model), "set_requires_gradient_sync", None)  # FSDP2
    for i, mb in enumerate(micro_batches):
        if runtime.distributed and gradient_sync is not None:
            gradient_sync(i == last)
        ctx = no_sync() if (runtime.distributed and no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx:
            with runtime.autocast():
                mb_loss = loss_sum_fn(model, mb)
            (mb_loss * scale).backward()
        loss_sum += mb_loss.detach().float()

    # 3. clip, step, clear
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    loss = loss_sum / max(1, n_local)
    if runtime.distributed and sync:
        both = torch.stack([loss_sum, torch.tensor(float(n_local), device=runtime.device)])
        torch.distributed.all_reduce(both)
        loss = both[0] / both[1].clamp(min=1)
    stats = {"loss": loss, "grad_norm": grad_norm.detach(), "lr": lr, "tokens": n_total}
    if sync:
        stats["loss"], stats["grad_norm"] = float(loss), float(grad_norm)
        if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])):
            raise DivergedError(f"step {step}: loss {stats['loss']}, grad norm {stats['grad_norm']}: "
                                "training diverged (lower --lr, or check the data)")
    return stats


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


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


def _rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _rank()[1] > 1:
        torch.distributed.barrier()


# Under FSDP every parameter (and Adam moment) is a DTensor holding 1/world_size of it. Checkpoints and the
# exported model hold full tensors in the same files as without FSDP: every rank takes part in gathering
# each tensor (a collective, in the same order everywhere) and rank 0 writes. So a checkpoint is the same
# whatever wrote it (1 process, DDP or FSDP, any world size) and the exported model loads anywhere. Rank 0
# holds one full copy in CPU memory: enough for the models this project trains; torch.distributed.checkpoint
# (sharded files) is the way past that.


def _full(t: Tensor) -> Tensor:
    """A full CPU copy of a tensor or a DTensor (collective for a DTensor)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().cpu()


def _shard_like(full: Tensor, like: Tensor) -> Tensor:
    """`full` laid out as `like` (a DTensor: this rank's shard, cut locally; no communication)."""
    if not hasattr(like, "full_tensor"):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def model_tensors(model: nn.Module) -> dict[str, Tensor] | None:
    """Full weights with canonical keys, a tied parameter once (as `checkpoint.save_model` stores them), on
    rank 0; None on the other ranks. A collective when the model is sharded: call on every rank."""
    model = checkpoint.unwrap(model)
    if not is_sharded(model):
        return checkpoint.state_dict_for_saving(model) if _rank()[0] == 0 else None
    params = dict(model.named_parameters(remove_duplicate=False))
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        param = params.get(key)
        if param is not None:
            if id(param) in seen:
                continue  # a tied parameter: loading re-ties it
            seen.add(id(param))
        out[checkpoint.canonical_key(key)] = _full(tensor)
    return out if _rank()[0] == 0 else None


def write_model(model: nn.Module, tensors: dict[str, Tensor], folder: Path, extra: dict | None = None) -> None:
    """`checkpoint.save_model` with weights already gathered (`model_tensors`); each file atomically."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"kind": checkpoint.model_kind(model), "model": checkpoint.unwrap(model).config.to_dict(), **(extra or {})}
    for name, write in ((checkpoint.WEIGHTS, lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                        (checkpoint.CONFIG, lambda f: Path(f).write_text(json.dumps(config, indent=2) + "\n"))):
        tmp = folder / f".{name}.tmp"
        write(str(tmp))
        os.replace(tmp, folder / name)


def load_model_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Load full weights into a model, strictly (`checkpoint.load_state_dict`); a sharded model keeps only
    its shard of each tensor."""
    model = checkpoint.unwrap(model)
    if not is_sharded(model):
        checkpoint.load_state_dict(model, tensors, source)
        return
    tensors = {checkpoint.canonical_key(k): v for k, v in tensors.items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}  # parameter -> the key it is stored under (the first of its tied names)
    own = model.state_dict()
    for key in own:
        if key in params:
            first.setdefault(id(params[key]), key)
    expected = {k for k in own if k not in params or first[id(params[k])] == k}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model: missing key(s): {', '.join(missing) or '-'}; "
                        f"unexpected key(s): {', '.join(unexpected) or '-'}")
    state = {}
    for key, like in own.items():
        full = tensors[first[id(params[key])] if key in params else key]
        if tuple(full.shape) != tuple(like.shape):
            raise UserError(f"{source}: {key} has shape {tuple(full.shape)}, the model expects {tuple(like.shape)}")
        state[key] = _shard_like(full.to(like.dtype), like)
    model.load_state_dict(state)


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict | None:
    """optimizer.state_dict() with full tensors, on rank 0 (None elsewhere); a collective under FSDP."""
    state = optimizer.state_dict()
    if not any(hasattr(v, "full_tensor") for s in state["state"].values() for v in s.values()):
        return state if _rank()[0] == 0 else None
    full = {i: {k: _full(v) if isinstance(v, Tensor) else v for k, v in sorted(s.items())}
            for i, s in sorted(state["state"].items())}
    return {**state, "state": full} if _rank()[0] == 0 else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (`optimizer_state`); a sharded parameter's moments keep only its shard."""
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict's numbering
    for i, s in state["state"].items():
        p = params[int(i)]
        for k, v in s.items():
            if isinstance(v, Tensor) and hasattr(p, "full_tensor") and tuple(v.shape) == tuple(p.shape):
                s[k] = _shard_like(v, p)
    optimizer.load_state_dict(state)


class Checkpointer:
    """Resumable checkpoints in OUT/checkpoints/step_NNNNNNN/ and the stage's exported model in OUT/.

    A step folder holds, for each model, `{name}/model.safetensors` + `{name}/config.json`, and `state/`:
    `optim_{name}.pt` (optimizer state dicts), `rng_rank{r}.pt` (every generator of each rank), and
    `state.json` (the stage's own state: step, data position, ...). It is built in a hidden temporary
    folder beside it, fsynced, then renamed: a step folder exists complete or not at all.

    Under torchrun every rank calls save/load; rank 0 writes everything except the other ranks' RNG.
    """

    STEP = re.compile(r"^step_(\d{7,})$")
    COMPLETE = "COMPLETE"  # written last inside the temporary folder, before the rename

    def __init__(self, out: Path, keep_last: int = 2):
        self.out = Path(out)
        self.root = self.out / "checkpoints"
        self.keep_last = keep_last

    # -- saving -------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict,
        extra_config: dict | None = None,
    ) -> Path:
        rank, _ = _rank()
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-step_{step:07d}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            (tmp / "state").mkdir(parents=True)
        _barrier()
        torch.save(rng_state(), tmp / "state" / f"rng_rank{rank}.pt")
        _barrier()
        weights = {name: model_tensors(model) for name, model in models.items()}  # every rank: FSDP gathers
        optim = {name: optimizer_state(optimizer) for name, optimizer in optimizers.items()}
        if rank == 0:
            try:
                for name, model in models.items():
                    write_model(model, weights[name], tmp / name, extra=extra_config)
                for name, state_dict in optim.items():
                    torch.save(state_dict, tmp / "state" / f"optim_{name}.pt")
                _write_json(tmp / "state" / "state.json", {"step": step, **state})
                (tmp / self.COMPLETE).write_text(f"{step}\n")
                _fsync_tree(tmp)
                if final.exists():  # the same step saved again (e.g. after a resume): replace it
                    old = self.root / f".old-step_{step:07d}"
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
                _fsync(self.root)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.complete()[: -self.keep_last]:
            trash = path.with_name(f".old-{path.name}")
            os.rename(path, trash)  # a half-deleted folder must never look like a checkpoint
            shutil.rmtree(trash, ignore_errors=True)

    def save_best(self, models_or_model: dict[str, nn.Module] | nn.Module, record: dict) -> Path:
        """Replace OUT/best/ with these models (the stage decides what "best" means) and `record` (e.g.
        {"val_loss": 1.9, "step": 500}) as best.json; atomic like a step checkpoint."""
        best = self.out / "best"
        weights = self._gather(models_or_model)
        if _rank()[0] == 0:
            tmp = self.out / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            self._export_into(tmp, models_or_model, weights, None)
            _write_json(tmp / "best.json", record)
            _fsync_tree(tmp)
            old_dir = self.out / ".old-best"
            shutil.rmtree(old_dir, ignore_errors=True)
            if best.exists():
                os.rename(best, old_dir)
            os.rename(tmp, best)
            shutil.rmtree(old_dir, ignore_errors=True)
        _barrier()
        return best

    def best_model_path(self) -> Path | None:
        """OUT/best/ when save_best wrote it (load it with checkpoint.load_model), else None."""
        best = self.out / "best"
        return best if (best / "best.json").is_file() else None

    def export(self, models_or_model: dict[str, nn.Module] | nn.Module, extra: dict | None = None) -> Path:
        """The stage's public result: OUT/model.safetensors + OUT/config.json for one model, or
        OUT/{name}/... for several. Each file is written atomically."""
        weights = self._gather(models_or_model)
        if _rank()[0] == 0:
            self._export_into(self.out, models_or_model, weights, extra)
        _barrier()
        return self.out

    @staticmethod
    def _gather(models_or_model) -> dict:
        """{name: full weights} on rank 0 (name None for a single model); every rank must call it."""
        if isinstance(models_or_model, nn.Module):
            return {None: model_tensors(models_or_model)}
        return {name: model_tensors(model) for name, model in models_or_model.items()}

    @staticmethod
    def _export_into(folder: Path, models_or_model, weights: dict, extra: dict | None) -> None:
        if isinstance(models_or_model, nn.Module):
            write_model(models_or_model, weights[None], folder, extra=extra)
        else:
            for name, model in models_or_model.items():
                write_model(model, weights[name], folder / name, extra=extra)

    # -- finding and loading ------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            m = self.STEP.match(path.name)
            if m and path.is_dir() and (path / self.COMPLETE).is_file():
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The highest complete step folder; temporary and half-deleted folders are ignored."""
        found = self.complete()
        return found[-1] if found else None

    def load(self, path: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
        """Load weights (strictly), optimizer states and RNG states from a step folder; return its state."""
        path = Path(path)
        if not (path / self.COMPLETE).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {self.COMPLETE} marker)")
        for name, model in models.items():
            tensors = checkpoint.load_tensors(path / name / checkpoint.WEIGHTS)
            load_model_tensors(model, tensors, str(path / name / checkpoint.WEIGHTS))
        for name, optimizer in optimizers.items():
            file = path / "state" / f"optim_{name}.pt"
            if not file.is_file():
                raise UserError(f"{path}: no optimizer state for {name!r} ({file.name})")
            load_optimizer_state(optimizer, torch.load(file, map_location="cpu", weights_only=True))
        rank, _ = _rank()
        rng_file = path / "state" / f"rng_rank{rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{path}: no RNG state for rank {rank} (saved with a different number of ranks?)")
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        return json.loads((path / "state" / "state.json").read_text())


# ----------------------------------------------------------------------------------------------------
# Metrics, progress and MFU


def finished_summary(out: Path, resume: bool, what: str) -> dict | None:
    """The summary of a stage that already finished in `out` (its done.json), for `--resume`; without
    `--resume` a finished `out` is an error, so a finished result is never overwritten by accident."""
    done = Path(out) / "done.json"
    if not done.exists():
        return None
    if not resume:
        raise UserError(f"{out} holds a finished {what} run; choose another --out or pass --resume")
    summary = json.loads(done.read_text())
    print(json.dumps(summary))
    return summary


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per logged step. On resume from step S, lines with step > S
    (logged after the checkpoint by the run that stopped) and any torn last line are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write(self, row: dict) -> None:
        """Log a row that carries its own "step"."""
        row = dict(row)
        self.log(int(row.pop("step")), **row)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class Progress:
    """A rich progress bar: step / total, loss, tokens/s, ETA. Silent when stderr is not a terminal or on
    ranks other than 0; `print` still reports (to stdout, main rank only). Use as a context manager, or
    call `close()` at the end."""

    def __init__(self, total: int, description: str = "training", start: int = 0, enabled: bool | None = None):
        self.enabled = _rank()[0] == 0 if enabled is None else enabled
        self.bar = None
        if self.enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self.bar = RichProgress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.task = self.bar.add_task(description, total=total, completed=start, info="")
            self.bar.start()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def update(self, step: int, stats: dict | float | None = None, tokens_per_s: float | None = None) -> None:
        """Move to `step`; `stats` is a loss or a dict of figures (loss, tokens_per_s, anything numeric)."""
        if self.bar is None:
            return
        stats = {"loss": stats} if isinstance(stats, (int, float)) else dict(stats or {})
        if tokens_per_s is not None:
            stats["tokens_per_s"] = tokens_per_s
        info = []
        for key, value in stats.items():
            if key in ("lr", "tokens") or not isinstance(value, (int, float, Tensor)):
                continue
            value = float(value)
            info.append(f"{value:,.0f} tok/s" if key == "tokens_per_s" else f"{key} {value:.4g}")
        self.bar.update(self.task, completed=step, info="  ".join(info[:4]))

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(message, highlight=False)
        else:
            print(message, flush=True)


# Dense bf16 peak of the GPUs we know (tensor cores, no sparsity), in FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def training_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """FLOPs to train on one token (forward + backward = 3 x forward), counting matmuls only:

    - weights: 2 FLOPs per weight per token forward (multiply + add) -> 6 N for training, where N counts
      every Linear weight that multiplies activations, the unembedding included (once, even when tied);
      embedding lookups, norms, biases and elementwise ops are not counted;
    - attention: per layer, QK^T and AV each cost 2 C FLOPs per (query, key) pair forward. With causal
      masking query t sees t + 1 keys, (T + 1) / 2 on average, and flash attention skips the masked
      half, so we count 2 * 2 C * (T + 1) / 2 per layer forward, 6 L C (T + 1) for training (half of the
      commonly quoted 12 L T C, which counts the masked half too)."""
    model = checkpoint.unwrap(model)
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    cfg = model.config
    C_attn = cfg.n_head * cfg.head_dim
    return 6 * n + 6 * cfg.n_layer * C_attn * (seq_len + 1)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, device: torch.device, world_size: int = 1) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the bf16 peak of the GPUs in use; None on
    the CPU or an unknown GPU."""
    peak = peak_flops(device)
    if peak is None:
        return None
    return flops_per_token * tokens_per_s / (peak * world_size)


class Timer:
    """Wall time of the training steps since the last `lap`, synchronising CUDA only when read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.t0 = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        dt, self.t0 = now - self.t0, now
        return dt


def config_dict(cfg: Any) -> dict:
    """A dataclass as a JSON-ready dict (paths as strings)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
