"""The `instructgpt pretrain` stage: next-token prediction on the token shards `prepare` wrote.

Reads top to bottom: check the inputs, set up, (resume,) train, export.

    DATA/meta.json, train_*.bin, val_*.bin, tokenizer.json   (from `instructgpt prepare`)
      -> OUT/model.safetensors, config.json, tokenizer.json  the pretrained model (the next stage's --init)
         OUT/samples.txt                                     a few generations from it
         OUT/metrics.jsonl                                   train loss, val loss, lr, tokens/s, ...
         OUT/checkpoints/step_NNNNNNN/                       resumable state (weights, optimizer, RNG, data)
         OUT/done.json                                       written last: the stage completed

Batches are random windows of block_size + 1 tokens from the train shards, drawn by a seeded numpy
Generator whose state is checkpointed, so a resumed run sees exactly the batches an uninterrupted run
would have seen. Validation uses the same fixed windows at every evaluation.

The encoder-decoder (`--arch seq2seq`) is pretrained as a prefix language model (the denoising objective
of T5's "prefix LM" variant, Raffel et al. 2020, section 3.3): a window of 2T tokens is cut at a random
point s in [1, T]; the encoder reads the prefix w[:s] (right-padded to T, padding masked), the decoder
starts from <|bos|> and predicts the next T tokens w[s:s+T]. This is the shape of SFT for this model
(prompt in the encoder, reply in the decoder after <|bos|>), and of generation (the engine starts the
decoder at <|bos|>). Every decoder position is a target, so a step trains on batch_size x T tokens as the
decoder-only model does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from .batching import WindowSampler, prefix_lm_batch
from .checkpoint import DONE, Checkpointer, check_out, load_model, write_done
from .distributed import Runtime, prepare_model, rank_rows
from .errors import UserError
from .losses import seq2seq_loss_sum, token_cross_entropy
from .model import PRESETS, ModelConfig, build_model
from .prepare import load_shards, read_meta
from .train import (
    MetricsLog,
    Progress,
    Timer,
    TrainConfig,
    config_dict,
    make_optimizer,
    mfu,
    setup,
    train_step,
    training_flops_per_token,
)

_SHAPE_DEFAULTS = dict(n_layer=4, n_head=4, n_embd=128, block_size=256)  # the "tiny" preset


# ----------------------------------------------------------------------------------------------------
# Data: random windows from memmapped shards


def to_batch(windows: np.ndarray, runtime: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (B, T+1) -> inputs x (B, T) and targets y (B, T) = x shifted by one, on the device."""
    t = torch.from_numpy(windows)
    if runtime.device.type == "cuda":
        t = t.pin_memory().to(runtime.device, non_blocking=True)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def lm_loss_sum(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return token_cross_entropy(model(x), y)


def n_targets(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    return batch[1].numel()


def seq2seq_n_targets(batch: dict[str, torch.Tensor]) -> int:
    return batch["labels"].numel()


@dataclass
class Objective:
    """What one training example is: windows of `window` tokens, turned into a batch with `draw`, scored
    with `loss_sum` over `n_targets` tokens. Next-token prediction for the GPT, prefix LM for seq2seq."""

    window: int  # tokens per sampled window
    draw: Callable[[np.ndarray, np.random.Generator, Runtime], Any]  # windows (B, window) -> batch on the device
    loss_sum: Callable[[nn.Module, Any], torch.Tensor]  # (model, batch) -> summed per-token loss
    n_targets: Callable[[Any], int]  # batch -> number of target tokens


def make_objective(arch: str, T: int, start_id: int, pad_id: int) -> Objective:
    if arch == "gpt":
        return Objective(T + 1, lambda w, rng, runtime: to_batch(w, runtime), lm_loss_sum, n_targets)

    def draw(windows: np.ndarray, rng: np.random.Generator, runtime: Runtime) -> dict[str, torch.Tensor]:
        splits = rng.integers(1, T + 1, size=len(windows))  # drawn after the windows: part of the data stream
        batch = prefix_lm_batch(windows, splits, start_id, pad_id)
        return {k: v.to(runtime.device, non_blocking=True) for k, v in batch.items()}

    return Objective(2 * T, draw, seq2seq_loss_sum, seq2seq_n_targets)


def sample_batch(objective: Objective, sampler: WindowSampler, rng: np.random.Generator, B: int,
                 runtime: Runtime):
    """This rank's B rows of a global batch of B x world_size: every rank draws the whole global batch
    from the same generator and keeps its slice, so N ranks see what one process with batch N x B sees."""
    return rank_rows(objective.draw(sampler.sample(rng, B * runtime.world_size), rng, runtime), runtime)


@torch.no_grad()
def evaluate(model: nn.Module, sampler: WindowSampler, iters: int, batch_size: int, seed: int,
             runtime: Runtime, objective: Objective | None = None) -> float:
    """Mean per-token loss over `iters` batches; the same windows every time (a fixed seed), and no
    global generator is touched, so evaluating does not change the training run."""
    objective = objective or make_objective("gpt", sampler.window - 1, 0, 0)
    rng = np.random.default_rng([seed, 1])
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=runtime.device)
    count = 0
    for _ in range(iters):
        batch = sample_batch(objective, sampler, rng, batch_size, runtime)
        with runtime.autocast():
            total += objective.loss_sum(model, batch).float()
        count += objective.n_targets(batch)
    model.train(was_training)
    if runtime.distributed:  # each rank scored its share of every batch
        both = torch.stack([total.double(), torch.tensor(count, dtype=torch.float64, device=runtime.device)])
        torch.distributed.all_reduce(both)
        return float(both[0] / both[1])
    return float(total) / count


# ----------------------------------------------------------------------------------------------------
# Checking the inputs before anything runs


def model_config(preset: str | None, vocab_size: int, n_layer, n_head, n_embd, block_size, dropout: float,
                 family: str, arch: str = "gpt", n_encoder_layer: int | None = None) -> tuple[ModelConfig, int]:
    """The model to train and the training window. A preset fixes the model's context; --block-size may
    only shorten the window within it."""
    if preset is not None and preset not in PRESETS:
        raise UserError(f"--preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
    shape = {**_SHAPE_DEFAULTS, **{k: v for k, v in PRESETS.get(preset, {}).items() if k != "vocab_size"}}
    for name, value in dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd).items():
        if value is not None:
            shape[name] = value
    context = shape["block_size"]
    window = context if block_size is None else block_size
    if window < 1:
        raise UserError(f"--block-size must be at least 1, got {window}")
    if preset is None:
        shape["block_size"] = context = window
    elif window > context:
        raise UserError(f"--block-size {window} is beyond the model's context of {context} tokens "
                        f"(preset {preset!r})")
    make = ModelConfig.llama if family == "llama" else ModelConfig.gpt2
    if arch == "seq2seq":
        shape |= dict(arch="seq2seq", n_encoder_layer=n_encoder_layer or 0)
    try:
        cfg = make(vocab_size=vocab_size, dropout=dropout, **shape)
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg, window


def special_ids(data: Path, meta: dict) -> tuple[int, int]:
    """(decoder start, padding) ids: the tokenizer's <|bos|> and <|pad|> when the folder has one, else
    the end-of-document id and 0 (only the encoder-decoder uses them; padding is always masked)."""
    if (data / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tok = Tokenizer.load(data / "tokenizer.json")
        return tok.bos_id, tok.pad_id
    return int(meta.get("eos_id", 0)), 0


# ----------------------------------------------------------------------------------------------------
# Samples


def write_samples(model: nn.Module, data: Path, out: Path, n: int, seed: int) -> None:
    """n generations from the start of a document: the first greedy, the others sampled (T = 0.8). The
    encoder-decoder reads the document start in its encoder and starts its decoder at <|bos|>."""
    from .generate import SamplingParams, generate

    tokenizer = None
    if (data / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(data / "tokenizer.json")
    meta = json.loads((data / "meta.json").read_text())
    eos = int(meta.get("eos_id", 0))
    pad = tokenizer.pad_id if tokenizer is not None else eos
    start = tokenizer.bos_id if tokenizer is not None else eos
    max_new = min(200, model.config.block_size - 1)
    parts = []
    for i in range(n):
        params = SamplingParams(max_new_tokens=max_new, temperature=0.0 if i == 0 else 0.8, top_k=200,
                                seed=seed + i)
        ids = generate(model, [[eos]], params, eos_id=eos, pad_id=pad, start_id=start).token_lists()[0]
        text = tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))
        parts.append(f"--- sample {i} ({'greedy' if i == 0 else 'temperature 0.8'}) ---\n{text}\n")
    (out / "samples.txt").write_text("\n".join(parts))


# ----------------------------------------------------------------------------------------------------
# The stage


@dataclass
class _Clock:
    """Seconds spent by this and earlier (resumed) processes."""

    before: float
    start: float

    def total(self) -> float:
        return self.before + time.perf_counter() - self.start


def pretrain_command(
    data: Path,
    out: Path,
    preset: str | None = None,
    n_layer: int | None = None,
    n_head: int | None = None,
    n_embd: int | None = None,
    block_size: int | None = None,
    dropout: float = 0.0,
    family: Literal["gpt2", "llama"] = "gpt2",
    arch: Literal["gpt", "seq2seq"] = "gpt",
    n_encoder_layer: int | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 1e-3,
    min_lr: float | None = None,
    warmup_steps: int = 100,
    max_steps: int = 2000,
    weight_decay: float = 0.1,
    beta2: float = 0.99,
    grad_clip: float = 1.0,
    eval_interval: int = 250,
    eval_iters: int = 20,
    log_interval: int = 10,
    checkpoint_interval: int = 500,
    keep_last: int = 2,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    fsdp: bool = False,
    resume: bool = False,
    samples: int = 3,
) -> None:
    """Pretrain a language model by next-token prediction on prepared token shards.

    Writes OUT/model.safetensors, config.json, tokenizer.json, samples.txt, metrics.jsonl, checkpoints/
    and, last, done.json. With --resume, continues from the latest checkpoint in OUT exactly as if the run
    had not stopped (or starts fresh when there is none).

    Args:
        data: a folder written by `instructgpt prepare` (meta.json, train_*.bin, val_*.bin, tokenizer.json).
        out: the stage folder to write.
        preset: model shape: tiny, small or gpt2-124m; --n-layer/--n-head/--n-embd override it.
        n_layer: decoder blocks (default: the preset's, else 4).
        n_head: attention heads (default: the preset's, else 4).
        n_embd: residual width (default: the preset's, else 128).
        block_size: tokens per training window; without a preset also the model's context (default 256).
        dropout: residual and embedding dropout.
        family: gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU).
        arch: "gpt" (decoder-only, next-token prediction) or "seq2seq" (encoder-decoder, prefix LM: the
            encoder reads a random-length prefix of a 2 x block_size window, the decoder predicts the next
            block_size tokens).
        n_encoder_layer: seq2seq only: encoder blocks (default: as many as the decoder's n_layer).
        batch_size: sequences per micro-batch (per rank).
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        min_lr: learning rate at the end of the cosine (default lr / 10).
        warmup_steps: linear warm-up steps.
        max_steps: optimizer steps.
        weight_decay: AdamW weight decay on matrices.
        beta2: AdamW beta2.
        grad_clip: clip the gradient norm to this (0 disables).
        eval_interval: validation loss every this many steps (and at the end).
        eval_iters: validation batches per evaluation.
        log_interval: metrics every this many steps.
        checkpoint_interval: resumable checkpoint every this many steps (and at the end).
        keep_last: step checkpoints to keep.
        seed: seeds the model's initialisation, dropout and the order of the data.
        device: auto, cpu, cuda or cuda:N.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16.
        compile: torch.compile the model (default: on for CUDA, off on CPU).
        fsdp: under torchrun, shard the model, gradients and optimizer state over the ranks (FSDP2) instead
            of replicating them (DDP); for models that do not fit one GPU.
        resume: continue the run in OUT from its latest checkpoint.
        samples: generations written to OUT/samples.txt at the end (0 for none).
    """
    data, out = Path(data), Path(out)
    clock = _Clock(0.0, time.perf_counter())

    # 1. check everything a user can get wrong before training starts
    if arch not in ("gpt", "seq2seq"):
        raise UserError(f"--arch {arch!r}: choose 'gpt' (decoder-only) or 'seq2seq' (encoder-decoder)")
    if n_encoder_layer is not None and (arch != "seq2seq" or n_encoder_layer < 1):
        raise UserError("--n-encoder-layer is for --arch seq2seq and must be at least 1")
    if eval_iters < 1:
        raise UserError(f"--eval-iters must be at least 1, got {eval_iters}")
    if samples < 0:
        raise UserError(f"--samples must be >= 0, got {samples}")
    cfg = TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
                      warmup_steps=warmup_steps, max_steps=max_steps, weight_decay=weight_decay, beta2=beta2,
                      grad_clip=grad_clip, seed=seed, device=device, dtype=dtype, compile=compile,
                      eval_interval=eval_interval, log_interval=log_interval,
                      checkpoint_interval=checkpoint_interval, keep_last=keep_last, fsdp=fsdp)
    cfg.validate()
    read_meta(data)

    meta, train_shards, val_shards = load_shards(data)
    model_cfg, T = model_config(preset, int(meta["vocab_size"]), n_layer, n_head, n_embd, block_size, dropout,
                                family, arch, n_encoder_layer)
    start_id, pad_id = special_ids(data, meta)
    objective = make_objective(arch, T, start_id, pad_id)
    train_data = WindowSampler(train_shards, objective.window)
    if train_data.n_windows == 0:
        longest = max((len(s) for s in train_shards), default=0)
        what = "block_size + 1" if arch == "gpt" else "2 x block_size (prefix + continuation)"
        raise UserError(f"{data}: the longest train shard holds {longest} tokens, fewer than one window of "
                        f"{what} = {objective.window}; lower --block-size or prepare more data")
    val_data = WindowSampler(val_shards, objective.window)
    check_out(out, resume, "pretraining")

    # 2. set up: runtime, model, optimizer, and the state of a resumed run
    runtime = setup(cfg)

    def say(message: str) -> None:
        if runtime.is_main:
            print(message, flush=True)

    if val_data.n_windows == 0:
        say(f"warning: {data} has no validation window of {objective.window} tokens: no val loss will be "
            "reported")
    raw = build_model(model_cfg).to(runtime.device)
    model = prepare_model(raw, runtime)  # DDP or FSDP; `raw` (sharded in place under FSDP) for checkpoints
    optimizer = make_optimizer(raw, cfg, runtime)
    ckpt = Checkpointer(out, keep_last=cfg.keep_last)
    run_config = {"stage": "pretrain", "data": str(data), "train": config_dict(cfg), "block_size": T,
                  "eval_iters": eval_iters, "objective": "next_token" if arch == "gpt" else "prefix_lm"}
    data_rng = np.random.default_rng([seed, 0])  # the same on every rank: each keeps its slice of a batch
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "train_loss": None, "val_loss": None}
    latest = ckpt.latest() if resume else None
    if latest is not None:
        saved = json.loads((latest / "model" / "config.json").read_text())["model"]
        if saved != model_cfg.to_dict():
            diff = sorted(k for k in saved if saved[k] != model_cfg.to_dict().get(k))
            raise UserError(f"--resume: the checkpoint {latest} has a different model ({', '.join(diff)} "
                            "differ); pass the same shape flags as the run that wrote it")
        state = ckpt.load(latest, {"model": raw}, {"model": optimizer})
        data_rng.bit_generator.state = state["data_rng"]
        clock.before = state["seconds"]
        say(f"resumed from {latest} at step {state['step']}")
        if state["step"] >= cfg.max_steps and (out / DONE).is_file():
            say(f"{out} is complete ({state['step']} steps, --max-steps {cfg.max_steps}): nothing to do")
            return
    elif resume:
        say(f"--resume: no checkpoint in {out}, starting from scratch")
    (out / DONE).unlink(missing_ok=True)  # about to train (further): the stage is not complete any more
    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl", resume_step=state["step"], enabled=runtime.is_main)
    flops_per_token = training_flops_per_token(raw, T)
    say(f"pretraining a {sum(p.numel() for p in raw.parameters()) / 1e6:.2f}M-parameter {arch} model on {data} "
        f"({train_data.n_windows:,} train windows of {objective.window} tokens) for {cfg.max_steps} steps on "
        f"{runtime.device}")

    def save(step: int) -> None:
        ckpt.save(step, {"model": raw}, {"model": optimizer},
                  {**state, "step": step, "data_rng": data_rng.bit_generator.state, "seconds": clock.total()},
                  extra_config=run_config)

    # 3. the loop (with the loss of the untrained model first, as a baseline for the curve)
    if state["step"] == 0 and val_data.n_windows:
        state["val_loss"] = evaluate(raw, val_data, eval_iters, cfg.batch_size, seed, runtime, objective)
        metrics.log(0, val_loss=state["val_loss"])
    timer, tokens_since = Timer(runtime.device), 0
    with Progress(cfg.max_steps, "pretrain", start=state["step"], enabled=runtime.is_main) as bar:
        for step in range(state["step"], cfg.max_steps):
            micro = [sample_batch(objective, train_data, data_rng, cfg.batch_size, runtime)
                     for _ in range(cfg.grad_accum)]
            done = step + 1
            log_now = done % cfg.log_interval == 0 or done == cfg.max_steps
            stats = train_step(model, optimizer, micro, objective.loss_sum, objective.n_targets, cfg, runtime, step,
                               sync=log_now)
            state["tokens"] += stats["tokens"]
            tokens_since += stats["tokens"]
            record = {}
            if log_now:
                dt = timer.lap()
                tok_s = tokens_since / dt
                tokens_since = 0
                state["train_loss"] = stats["loss"]
                record.update(loss=stats["loss"], grad_norm=stats["grad_norm"], lr=stats["lr"],
                              tokens=state["tokens"], tokens_per_s=round(tok_s, 1))
                util = mfu(flops_per_token, tok_s, runtime.device, runtime.world_size)
                if util is not None:
                    record["mfu"] = round(util, 4)
                bar.update(done, stats["loss"], tok_s)
            if val_data.n_windows and (done % cfg.eval_interval == 0 or done == cfg.max_steps):
                state["val_loss"] = evaluate(raw, val_data, eval_iters, cfg.batch_size, seed, runtime, objective)
                record["val_loss"] = state["val_loss"]
                bar.print(f"step {done}: train loss {state['train_loss']:.4f}, val loss {state['val_loss']:.4f}")
                timer.lap()  # evaluation time is not training throughput
            if record:
                metrics.log(done, **record)
            if done % cfg.checkpoint_interval == 0 or done == cfg.max_steps:
                save(done)
                timer.lap()

    # 4. the stage's result: the model, its tokenizer, samples, and the completion marker last
    ckpt.export(raw, extra={"stage": "pretrain", "objective": run_config["objective"]})
    if runtime.is_main:
        if samples:
            # a sharded model generates only with every rank: rank 0 reads back the exported one
            write_samples(load_model(out, device=runtime.device) if runtime.fsdp else raw, data, out, samples, seed)
        done_info = {"stage": "pretrain", "step": cfg.max_steps, "val_loss": state["val_loss"],
                     "train_loss": state["train_loss"], "tokens": state["tokens"],
                     "seconds": round(clock.total(), 2)}
        write_done(out, done_info, tokenizer_from=data if (data / "tokenizer.json").is_file() else None)
        say(f"done: val loss {state['val_loss']}, {clock.total():.1f} s; wrote {out}")
