"""Supervised fine-tuning on demonstrations (InstructGPT step 1, paper section 3.5).

Every example goes through the one chat template; the loss is next-token cross-entropy on the assistant
replies and their end tokens only, normalised by the number of target tokens in the whole optimizer step
(over every rank under torchrun, where each rank trains on its slice of every batch).
Batches are padded, or packed (`--packing`): several examples share a row, never attend to each other,
and each restarts its positions at 0, so a packed batch has exactly the loss of the same examples padded.
`--ptx-fraction` mixes pretraining windows into every step (the paper's PPO initialisation was SFT with
10% pretraining data). An encoder-decoder model reads the prompt with its encoder and learns the reply,
after <|bos|>, with its decoder.

The paper trained 16 epochs with residual dropout 0.2 and a cosine learning rate, and chose the final
model by the reward model's score on a validation set, noting that validation loss overfits after one
epoch while the human preference keeps improving. Here the final checkpoint is the one with the lowest
validation loss, or, with `--select-by labeler --world DIR`, the one whose greedy replies to a few
held-out world prompts the scripted labeler scores highest.

Reads top to bottom: encode the data -> batches -> the loss -> pretraining windows -> model selection ->
the stage (its arguments, the checks, set up, loop, choose and export).

    INIT/model.safetensors, config.json, tokenizer.json      (pretrain, import-hf, or an earlier SFT)
      -> OUT/model.safetensors, config.json, tokenizer.json  the SFT model (the next stages' --init/--policy)
         OUT/adapter/                                        with --lora-rank: the adapter alone (PEFT's format)
         OUT/best/                                           the best checkpoint so far, with best.json
         OUT/checkpoints/step_NNNNNNN/                       resumable state (weights, optimizer, RNG, data)
         OUT/metrics.jsonl                                   loss, lr, val_loss, labeler_score, ...
         OUT/done.json                                       written last: the stage completed
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from . import finetune, train
from .batching import IGNORE, EpochSampler, PretrainWindows, pack_batch, pad, to_device
from .chat import render, render_prompt, render_response, replies
from .checkpoint import DONE, Checkpointer, check_out, load_model, read_config, read_done, write_done, writing
from .data import Example, Prompt, read_examples, read_prompts
from .distributed import Runtime, prepare_model, rank_rows
from .errors import UserError
from .lora import LoRAConfig
from .losses import token_cross_entropy
from .model import Seq2Seq, set_dropout
from .prepare import read_meta
from .recipe import to_dict, write_args
from .resume import check_resume, run_fingerprint
from .tokenizer import Tokenizer
from .train import TrainConfig
from .world.judge import summarise
from .world.labeler import Labeler
from .world.world import FAMILIES, World, sample_prompt

# ----------------------------------------------------------------------------------------------------
# 1. Encode the data


@dataclass
class Encoded:
    """One example as token ids: decoder-only `ids` with `labels` (IGNORE where not trained, already
    shifted: labels[t] is the target for ids[t]); for seq2seq also the encoder's `src`."""

    ids: list[int]
    labels: list[int]
    src: list[int] | None = None
    truncated: bool = False  # the rendered example was longer than max_length: its end token is not trained


def encode_example(tok: Tokenizer, ex: Example, max_length: int, seq2seq: bool = False) -> Encoded | None:
    """Render one demonstration; None when nothing trainable fits in `max_length` tokens.

    Decoder-only: the whole conversation, every assistant reply and its <|eos|> trained. Seq2seq: the
    encoder reads the conversation up to the last reply (ending with <|assistant|>), the decoder reads
    <|bos|> + reply and is trained on reply + <|eos|>."""
    if seq2seq:
        src = render_prompt(tok, ex.messages[:-1])
        if len(src) > max_length:
            return None
        tgt = [tok.bos_id] + render_response(tok, ex.messages[-1]["content"])
        return Encoded(ids=tgt[:-1][:max_length], labels=tgt[1:][:max_length], src=src,
                       truncated=len(tgt) > max_length + 1)
    ids, mask = render(tok, ex.messages)
    truncated = len(ids) > max_length + 1
    ids, mask = ids[: max_length + 1], mask[: max_length + 1]
    if not any(mask[1:]):
        return None
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    return Encoded(ids=ids[:-1], labels=labels, truncated=truncated)


def encode_all(tok: Tokenizer, examples: list[Example], max_length: int, seq2seq: bool, source: str) -> list[Encoded]:
    out = [encode_example(tok, ex, max_length, seq2seq) for ex in examples]
    kept = [e for e in out if e is not None]
    dropped = len(out) - len(kept)
    truncated = sum(e.truncated for e in kept)
    if dropped:
        what = "a prompt longer than" if seq2seq else "no reply token within"
        print(f"sft: {source}: {dropped} of {len(out)} example(s) have {what} {max_length} tokens "
              "and are left out")
    if truncated:
        print(f"sft: {source}: {truncated} of {len(kept)} example(s) are cut at {max_length} tokens "
              "(their end token is not trained); raise --max-length if the model's context allows")
    if not kept:
        raise UserError(f"{source}: no example has a trainable reply within {max_length} tokens")
    return kept


# ----------------------------------------------------------------------------------------------------
# 2. Batches


def pad_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels and attention mask (B, T); seq2seq adds src and src_mask (B, S)."""
    ids, mask = pad([e.ids for e in items], pad_id)
    labels, _ = pad([e.labels for e in items], IGNORE)
    batch = {"ids": ids, "labels": labels, "attention_mask": mask}
    if items[0].src is not None:
        batch["src"], batch["src_mask"] = pad([e.src for e in items], pad_id)
    return batch


def make_batch(items: list[Encoded], pad_id: int, packing: bool, row_length: int) -> dict[str, torch.Tensor]:
    return pack_batch(items, pad_id, row_length) if packing else pad_batch(items, pad_id)


# ----------------------------------------------------------------------------------------------------
# 3. The loss


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (B, T, V) of a padded, packed or pretraining batch.

    Padded batches are padded on the right, so plain causal attention is exact for every real token (the
    padding comes after it) and positions are 0..n-1 with or without the mask: the decoder gets no mask,
    which keeps the fast causal kernel. Packed rows need their segment mask and restarted positions."""
    if "src" in batch:
        return model(batch["src"], batch["ids"], src_mask=batch["src_mask"])
    if "segment_ids" in batch:
        return model(batch["ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    return model(batch["ids"])


def sft_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over target tokens of -log p(target): prompt and padding positions carry IGNORE labels."""
    return token_cross_entropy(logits_of(model, batch), batch["labels"], ignore_index=IGNORE)


def n_targets(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())


@torch.no_grad()
def mean_loss(model: nn.Module, data: list[Encoded], pad_id: int, batch_size: int, runtime) -> float:
    """Per-token validation loss over `data`, in fixed order, without dropout."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = to_device(pad_batch(data[i : i + batch_size], pad_id), runtime.device)
        with runtime.autocast():
            total += float(sft_loss_sum(model, batch))
        count += n_targets(batch)
    model.train(was)
    return total / max(count, 1)


# ----------------------------------------------------------------------------------------------------
# 4. Pretraining windows for --ptx-fraction


def check_same_tokenizer(tok: Tokenizer, data_dir: Path) -> None:
    """The pretraining shards must be token ids of the model's own tokenizer."""
    other_file = Path(data_dir) / "tokenizer.json"
    meta = json.loads((Path(data_dir) / "meta.json").read_text())
    same = int(meta.get("vocab_size", -1)) == tok.vocab_size
    if same and other_file.is_file():
        other = Tokenizer.load(other_file)
        same = all(tok.id_to_token(i) == other.id_to_token(i) for i in range(tok.vocab_size))
    if not same:
        raise UserError(f"--ptx-data {data_dir}: its shards were written with another tokenizer than the "
                        f"model's ({meta.get('vocab_size')} vs {tok.vocab_size} tokens, or different tokens); "
                        "prepare them with --tokenizer-path INIT/tokenizer.json")


# ----------------------------------------------------------------------------------------------------
# 5. Model selection by the labeler: greedy replies to held-out world prompts, scored


@dataclass
class LabelerSelection:
    """The labeler and the prompts it judges at every evaluation."""

    labeler: Labeler
    prompts: list[Prompt]
    records: list[dict]  # {"prompt", "family", "meta", "id"}: what the labeler needs
    max_new_tokens: int


def selection_prompts(world_dir: Path, n: int, seed: int) -> tuple[list[Prompt], list[dict]]:
    """`n` prompts about the world's held-out content (people, words and sums no training prompt uses),
    the task families in turn, none of them in WORLD/prompts_eval.jsonl: choosing the model must not peek
    at the prompts the evaluation reports."""
    world = World.load(world_dir)
    eval_file = Path(world_dir) / "prompts_eval.jsonl"
    taken = {p.messages[-1]["content"] for p in read_prompts(eval_file)} if eval_file.is_file() else set()
    rng = random.Random(f"sft-selection-{seed}")
    prompts, records = [], []
    for i in range(n):
        family = FAMILIES[i % len(FAMILIES)]
        for _ in range(50):
            rec = sample_prompt(world, family, rng, heldout=True)
            if rec["prompt"] not in taken:
                break
        else:
            continue  # every draw of this family is an evaluation prompt: leave the family out this time
        taken.add(rec["prompt"])
        rec["id"] = f"select-{i:05d}"
        records.append(rec)
        prompts.append(Prompt([{"role": "user", "content": rec["prompt"]}],
                              {"family": rec["family"], "meta": rec["meta"], "id": rec["id"]}))
    if not prompts:
        raise UserError(f"--world {world_dir}: found no held-out prompt outside prompts_eval.jsonl")
    return prompts, records


def labeler_score(model: nn.Module, tok: Tokenizer, sel: LabelerSelection, batch_size: int) -> float:
    """The labeler's mean score of the model's greedy replies to the selection prompts."""
    answers = replies(model, tok, sel.prompts, None, sel.max_new_tokens, batch_size)
    return summarise(sel.labeler, sel.prompts, sel.records, answers)["labeler_score"]


# ----------------------------------------------------------------------------------------------------
# 6. The stage


@dataclass
class SFTArgs:
    """The arguments of `instructgpt sft`."""

    init: Path  # checkpoint folder to start from (pretrain output, an imported Hugging Face model, ...)
    data: list[Path]  # instruction files (prompt/completion, messages, Alpaca, GSM8K, the world's demonstrations)
    out: Path  # stage folder to write (model.safetensors, config.json, tokenizer.json, metrics.jsonl, state)
    val_data: list[Path] | None = None  # validation files; without them --val-fraction of --data is held out
    val_fraction: float = 0.05  # share of --data held out for the validation loss when no --val-data is given
    epochs: float = 2.0  # passes over the training examples (ignored when --max-steps is given)
    # residual dropout during fine-tuning (the paper used 0.2); the exported model keeps the dropout of --init in
    # its config, so later stages do not inherit it
    dropout: float = 0.2
    max_length: int | None = None  # longest example in tokens (None: the model's context); longer ones are cut
    packing: bool = False  # pack several examples per row (document mask, positions restart) instead of padding
    # share of each step's sequences drawn from pretraining shards (--ptx-data); every token of a window is a
    # target, weighted like a reply token. Under torchrun each process adds its share, rounded from its own batch
    ptx_fraction: float = 0.0
    ptx_data: Path | None = None  # a `prepare` output folder written with the model's tokenizer, for --ptx-fraction
    # which evaluation picks the exported checkpoint: "loss" (lowest validation loss) or "labeler" (highest labeler
    # score of greedy replies to held-out world prompts; needs --world)
    select_by: Literal["loss", "labeler"] = "loss"
    world: Path | None = None  # a world folder (`instructgpt world`), for --select-by labeler
    select_prompts: int = 44  # held-out world prompts the labeler judges at each evaluation
    select_max_new_tokens: int = 32  # longest greedy reply to a selection prompt
    skip_invalid: bool = False  # skip malformed records (and report how many) instead of stopping at the first
    # the shared training settings, with SFT's defaults. Left at None, the step count is epochs x examples over
    # the examples of a step (batch size x grad accum x processes), the warm-up 5% of the steps (at least 1), the
    # evaluation once per epoch but at least 4 times a run, the checkpoint at each evaluation. The batch size
    # counts examples per micro-batch and process (packed into fewer rows with --packing); the seed seeds the
    # validation split, the data order, dropout and the pretraining windows
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=16, grad_accum=1, lr=3e-4, min_lr=None, warmup_steps=None, max_steps=None, weight_decay=0.0,
        beta1=0.9, beta2=0.95, grad_clip=1.0, seed=1337, eval_interval=None, checkpoint_interval=None, keep_last=2,
        log_interval=10,
    ))


def check_args(args: SFTArgs) -> None:
    """Every argument a user can get wrong, before anything is read or written (UserError naming the flag)."""
    if not args.init.is_dir():
        raise UserError(f"--init {args.init}: no such folder (a pretrain or import-hf output)")
    if not 0 <= args.ptx_fraction < 1:
        raise UserError(f"--ptx-fraction must be in [0, 1), got {args.ptx_fraction}")
    if args.ptx_fraction > 0 and args.ptx_data is None:
        raise UserError("--ptx-fraction needs --ptx-data (a folder written by `instructgpt prepare`)")
    if not 0 <= args.dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.select_by == "labeler" and args.world is None:
        raise UserError("--select-by labeler needs --world (a folder written by `instructgpt world`)")
    if args.select_by not in ("loss", "labeler"):
        raise UserError(f"--select-by must be 'loss' or 'labeler', got {args.select_by!r}")
    if args.select_by == "labeler" and not (Path(args.world) / "world.json").is_file():
        raise UserError(f"--world {args.world}: no world.json (a folder written by `instructgpt world`)")
    for name, value in (("--select-prompts", args.select_prompts),
                        ("--select-max-new-tokens", args.select_max_new_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    args.train.validate()  # the shared settings: --lr, --batch-size, --eval-interval, ...
    check_out(args.out, args.train.resume, "SFT")


def load_data(paths: list[Path], skip_invalid: bool) -> list[Example]:
    examples: list[Example] = []
    for p in paths:
        examples.extend(read_examples(p, skip_invalid=skip_invalid))
    return examples


def split_val(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng([seed, 11]).permutation(len(examples))
    n_val = int(round(len(examples) * val_fraction))
    if val_fraction > 0 and len(examples) >= 2:
        n_val = max(1, n_val)
    val = [examples[i] for i in order[:n_val]]
    trn = [examples[i] for i in order[n_val:]]
    if not trn:
        raise UserError("no training examples left after the validation split")
    return trn, val


@dataclass
class Inputs:
    """What the stage reads before it writes anything: the model to fine-tune, its tokenizer, the encoded
    examples and the labeler's selection prompts."""

    model: nn.Module
    tok: Tokenizer
    seq2seq: bool
    max_length: int
    trn: list[Encoded]
    val: list[Encoded]
    sel: LabelerSelection | None


def read_inputs(args: SFTArgs) -> Inputs:
    """Read and check INIT, the pretraining shards, the data and the world: every error before a file is written."""
    base = read_config(args.init)
    if base["kind"] not in ("gpt", "seq2seq"):
        raise UserError(f"{args.init}: SFT needs a language model, found a {base['kind']!r} checkpoint")
    tok = Tokenizer.load(args.init / "tokenizer.json")
    if tok.vocab_size > base["model"]["vocab_size"]:
        raise UserError(f"{args.init}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                        f"{base['model']['vocab_size']}")
    if args.ptx_data is not None and args.ptx_fraction > 0:
        read_meta(Path(args.ptx_data))
        check_same_tokenizer(tok, Path(args.ptx_data))
    seed = args.train.seed
    examples = load_data(args.data, args.skip_invalid)
    if args.val_data:
        trn_ex, val_ex = examples, load_data(args.val_data, args.skip_invalid)
    else:
        trn_ex, val_ex = split_val(examples, args.val_fraction, seed)
    model = load_model(args.init)
    cfg = model.config
    seq2seq = isinstance(model, Seq2Seq)
    if args.packing and seq2seq:
        raise UserError("--packing is for decoder-only models")
    max_length = min(args.max_length or cfg.block_size, cfg.block_size)
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    trn = encode_all(tok, trn_ex, max_length, seq2seq, "training data")
    val = encode_all(tok, val_ex, max_length, seq2seq, "validation data") if val_ex else []
    sel = None
    if args.select_by == "labeler":
        sel_prompts, sel_records = selection_prompts(Path(args.world), args.select_prompts, seed)
        sel = LabelerSelection(Labeler.load(args.world, seed=seed), sel_prompts, sel_records,
                               min(args.select_max_new_tokens, cfg.block_size // 2))
    return Inputs(model, tok, seq2seq, max_length, trn, val, sel)


@dataclass
class Run:
    """The training run set up: runtime, resolved schedule, optimizer, data streams, checkpoints, selection."""

    runtime: Runtime
    tcfg: TrainConfig  # args.train with max_steps and warmup_steps resolved
    steps_per_epoch: int
    eval_every: int
    save_every: int
    fwd: nn.Module  # what the loop calls: DDP, FSDP or the model itself
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    ptx: PretrainWindows | None
    n_ptx: int  # pretraining windows per step on this rank
    ckpt: Checkpointer
    metric: str  # what picks the exported model: "val_loss" or "labeler_score"
    selects: bool  # whether anything picks it (False: no validation data, the last step is exported)
    base_dropout: float  # the dropout of INIT, which the exported config keeps
    fingerprint: dict  # the data and settings a resumed run must share with this one (`resume.check_resume`)
    lora: LoRAConfig | None  # the adapters that train over the frozen INIT; None: every weight trains

    @property
    def total_steps(self) -> int:
        return self.tcfg.max_steps


def set_up(args: SFTArgs, inp: Inputs) -> Run:
    """Dropout, runtime, the resolved schedule, DDP/FSDP, optimizer, the data order and the pretraining windows."""
    model, cfg = inp.model, inp.model.config
    base_dropout = cfg.dropout
    set_dropout(model, args.dropout)
    cfg.dropout = args.dropout
    # The number of steps depends on the number of processes, which `setup` finds: set up with placeholders
    # (setup only checks and seeds), then resolve --max-steps and --warmup-steps from the runtime.
    tcfg = replace(args.train, max_steps=args.train.max_steps or 1, warmup_steps=args.train.warmup_steps or 0)
    runtime = train.setup(tcfg)
    steps_per_epoch, total_steps = train.epoch_schedule(len(inp.trn), args.epochs, args.train.max_steps, tcfg,
                                                        runtime)
    if args.train.warmup_steps is None:
        tcfg = replace(tcfg, warmup_steps=max(1, round(0.05 * total_steps)))
    eval_every = tcfg.eval_interval or max(1, min(steps_per_epoch, math.ceil(total_steps / 4)))
    lora = finetune.prepare(model, tcfg)  # LoRA adapters and activation checkpointing, as the flags say
    fwd = prepare_model(model, runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(model, tcfg, runtime)
    sampler = EpochSampler(len(inp.trn), tcfg.seed)
    ptx, n_ptx = None, 0
    if args.ptx_fraction > 0:
        ptx = PretrainWindows(Path(args.ptx_data), inp.max_length, tcfg.seed, inp.tok.bos_id if inp.seq2seq else None,
                              inp.tok.pad_id)
        n_ptx = max(1, round(tcfg.batch_size * tcfg.grad_accum * args.ptx_fraction / (1 - args.ptx_fraction)))
    ckpt = Checkpointer(args.out, keep_last=tcfg.keep_last, weights=finetune.checkpoint_weights(lora))
    fingerprint = run_fingerprint(args, runtime, total_steps,
                                  extra={"pretraining windows per step": n_ptx * runtime.world_size})
    return Run(runtime, tcfg, steps_per_epoch, eval_every, tcfg.checkpoint_interval or eval_every, fwd, optimizer,
               sampler, ptx, n_ptx, ckpt, "labeler_score" if inp.sel is not None else "val_loss",
               inp.sel is not None or bool(inp.val), base_dropout, fingerprint, lora)


def say(run: Run, message: str) -> None:
    if run.runtime.is_main:
        print(message)


def restore(args: SFTArgs, inp: Inputs, run: Run) -> tuple[int, dict]:
    """(step, best evaluation so far): from the latest checkpoint with --resume, else the start."""
    step, best = 0, {"metric": run.metric, "value": None, "step": 0}
    if args.train.resume and (latest := run.ckpt.latest()) is not None:
        check_resume(run.ckpt.state_of(latest), run.fingerprint, latest)
        state = run.ckpt.load(latest, {"model": inp.model}, {"optimizer": run.optimizer})
        step, best = state["step"], state["best"]
        run.sampler.restore(state["sampler"])
        if run.ptx:
            run.ptx.restore(state["ptx"])
        say(run, f"sft: resumed from {latest} at step {step}")
    return step, best


def save_state(inp: Inputs, run: Run, step: int, best: dict) -> None:
    state = {"step": step, "best": best, "sampler": run.sampler.state(), "fingerprint": run.fingerprint}
    if run.ptx:
        state["ptx"] = run.ptx.state()
    run.ckpt.save(step, {"model": inp.model}, {"optimizer": run.optimizer}, state, extra_config={"stage": "sft"})


def announce(inp: Inputs, run: Run) -> None:
    W, tcfg = run.runtime.world_size, run.tcfg
    ptx = f" + {run.n_ptx * W} pretraining windows" if run.ptx else ""
    procs = f" x {W} processes" if W > 1 else ""
    chosen = run.metric if run.selects else "nothing (no validation data): the last step"
    say(run, f"sft: {len(inp.trn)} training and {len(inp.val)} validation examples, {run.total_steps} steps of "
        f"{tcfg.batch_size * tcfg.grad_accum * W} examples{ptx} ({run.total_steps / run.steps_per_epoch:.2f} "
        f"epochs) on {run.runtime.device}{procs}; the exported model is chosen by {chosen}")
    say(run, f"sft: {finetune.describe(inp.model, run.lora)}")


def train_loop(args: SFTArgs, inp: Inputs, run: Run, log: train.MetricsLog, step: int, best: dict) -> tuple[int, dict]:
    """Train from `step` to the end; returns the last step and the best evaluation.

    The validation loss of the initial model comes first, as a baseline. Every rank draws the step's global batch
    and keeps its slice; every rank evaluates on the whole validation set (and the same selection prompts), so
    all of them agree on the best checkpoint."""
    runtime, tcfg, model, tok, W = run.runtime, run.tcfg, inp.model, inp.tok, run.runtime.world_size
    bs, total = tcfg.batch_size, run.total_steps
    better = (lambda a, b: a > b) if inp.sel is not None else (lambda a, b: a < b)
    if step == 0 and inp.val:
        log.write({"step": 0, "val_loss": mean_loss(model, inp.val, tok.pad_id, bs, runtime)})
    progress = train.Progress(total, "sft", start=step)
    model.train()
    while step < total:
        micro = []
        for _ in range(tcfg.grad_accum):
            items = [inp.trn[i] for i in rank_rows(run.sampler.take(bs * W), runtime)]
            micro.append(to_device(make_batch(items, tok.pad_id, args.packing, inp.max_length), runtime.device))
        for i in range(0, run.n_ptx, bs):
            windows = run.ptx.batch(W * min(bs, run.n_ptx - i))
            micro.append(to_device(rank_rows(windows, runtime), runtime.device))
        stats = train.train_step(run.fwd, run.optimizer, micro, sft_loss_sum, n_targets, tcfg, runtime, step)
        step += 1
        row = {"step": step, "epoch": round(step / run.steps_per_epoch, 4), **stats}
        if step % run.eval_every == 0 or step == total:
            if inp.val:
                row["val_loss"] = mean_loss(model, inp.val, tok.pad_id, bs, runtime)
            if inp.sel is not None:
                row["labeler_score"] = labeler_score(model, tok, inp.sel, bs)
            if run.selects and (best["value"] is None or better(row[run.metric], best["value"])):
                best = {"metric": run.metric, "value": row[run.metric], "step": step}
                run.ckpt.save_best(model, best)
            progress.print(f"step {step}: loss {stats['loss']:.4f}"
                           + "".join(f", {k} {row[k]:.4f}" for k in ("val_loss", "labeler_score") if k in row))
        if step % tcfg.log_interval == 0 or step % run.eval_every == 0 or step == total:
            log.write(row)  # before the checkpoint, which keeps the rows up to its step on resume
        if step % run.save_every == 0 or step == total:
            save_state(inp, run, step, best)
        progress.update(step, stats)
    progress.close()
    return step, best


def finish(args: SFTArgs, inp: Inputs, run: Run, step: int, best: dict, t0: float) -> dict:
    """Export the chosen model (with the dropout of INIT in its config; merged, and its adapter alone, with LoRA),
    then the completion marker."""
    final = run.ckpt.best_model_path() if run.selects else None
    if final is not None and run.lora is not None:  # the chosen step's adapters, over the frozen INIT
        run.ckpt.load_best(inp.model)
    model = load_model(final) if final is not None and run.lora is None else inp.model
    model.config.dropout = run.base_dropout
    selected_by = run.metric if run.selects else "last"
    selected_step = best["step"] if run.selects else step
    run.ckpt.export(model, extra={"stage": "sft", "selected_by": selected_by, "selected_step": selected_step,
                                  "sft_dropout": args.dropout,
                                  **finetune.lora_record(run.lora, args.init, run.fingerprint["--init"])})
    finetune.write_adapter(model, run.lora, args.init, args.out, log=lambda m: say(run, m))
    summary = {"stage": "sft", "steps": step, "examples": len(inp.trn), "val_examples": len(inp.val),
               "selected_by": selected_by, "selected_step": selected_step,
               "best": best["value"] if run.selects else None, "seconds": round(time.time() - t0, 2)}
    if run.runtime.is_main:
        write_done(args.out, summary, tokenizer_from=args.init)
        print(json.dumps(summary))
    return summary


def sft_command(args: SFTArgs) -> dict:
    """Supervised fine-tuning on demonstrations (any instruction format the readers accept).

    Fine-tunes --init on --data and exports to --out the checkpoint that --select-by chooses."""
    # returns the summary written to OUT/done.json (the finished run's, when --resume finds nothing to do)
    t0 = time.time()
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        # 1. check everything a user can get wrong, and read the data, before anything is written
        check_args(args)
        inp = read_inputs(args)

        # 2. runtime, schedule, model, optimizer
        run = set_up(args, inp)

        # 3. resume, or start the run's files (a finished run with nothing left to do keeps its own)
        step, best = restore(args, inp, run)
        if step >= run.total_steps and (args.out / DONE).is_file():
            say(run, f"sft: {args.out} is complete ({step} steps): nothing to do")
            return read_done(args.out)
        (args.out / DONE).unlink(missing_ok=True)  # about to train (further): the stage is not complete any more
        args.out.mkdir(parents=True, exist_ok=True)
        if run.runtime.is_main:
            write_args(args.out, args)
        log = train.MetricsLog(args.out / "metrics.jsonl", resume_step=step, enabled=run.runtime.is_main,
                               report_to=run.tcfg.report_to, stage="sft", config=to_dict(args))
        announce(inp, run)

        # 4. the loop
        step, best = train_loop(args, inp, run, log, step, best)
        log.close()

        # 5. choose and export the model, then the completion marker
        return finish(args, inp, run, step, best, t0)
