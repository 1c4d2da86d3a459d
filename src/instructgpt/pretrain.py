"""The `instructgpt pretrain` stage: next-token prediction on the token shards `prepare` wrote.

Reads top to bottom: check the inputs, set up, (resume,) train, export.

    DATA/meta.json, train_*.bin, val_*.bin, tokenizer.json   (from `instructgpt prepare`)
      -> OUT/model.safetensors, config.json, tokenizer.json  the pretrained model (the next stage's --init)
         OUT/samples.txt                                     a few generations from it
         OUT/args.json                                       the resolved arguments (a recipe: --config)
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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from .batching import WindowSampler, prefix_lm_batch
from .checkpoint import DONE, Checkpointer, check_out, load_model, read_done, write_done, writing
from .distributed import Runtime, prepare_model, rank_rows
from .errors import UserError
from .losses import seq2seq_loss_sum, token_cross_entropy
from .memory import set_activation_checkpointing
from .model import PRESETS, ModelConfig, build_model
from .prepare import load_shards, read_meta
from .recipe import to_dict, write_args
from .resume import check_resume, run_fingerprint
from .train import (
    FiniteGuard,
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
class PretrainArgs:
    """The arguments of `instructgpt pretrain`: the data, the model's shape and the training recipe."""

    data: Path  # a folder written by `instructgpt prepare` (meta.json, train_*.bin, val_*.bin, tokenizer.json)
    out: Path  # the stage folder to write
    preset: str | None = None  # model shape: tiny, small or gpt2-124m; --n-layer/--n-head/--n-embd override it
    n_layer: int | None = None  # decoder blocks (None: the preset's, else 4)
    n_head: int | None = None  # attention heads (None: the preset's, else 4)
    n_embd: int | None = None  # residual width (None: the preset's, else 128)
    block_size: int | None = None  # tokens per training window; without a preset also the model's context (256)
    dropout: float = 0.0  # residual and embedding dropout
    # gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)
    family: Literal["gpt2", "llama"] = "gpt2"
    # "gpt" (decoder-only, next-token prediction) or "seq2seq" (encoder-decoder, prefix LM: the encoder reads
    # a random-length prefix of a 2 x block_size window, the decoder predicts the next block_size tokens)
    arch: Literal["gpt", "seq2seq"] = "gpt"
    n_encoder_layer: int | None = None  # seq2seq only: encoder blocks (None: as many as the decoder's n_layer)
    eval_iters: int = 20  # validation batches per evaluation
    samples: int = 3  # generations written to OUT/samples.txt at the end (0 for none)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=16, grad_accum=1, lr=1e-3, min_lr=None, warmup_steps=100, max_steps=2000, weight_decay=0.1,
        beta1=0.9, beta2=0.99, grad_clip=1.0, seed=1337, eval_interval=250, log_interval=10,
        checkpoint_interval=500, keep_last=2))


def pretrain_command(args: PretrainArgs) -> dict:
    """Pretrain a language model by next-token prediction on prepared token shards.

    Writes OUT/args.json, model.safetensors, config.json, tokenizer.json, samples.txt, metrics.jsonl,
    checkpoints/ and, last, done.json, whose summary it returns. With --resume, continues from the latest
    checkpoint in OUT exactly as if the run had not stopped (or starts fresh when there is none).
    """
    clock = _Clock(0.0, time.perf_counter())
    args = resolved(args)
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        # 1. check everything a user can get wrong before training starts
        inputs = check_args(args)

        # 2. set up: runtime, model, optimizer, and the state of a resumed run
        run = set_up(args, inputs, clock)
        if not restore(run, args, inputs):
            return read_done(args.out)  # a finished run: nothing to do
        log = start(run, args, inputs)

        # 3. the loop (with the loss of the untrained model first, as a baseline for the curve)
        train_loop(run, log, args, inputs)

        # 4. the stage's result: the model, its tokenizer, samples, and the completion marker last
        summary = finish(run, args)
        log.close()
        return summary


# 1. checking


def resolved(args: PretrainArgs) -> PretrainArgs:
    """`args` with Paths for the folders, and this stage's default for a shared setting a recipe left None
    (max_steps, warmup_steps, eval_interval, checkpoint_interval)."""
    default = PretrainArgs(args.data, args.out).train
    unset = ("max_steps", "warmup_steps", "eval_interval", "checkpoint_interval")
    train = replace(args.train, **{k: getattr(default, k) for k in unset if getattr(args.train, k) is None})
    return replace(args, data=Path(args.data), out=Path(args.out), train=train)


@dataclass
class _Inputs:
    """What the checks found: the model to build, the objective and the data."""

    model_cfg: ModelConfig
    T: int  # tokens per training window (the decoder's, for seq2seq)
    objective: Objective
    train_data: WindowSampler
    val_data: WindowSampler


def check_args(args: PretrainArgs) -> _Inputs:
    """Every user error (flags, data folder, model shape, --out) as a UserError, before anything is written."""
    data, cfg = args.data, args.train
    if args.arch not in ("gpt", "seq2seq"):
        raise UserError(f"--arch {args.arch!r}: choose 'gpt' (decoder-only) or 'seq2seq' (encoder-decoder)")
    if args.n_encoder_layer is not None and (args.arch != "seq2seq" or args.n_encoder_layer < 1):
        raise UserError("--n-encoder-layer is for --arch seq2seq and must be at least 1")
    if args.eval_iters < 1:
        raise UserError(f"--eval-iters must be at least 1, got {args.eval_iters}")
    if args.samples < 0:
        raise UserError(f"--samples must be >= 0, got {args.samples}")
    cfg.validate()
    if cfg.lora_rank:
        raise UserError(f"--lora-rank {cfg.lora_rank}: pretraining trains every weight of a fresh model; LoRA is for "
                        "the stages that fine-tune a checkpoint")
    read_meta(data)

    meta, train_shards, val_shards = load_shards(data)
    model_cfg, T = model_config(args.preset, int(meta["vocab_size"]), args.n_layer, args.n_head, args.n_embd,
                                args.block_size, args.dropout, args.family, args.arch, args.n_encoder_layer)
    start_id, pad_id = special_ids(data, meta)
    objective = make_objective(args.arch, T, start_id, pad_id)
    train_data = WindowSampler(train_shards, objective.window)
    if train_data.n_windows == 0:
        longest = max((len(s) for s in train_shards), default=0)
        what = "block_size + 1" if args.arch == "gpt" else "2 x block_size (prefix + continuation)"
        raise UserError(f"{data}: the longest train shard holds {longest} tokens, fewer than one window of "
                        f"{what} = {objective.window}; lower --block-size or prepare more data")
    val_data = WindowSampler(val_shards, objective.window)
    check_out(args.out, cfg.resume, "pretraining")
    return _Inputs(model_cfg, T, objective, train_data, val_data)


# 2. setting up


@dataclass
class _Clock:
    """Seconds spent by this and earlier (resumed) processes."""

    before: float
    start: float

    def total(self) -> float:
        return self.before + time.perf_counter() - self.start


@dataclass
class _Run:
    """What the loop needs: the runtime, the model (`raw`, and `model` wrapped for DDP or FSDP), the
    optimizer, the checkpointer, the data generator and the state a checkpoint saves."""

    runtime: Runtime
    raw: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ckpt: Checkpointer
    run_config: dict  # the checkpoints' config.json beside the model's shape
    data_rng: np.random.Generator
    state: dict  # step, tokens, seconds, train_loss, val_loss
    clock: _Clock
    fingerprint: dict  # the data and settings a resumed run must share with this one (`train.check_resume`)
    guard: FiniteGuard  # the first step skipped for a non-finite loss or gradient, between host syncs

    def say(self, message: str) -> None:
        if self.runtime.is_main:
            print(message, flush=True)

    def save(self, step: int) -> None:
        self.ckpt.save(step, {"model": self.raw}, {"model": self.optimizer},
                       {**self.state, "step": step, "data_rng": self.data_rng.bit_generator.state,
                        "seconds": self.clock.total(), "fingerprint": self.fingerprint},
                       extra_config=self.run_config)


def set_up(args: PretrainArgs, inputs: _Inputs, clock: _Clock) -> _Run:
    """Runtime (device, dtype, seeds, process group), the freshly initialised model and its optimizer."""
    cfg = args.train
    runtime = setup(cfg)
    if runtime.is_main and inputs.val_data.n_windows == 0:
        print(f"warning: {args.data} has no validation window of {inputs.objective.window} tokens: no val loss "
              "will be reported", flush=True)
    raw = build_model(inputs.model_cfg).to(runtime.device)
    if cfg.activation_checkpointing:
        set_activation_checkpointing(raw, True)  # before prepare_model: compile sees the checkpointed blocks
    model = prepare_model(raw, runtime)  # DDP or FSDP; `raw` (sharded in place under FSDP) for checkpoints
    optimizer = make_optimizer(raw, cfg, runtime)
    # the recipe, without how this process was started (--resume, --report-to): the same in the checkpoints
    # of an uninterrupted run and of a resumed one
    recipe = {k: v for k, v in config_dict(cfg).items() if k not in ("resume", "report_to", "dist_timeout")}
    run_config = {"stage": "pretrain", "data": str(args.data), "train": recipe, "block_size": inputs.T,
                  "eval_iters": args.eval_iters, "objective": "next_token" if args.arch == "gpt" else "prefix_lm"}
    data_rng = np.random.default_rng([cfg.seed, 0])  # the same on every rank: each keeps its slice of a batch
    state = {"step": 0, "tokens": 0, "seconds": 0.0, "train_loss": None, "val_loss": None}
    fingerprint = run_fingerprint(args, runtime, cfg.max_steps)
    return _Run(runtime, raw, model, optimizer, Checkpointer(args.out, keep_last=cfg.keep_last), run_config,
                data_rng, state, clock, fingerprint, FiniteGuard(runtime.device))


def restore(run: _Run, args: PretrainArgs, inputs: _Inputs) -> bool:
    """With --resume, load the latest checkpoint in OUT into `run`. False when that run is complete (its
    done.json, and --max-steps reached): nothing to do."""
    out, cfg = args.out, args.train
    latest = run.ckpt.latest() if cfg.resume else None
    if latest is None:
        if cfg.resume:
            run.say(f"--resume: no checkpoint in {out}, starting from scratch")
        return True
    saved = json.loads((latest / "model" / "config.json").read_text())["model"]
    if saved != inputs.model_cfg.to_dict():
        diff = sorted(k for k in saved if saved[k] != inputs.model_cfg.to_dict().get(k))
        raise UserError(f"--resume: the checkpoint {latest} has a different model ({', '.join(diff)} "
                        "differ); pass the same shape flags as the run that wrote it")
    check_resume(run.ckpt.state_of(latest), run.fingerprint, latest)
    run.state = run.ckpt.load(latest, {"model": run.raw}, {"model": run.optimizer})
    run.state.pop("fingerprint", None)
    run.data_rng.bit_generator.state = run.state["data_rng"]
    run.clock.before = run.state["seconds"]
    run.say(f"resumed from {latest} at step {run.state['step']}")
    if run.state["step"] >= cfg.max_steps and (out / DONE).is_file():
        run.say(f"{out} is complete ({run.state['step']} steps, --max-steps {cfg.max_steps}): nothing to do")
        return False
    return True


def start(run: _Run, args: PretrainArgs, inputs: _Inputs) -> MetricsLog:
    """Mark OUT as not complete, write OUT/args.json, open the metrics log (cut back to the resumed step)."""
    out = args.out
    (out / DONE).unlink(missing_ok=True)  # about to train (further): the stage is not complete any more
    out.mkdir(parents=True, exist_ok=True)
    if run.runtime.is_main:
        write_args(out, args)
    log = MetricsLog(out / "metrics.jsonl", resume_step=run.state["step"], enabled=run.runtime.is_main,
                     report_to=args.train.report_to, stage="pretrain", config=to_dict(args))
    run.say(f"pretraining a {sum(p.numel() for p in run.raw.parameters()) / 1e6:.2f}M-parameter {args.arch} "
            f"model on {args.data} ({inputs.train_data.n_windows:,} train windows of {inputs.objective.window} "
            f"tokens) for {args.train.max_steps} steps on {run.runtime.device}")
    return log


# 3. the loop


def train_loop(run: _Run, log: MetricsLog, args: PretrainArgs, inputs: _Inputs) -> None:
    """Optimizer steps from the resumed step to --max-steps: metrics every --log-interval, val loss every
    --eval-interval, a checkpoint every --checkpoint-interval (and all three at the last step)."""
    cfg, runtime, state, objective, val_data = args.train, run.runtime, run.state, inputs.objective, inputs.val_data

    def validate() -> float:
        return evaluate(run.raw, val_data, args.eval_iters, cfg.batch_size, cfg.seed, runtime, objective)

    if state["step"] == 0 and val_data.n_windows:
        state["val_loss"] = validate()
        log.log(0, val_loss=state["val_loss"])
    flops_per_token = training_flops_per_token(run.raw, inputs.T)
    timer, tokens_since = Timer(runtime.device), 0
    with Progress(cfg.max_steps, "pretrain", start=state["step"], enabled=runtime.is_main) as bar:
        for step in range(state["step"], cfg.max_steps):
            micro = [sample_batch(objective, inputs.train_data, run.data_rng, cfg.batch_size, runtime)
                     for _ in range(cfg.grad_accum)]
            done = step + 1
            log_now = done % cfg.log_interval == 0 or done == cfg.max_steps
            stats = train_step(run.model, run.optimizer, micro, objective.loss_sum, objective.n_targets, cfg,
                               runtime, step, sync=log_now, guard=run.guard)
            eval_now = val_data.n_windows and (done % cfg.eval_interval == 0 or done == cfg.max_steps)
            save_now = done % cfg.checkpoint_interval == 0 or done == cfg.max_steps
            if log_now or eval_now or save_now:
                run.guard.check()  # a step skipped as not finite since the last check stops the run before any write
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
            if eval_now:
                state["val_loss"] = validate()
                record["val_loss"] = state["val_loss"]
                bar.print(f"step {done}: train loss {state['train_loss']:.4f}, val loss {state['val_loss']:.4f}")
                timer.lap()  # evaluation time is not training throughput
            if record:
                log.log(done, **record)
            if save_now:
                run.save(done)
                timer.lap()


# 4. the result


def finish(run: _Run, args: PretrainArgs) -> dict:
    """Export the model, write samples and, last, done.json (main rank); the summary, on every rank."""
    out, data, state = args.out, args.data, run.state
    run.ckpt.export(run.raw, extra={"stage": "pretrain", "objective": run.run_config["objective"]})
    if run.runtime.is_main and args.samples:
        # a sharded model generates only with every rank: rank 0 reads back the exported one
        model = load_model(out, device=run.runtime.device) if run.runtime.fsdp else run.raw
        write_samples(model, data, out, args.samples, args.train.seed)
    summary = {"stage": "pretrain", "step": args.train.max_steps, "val_loss": state["val_loss"],
               "train_loss": state["train_loss"], "tokens": state["tokens"], "seconds": round(run.clock.total(), 2)}
    if run.runtime.is_main:
        write_done(out, summary, tokenizer_from=data if (data / "tokenizer.json").is_file() else None)
        run.say(f"done: val loss {state['val_loss']}, {run.clock.total():.1f} s; wrote {out}")
    return summary
