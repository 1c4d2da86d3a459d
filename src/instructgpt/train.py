"""The small training library every stage composes: the optimisation recipe (`TrainConfig`), the
optimizer and its schedule, one optimizer step, metrics and a progress bar.

A stage reads top to bottom with these pieces and those of `distributed`, `checkpoint`, `resume` and `finetune`
(see `pretrain.py` and `sft.py`):

    runtime = setup(cfg)
    model = load_model(init)
    lora = finetune.prepare(model, cfg)  # LoRA and activation checkpointing as the flags say (`TrainConfig.lora`)
    fwd = prepare_model(model, runtime)  # FSDP, compile, DDP
    optimizer = make_optimizer(model, cfg, runtime)
    ckpt = Checkpointer(out, cfg.keep_last, weights=finetune.checkpoint_weights(lora))
    state = ckpt.load(ckpt.latest(), {"model": model}, {"model": optimizer}) if resuming else {...}
    for step in range(state["step"], cfg.max_steps):
        stats = train_step(model, optimizer, micro_batches, loss_sum_fn, n_targets_fn, cfg, runtime, step)
        ...
    ckpt.export(model)

No trainer class: the loop stays in the stage. Losses are normalised by the number of target tokens over
all micro-batches and ranks of a step (invariant 6), so gradient accumulation and data parallelism give
the same update as one big batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .distributed import Runtime, init_runtime, is_sharded, rank_and_world, unwrap
from .errors import UserError
from .lora import FUSED, TARGETS, LoRAConfig
from .resume import check_resume as check_resume  # re-exported: callers of train.check_resume
from .resume import run_fingerprint as run_fingerprint  # and of train.run_fingerprint
from .trackers import ReportTo, open_tracker

# ----------------------------------------------------------------------------------------------------
# Configuration and runtime


@dataclass
class TrainConfig:
    """Optimisation, schedule, device and bookkeeping of one training stage: the settings every training
    stage shares, nested in each stage's arguments, so that a flag means the same thing in every command.
    A stage sets its own defaults (`field(default_factory=lambda: TrainConfig(lr=...))`); fields that may be
    None are resolved by the stage (its docstring says how) before `setup`."""

    batch_size: int = 16  # sequences (examples, prompts or pairs) per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step (each step sees batch_size * grad_accum * ranks)
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr: float | None = None  # floor of the cosine decay, reached at max_steps; None means lr / 10
    warmup_steps: int | None = 100  # linear warm-up from lr / warmup_steps to lr; None: the stage computes it
    max_steps: int | None = 1000  # optimizer steps in the whole run (the cosine ends here); None: from epochs
    weight_decay: float = 0.1  # AdamW decoupled decay, only on matrices (not norms, biases, embeddings)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay (0.99 suits small models and small batches)
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    seed: int = 1337  # seeds python, numpy and torch (model init, dropout, data order)
    device: str = "auto"  # "cpu", "cuda", "cuda:1", or auto = cuda if available else cpu
    dtype: str = "auto"  # "float32" or "bfloat16" (autocast); auto = bfloat16 on CUDA, float32 on CPU
    compile: bool | None = None  # torch.compile the model; None = on for CUDA, off on CPU
    fsdp: bool = False  # under torchrun, shard weights, gradients and optimizer state over ranks (FSDP2), not DDP
    eval_interval: int | None = None  # evaluate every this many steps (and at the end); None: the stage's default
    log_interval: int = 10  # log metrics (and sync the device for the loss) every this many steps
    checkpoint_interval: int | None = None  # resumable checkpoint every this many steps (and at the end)
    keep_last: int = 2  # keep this many step checkpoints; older ones are deleted (0 keeps all)
    resume: bool = False  # continue the run in --out from its latest checkpoint (or keep a finished one)
    report_to: ReportTo = "none"  # also send the metrics.jsonl rows to tensorboard, wandb or trackio
    # under torchrun: minutes a rank waits in a collective for the others before the run fails (a dead or hung
    # rank then stops the job even without an elastic agent to notice it)
    dist_timeout: float = 30.0
    # LoRA rank: train a low-rank update beside each targeted layer of the frozen model (Hu et al. 2021). Step
    # checkpoints then hold only the adapters (and a reward model's head); the exported model is merged, and a
    # language model's adapter is also written alone in PEFT's format (OUT/adapter/). 0: full fine-tuning (and
    # the only choice of pretrain, whose model is new)
    lora_rank: int = 0
    lora_alpha: float | None = None  # the update is scaled by alpha / rank; None: 2 x rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (the frozen path sees the input as it is)
    # the layers that get adapters: attn (every attention projection) and mlp, or layer names (qkv_proj or c_attn,
    # o_proj, fc or gate_up_proj, proj or down_proj); a fused projection (q, k and v; gate and up) gets one adapter
    lora_targets: tuple[str, ...] = ("attn", "mlp")
    # keep only each transformer block's input for the backward pass and recompute the block there: activation
    # memory falls from tens of B x T x C per block to one, for about one more forward pass of compute
    activation_checkpointing: bool = False

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    def lora(self) -> LoRAConfig | None:
        """The adapters --lora-* ask for; None for full fine-tuning (--lora-rank 0). Call after validate()."""
        if self.lora_rank == 0:
            return None
        alpha = 2.0 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoRAConfig(self.lora_rank, alpha, self.lora_dropout, tuple(self.lora_targets))

    def validate(self) -> None:
        checks = [
            (self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}"),
            (0 < self.lr < math.inf, f"--lr must be positive and finite, got {self.lr}"),
            (self.min_lr is None or 0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr], got {self.min_lr}"),
            (self.warmup_steps is None or self.warmup_steps >= 0,
             f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)"),
            (self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 disables), got {self.grad_clip}"),
            (self.eval_interval is None or self.eval_interval >= 1,
             f"--eval-interval must be at least 1, got {self.eval_interval}"),
            (self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}"),
            (self.checkpoint_interval is None or self.checkpoint_interval >= 1,
             f"--checkpoint-interval must be at least 1, got {self.checkpoint_interval}"),
            (self.keep_last >= 0, f"--keep-last must be >= 0, got {self.keep_last}"),
            (self.dist_timeout > 0, f"--dist-timeout must be positive (minutes), got {self.dist_timeout}"),
            (self.dtype in ("auto", "float32", "bfloat16"),
             f"--dtype must be auto, float32 or bfloat16, got {self.dtype!r}"),
            (self.lora_rank >= 0, f"--lora-rank must be >= 0 (0: full fine-tuning), got {self.lora_rank}"),
            (self.lora_alpha is None or 0 < self.lora_alpha < math.inf,
             f"--lora-alpha must be positive and finite, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (len(self.lora_targets) > 0, "--lora-targets must name at least one layer (attn, mlp, or a layer name)"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)
        for name in self.lora_targets:
            if name in FUSED:
                raise UserError(f"--lora-targets: {name!r} is part of the fused {FUSED[name]!r} projection here; "
                                f"target {FUSED[name]!r} (one adapter over all of it)")
            if name not in TARGETS:
                raise UserError(f"--lora-targets: unknown target {name!r}; known: {', '.join(TARGETS)}")


def setup(cfg: TrainConfig) -> Runtime:
    """Check the recipe, then `distributed.init_runtime`: device, dtype, seeds, threads, process group. The
    stage has resolved max_steps and warmup_steps (`dataclasses.replace(args.train, max_steps=...)`)."""
    cfg.validate()
    if cfg.max_steps is None or cfg.warmup_steps is None:
        raise ValueError("setup: resolve max_steps and warmup_steps before the run starts")
    return init_runtime(cfg.device, cfg.dtype, cfg.seed, cfg.compile, cfg.fsdp, cfg.dist_timeout)


# ----------------------------------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model: nn.Module, cfg: TrainConfig, runtime: Runtime) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases (1-D) and embedding tables are not decayed.
    A tied parameter (embedding = unembedding) appears once, without decay since it is an embedding."""
    model = unwrap(model)
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
# One optimizer step


class EmptyTargetsError(UserError):
    """A step whose micro-batches hold no target token: nothing to learn from, and a division by zero."""


class DivergedError(UserError):
    """The loss or a gradient norm is not finite: a UserError, so the CLI says it in one line (exit status 2)."""


def diverged(step: int, loss: float, grad_norm: float) -> DivergedError:
    return DivergedError(f"step {step}: loss {loss}, grad norm {grad_norm}: training diverged (the loss or the "
                         "gradient norm is not finite); no step was taken with it and no checkpoint holds it: lower "
                         "--lr, or check the data")


class FiniteGuard:
    """The first step whose loss or gradient norm was not finite, on the device: `train_step(sync=False)` skips
    it without a host sync and records it here; check() (one sync) raises DivergedError for it."""

    def __init__(self, device: torch.device):
        self.first = torch.full((3,), -1.0, dtype=torch.float64, device=device)  # step, loss, grad norm

    def record(self, step: int, finite: Tensor, loss: Tensor, grad_norm: Tensor) -> None:
        # new_full fills on the device: a tensor made from a Python number would be a host-to-device copy, a sync
        row = torch.stack([self.first.new_full((), float(step)), loss.detach().double(), grad_norm.detach().double()])
        self.first = torch.where((self.first[0] < 0) & ~finite, row, self.first)

    def check(self) -> None:
        step, loss, grad_norm = self.first.tolist()
        if step >= 0:
            raise diverged(int(step), loss, grad_norm)


def clip_and_check(models: dict[str, nn.Module], grad_clip: float) -> dict[str, float]:
    """Clip each model's gradient norm to grad_clip (0: only measure) and return the norms; a non-finite one raises
    DivergedError before a step takes it in. The norms are global (DDP, FSDP): every rank stops alike."""
    norms = {}
    for name, model in models.items():
        norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        norms[name] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    if not all(map(math.isfinite, norms.values())):
        raise DivergedError(f"the gradient norm is not finite ({', '.join(f'{k} {v}' for k, v in norms.items())}): "
                            "training diverged (lower --lr, or check the data)")
    return norms


def _step_unless(optimizer: torch.optim.Optimizer, skip: Tensor) -> None:
    """optimizer.step() unless `skip` (a 0-d bool on the device). A fused AdamW reads it on the device (`found_inf`,
    as for torch.amp's GradScaler: no update, moments and step count kept): no host sync. Others read it here."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skip.float()
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif not bool(skip):
        optimizer.step()


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
    guard: FiniteGuard | None = None,
) -> dict:
    """One optimizer step over `micro_batches` (gradient accumulation), token-weighted.

    `loss_sum_fn(model, mb)` returns the SUM of the per-token losses of a micro-batch and
    `n_targets_fn(mb)` its number of target tokens. Each micro-batch contributes loss_sum / N where N
    counts the targets of every micro-batch on every rank, so the update is the mean over all tokens of
    the step however they are split (DDP averages gradients over ranks, hence the factor world_size).

    The step is taken only if the loss and the gradient norm are finite on every rank (checked before the
    optimizer touches the weights or its moments): with sync=True a non-finite one raises DivergedError at
    once; with sync=False the step is skipped without a host sync and recorded in `guard`, whose check() the
    caller runs before it saves, evaluates or logs anything. (sync=False without a guard steps unchecked, as a
    benchmark may: a non-finite step then poisons the weights, and the next synced step raises.)

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
    gradient_sync = getattr(unwrap(model), "set_requires_gradient_sync", None)  # FSDP2
    for i, mb in enumerate(micro_batches):
        if runtime.distributed and gradient_sync is not None:
            gradient_sync(i == last)
        ctx = no_sync() if (runtime.distributed and no_sync is not None and i < last) else contextlib.nullcontext()
        with ctx:
            with runtime.autocast():
                mb_loss = loss_sum_fn(model, mb)
            (mb_loss * scale).backward()
        loss_sum += mb_loss.detach().float()

    # 3. clip; the loss over every rank, and whether any rank's loss or the (global) gradient norm is not finite
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a replicated DTensor
        grad_norm = grad_norm.full_tensor()
    grad_norm = grad_norm.detach()
    loss = loss_sum / max(1, n_local)
    bad = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))).float()
    if runtime.distributed:  # one small all-reduce, asynchronous on CUDA: every rank takes the same decision
        both = torch.stack([loss_sum, loss_sum.new_full((), float(n_local)), bad])
        torch.distributed.all_reduce(both)
        loss, bad = both[0] / both[1].clamp(min=1), both[2]
    finite = bad == 0

    # 4. step (only with finite numbers), clear
    stats = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": n_total}
    if sync:
        stats["loss"], stats["grad_norm"] = float(loss), float(grad_norm)
        if not bool(finite):
            optimizer.zero_grad(set_to_none=True)
            raise diverged(step + 1, stats["loss"], stats["grad_norm"])
        optimizer.step()
    elif guard is None:
        optimizer.step()
    else:
        _step_unless(optimizer, ~finite)
        guard.record(step + 1, finite, loss, grad_norm)
    optimizer.zero_grad(set_to_none=True)
    return stats


# ----------------------------------------------------------------------------------------------------
# Metrics, progress and MFU


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per logged step. On resume from step S, lines with step > S
    (logged after the checkpoint by the run that stopped) and any torn last line are dropped."""

    def __init__(self, path: Path, resume_step: int | None = None, enabled: bool = True,
                 report_to: str = "none", stage: str = "", config: dict | None = None):
        """report_to: also send every row to this tracker (`trackers.open_tracker`, main rank only), with the
        run's resolved arguments `config`; call close() at the end of the stage."""
        self.path = Path(path)
        self.enabled = enabled
        self.tracker = None
        if not enabled:
            return
        self.tracker = open_tracker(report_to, self.path.parent, stage or self.path.parent.name, config)
        keep_rows_up_to(self.path, resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)

    def write(self, row: dict) -> None:
        """Log a row that carries its own "step"."""
        row = dict(row)
        self.log(int(row.pop("step")), **row)

    def read(self) -> list[dict]:
        return read_metrics(self.path)

    def close(self) -> None:
        """End the tracker's run (flushes tensorboard, finishes wandb/trackio); metrics.jsonl needs nothing."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None


def keep_rows_up_to(path: Path, step: int | None) -> None:
    """Rewrite a log of JSON rows with a "step" (metrics.jsonl, samples.jsonl), if any, for a run starting at
    `step`: the rows up to it stay, later ones (written again) and a torn line (a killed append) go; None (a
    fresh run) keeps none. Atomic: a temporary file, then a rename."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    if step is not None:
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl ([] when there is none). A torn last line (the run was killed while it
    appended) is skipped with a warning; any other line that is not JSON is an error naming it."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n < len(lines):
                raise UserError(f"{path}:{n}: not a JSON row ({e.msg})") from None
            warnings.warn(f"{path}:{n}: skipped a torn last line (its run stopped while writing it)", stacklevel=2)
    return rows


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
        self.enabled = rank_and_world()[0] == 0 if enabled is None else enabled
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
    model = unwrap(model)
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
