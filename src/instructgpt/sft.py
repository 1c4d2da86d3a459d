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
the stage (set up, loop, choose and export).

    INIT/model.safetensors, config.json, tokenizer.json      (pretrain, import-hf, or an earlier SFT)
      -> OUT/model.safetensors, config.json, tokenizer.json  the SFT model (the next stages' --init/--policy)
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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from . import train
from .batching import IGNORE, EpochSampler, PretrainWindows, pack_batch, pad, to_device
from .chat import render, render_prompt, render_response, replies
from .checkpoint import DONE, Checkpointer, check_out, load_model, read_config, write_done
from .data import Example, Prompt, read_examples, read_prompts
from .distributed import prepare_model, rank_rows
from .errors import UserError
from .losses import token_cross_entropy
from .model import Seq2Seq, set_dropout
from .prepare import read_meta
from .tokenizer import Tokenizer
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
    answers = replies(model, tok, sel.prompts, False, sel.max_new_tokens, batch_size)
    return summarise(sel.labeler, sel.prompts, sel.records, answers)["labeler_score"]


# ----------------------------------------------------------------------------------------------------
# 6. The stage


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


def sft_command(
    init: Path,
    data: list[Path],
    out: Path,
    val_data: list[Path] | None = None,
    val_fraction: float = 0.05,
    epochs: float = 2.0,
    max_steps: int | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 3e-4,
    min_lr: float | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    dropout: float = 0.2,
    max_length: int | None = None,
    packing: bool = False,
    ptx_fraction: float = 0.0,
    ptx_data: Path | None = None,
    select_by: Literal["loss", "labeler"] = "loss",
    world: Path | None = None,
    select_prompts: int = 44,
    select_max_new_tokens: int = 32,
    eval_interval: int | None = None,
    checkpoint_interval: int | None = None,
    log_interval: int = 10,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    fsdp: bool = False,
    resume: bool = False,
    skip_invalid: bool = False,
) -> None:
    """Supervised fine-tuning on demonstrations (any instruction format the readers accept).

    Args:
        init: checkpoint folder to start from (pretrain output, an imported Hugging Face model, ...).
        data: instruction files (prompt/completion, messages, Alpaca, GSM8K, the world's demonstrations).
        out: stage folder to write (model.safetensors, config.json, tokenizer.json, metrics.jsonl, state).
        val_data: validation files; without them `val_fraction` of `data` is held out.
        val_fraction: share of `data` held out for the validation loss when no `val_data` is given.
        epochs: passes over the training examples (ignored when `max_steps` is given).
        max_steps: optimizer steps (default: epochs x examples / (batch_size x grad_accum x processes)).
        batch_size: examples per micro-batch and process (packed into fewer rows with `packing`).
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (linear warm-up, then a cosine down to `min_lr`).
        min_lr: learning rate at the end of the cosine (default lr / 10).
        warmup_steps: linear warm-up steps (default: 5% of the steps, at least 1).
        weight_decay: AdamW weight decay on matrices.
        grad_clip: clip the gradient norm to this (0 disables).
        dropout: residual dropout during fine-tuning (the paper used 0.2); the exported model keeps the
            dropout of `init` in its config, so later stages do not inherit it.
        max_length: longest example in tokens (default: the model's context); longer ones are truncated.
        packing: pack several examples per row (document mask, positions restart) instead of padding.
        ptx_fraction: share of each step's sequences drawn from pretraining shards (`ptx_data`); every
            token of a window is a target, weighted like a reply token. Under torchrun each process adds its
            share, rounded from its own batch.
        ptx_data: a `prepare` output folder written with the model's tokenizer, needed with `ptx_fraction`.
        select_by: which evaluation picks the exported checkpoint: "loss" (lowest validation loss) or
            "labeler" (highest labeler score of greedy replies to held-out world prompts; needs `world`).
        world: a world folder (`instructgpt world`), for `select_by labeler`.
        select_prompts: held-out world prompts the labeler judges at each evaluation.
        select_max_new_tokens: longest greedy reply to a selection prompt.
        eval_interval: evaluate every this many steps (default: once per epoch, at least 4 times a run).
        checkpoint_interval: resumable checkpoint every this many steps (default: at each evaluation).
        log_interval: metrics every this many steps.
        seed: seeds the validation split, the data order, dropout and the pretraining windows.
        device: auto, cpu, cuda or cuda:N.
        dtype: auto (bfloat16 on CUDA, float32 on CPU), float32 or bfloat16.
        compile: torch.compile the model (default: on for CUDA, off on CPU).
        fsdp: under torchrun, shard the model, gradients and optimizer state over the ranks (FSDP2) instead
            of replicating them (DDP).
        resume: continue from the latest checkpoint in `out`.
        skip_invalid: skip malformed records (and report how many) instead of stopping at the first.
    """
    t0 = time.time()
    init, out = Path(init), Path(out)

    # 1. check everything a user can get wrong, and read the data, before anything is written
    if not init.is_dir():
        raise UserError(f"--init {init}: no such folder (a pretrain or import-hf output)")
    if not 0 <= ptx_fraction < 1:
        raise UserError(f"--ptx-fraction must be in [0, 1), got {ptx_fraction}")
    if ptx_fraction > 0 and ptx_data is None:
        raise UserError("--ptx-fraction needs --ptx-data (a folder written by `instructgpt prepare`)")
    if not 0 <= dropout < 1:
        raise UserError(f"--dropout must be in [0, 1), got {dropout}")
    if select_by == "labeler" and world is None:
        raise UserError("--select-by labeler needs --world (a folder written by `instructgpt world`)")
    if select_by not in ("loss", "labeler"):
        raise UserError(f"--select-by must be 'loss' or 'labeler', got {select_by!r}")
    if select_by == "labeler" and not (Path(world) / "world.json").is_file():
        raise UserError(f"--world {world}: no world.json (a folder written by `instructgpt world`)")
    for name, value in (("--eval-interval", eval_interval), ("--checkpoint-interval", checkpoint_interval),
                        ("--select-prompts", select_prompts), ("--select-max-new-tokens", select_max_new_tokens)):
        if value is not None and value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    check_out(out, resume, "SFT")
    base = read_config(init)
    if base["kind"] not in ("gpt", "seq2seq"):
        raise UserError(f"{init}: SFT needs a language model, found a {base['kind']!r} checkpoint")
    tok = Tokenizer.load(init / "tokenizer.json")
    if tok.vocab_size > base["model"]["vocab_size"]:
        raise UserError(f"{init}: the tokenizer has {tok.vocab_size} tokens, more than the model's "
                        f"{base['model']['vocab_size']}")
    if ptx_data is not None and ptx_fraction > 0:
        read_meta(Path(ptx_data))
        check_same_tokenizer(tok, Path(ptx_data))
    examples = load_data(data, skip_invalid)
    if val_data:
        trn_ex, val_ex = examples, load_data(val_data, skip_invalid)
    else:
        trn_ex, val_ex = split_val(examples, val_fraction, seed)
    model = load_model(init)
    cfg = model.config
    seq2seq = isinstance(model, Seq2Seq)
    if packing and seq2seq:
        raise UserError("--packing is for decoder-only models")
    max_length = min(max_length or cfg.block_size, cfg.block_size)
    if max_length < 2:
        raise UserError(f"--max-length must be at least 2, got {max_length}")
    trn = encode_all(tok, trn_ex, max_length, seq2seq, "training data")
    val = encode_all(tok, val_ex, max_length, seq2seq, "validation data") if val_ex else []
    sel = None
    if select_by == "labeler":
        sel_prompts, sel_records = selection_prompts(Path(world), select_prompts, seed)
        sel = LabelerSelection(Labeler.load(world, seed=seed), sel_prompts, sel_records,
                               min(select_max_new_tokens, cfg.block_size // 2))

    # 2. runtime, schedule, model, optimizer
    base_dropout = cfg.dropout
    set_dropout(model, dropout)
    cfg.dropout = dropout
    tcfg = train.TrainConfig(
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps or 0,
        max_steps=max_steps or 1, weight_decay=weight_decay, grad_clip=grad_clip, seed=seed, device=device,
        dtype=dtype, compile=compile, log_interval=log_interval, fsdp=fsdp,
    )
    runtime = train.setup(tcfg)
    steps_per_epoch, total_steps = train.epoch_schedule(len(trn), epochs, max_steps, tcfg, runtime)
    if warmup_steps is None:
        tcfg.warmup_steps = max(1, round(0.05 * total_steps))
    eval_every = eval_interval or max(1, min(steps_per_epoch, math.ceil(total_steps / 4)))
    save_every = checkpoint_interval or eval_every
    fwd = prepare_model(model, runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(model, tcfg, runtime)
    sampler = EpochSampler(len(trn), seed)
    ptx = None
    n_ptx = 0  # pretraining windows per step on this rank
    if ptx_fraction > 0:
        ptx = PretrainWindows(Path(ptx_data), max_length, seed, tok.bos_id if seq2seq else None, tok.pad_id)
        n_ptx = max(1, round(batch_size * grad_accum * ptx_fraction / (1 - ptx_fraction)))

    metric = "labeler_score" if sel is not None else "val_loss"
    better = (lambda a, b: a > b) if sel is not None else (lambda a, b: a < b)
    selects = sel is not None or bool(val)
    ckpt = Checkpointer(out, keep_last=2)
    step, best = 0, {"metric": metric, "value": None, "step": 0}

    def say(message: str) -> None:
        if runtime.is_main:
            print(message)

    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step, best = state["step"], state["best"]
        sampler.restore(state["sampler"])
        if ptx:
            ptx.restore(state["ptx"])
        say(f"sft: resumed from {latest} at step {step}")
        if step >= total_steps and (out / DONE).is_file():
            say(f"sft: {out} is complete ({step} steps): nothing to do")
            return
    (out / DONE).unlink(missing_ok=True)  # about to train (further): the stage is not complete any more
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=runtime.is_main)

    def save_state(step: int) -> None:
        state = {"step": step, "best": best, "sampler": sampler.state()}
        if ptx:
            state["ptx"] = ptx.state()
        ckpt.save(step, {"model": model}, {"optimizer": optimizer}, state, extra_config={"stage": "sft"})

    W = runtime.world_size
    say(f"sft: {len(trn)} training and {len(val)} validation examples, {total_steps} steps of "
        f"{batch_size * grad_accum * W} examples{f' + {n_ptx * W} pretraining windows' if ptx else ''} "
        f"({total_steps / steps_per_epoch:.2f} epochs) on {runtime.device}{f' x {W} processes' if W > 1 else ''}; "
        f"the exported model is chosen by {metric if selects else 'nothing (no validation data): the last step'}")

    # 3. the loop (with the validation loss of the initial model first, as a baseline). Every rank draws the
    #    step's global batch and keeps its slice; every rank evaluates on the whole validation set (and the
    #    same selection prompts), so all of them agree on the best checkpoint.
    if step == 0 and val:
        log.write({"step": 0, "val_loss": mean_loss(model, val, tok.pad_id, batch_size, runtime)})
    progress = train.Progress(total_steps, "sft", start=step)
    model.train()
    while step < total_steps:
        micro = []
        for _ in range(grad_accum):
            items = [trn[i] for i in rank_rows(sampler.take(batch_size * W), runtime)]
            micro.append(to_device(make_batch(items, tok.pad_id, packing, max_length), runtime.device))
        for i in range(0, n_ptx, batch_size):
            windows = ptx.batch(W * min(batch_size, n_ptx - i))
            micro.append(to_device(rank_rows(windows, runtime), runtime.device))
        stats = train.train_step(fwd, optimizer, micro, sft_loss_sum, n_targets, tcfg, runtime, step)
        step += 1
        row = {"step": step, "epoch": round(step / steps_per_epoch, 4), **stats}
        if step % eval_every == 0 or step == total_steps:
            if val:
                row["val_loss"] = mean_loss(model, val, tok.pad_id, batch_size, runtime)
            if sel is not None:
                row["labeler_score"] = labeler_score(model, tok, sel, batch_size)
            if selects and (best["value"] is None or better(row[metric], best["value"])):
                best = {"metric": metric, "value": row[metric], "step": step}
                ckpt.save_best(model, best)
            progress.print(f"step {step}: loss {stats['loss']:.4f}"
                           + "".join(f", {k} {row[k]:.4f}" for k in ("val_loss", "labeler_score") if k in row))
        if step % log_interval == 0 or step % eval_every == 0 or step == total_steps:
            log.write(row)  # before the checkpoint, which keeps the rows up to its step on resume
        if step % save_every == 0 or step == total_steps:
            save_state(step)
        progress.update(step, stats)
    progress.close()

    # 4. choose and export the model (with the dropout of `init` in its config), then the completion marker
    final = ckpt.best_model_path() if selects else None
    if final is not None:
        model = load_model(final)
    model.config.dropout = base_dropout
    ckpt.export(model, extra={"stage": "sft", "selected_by": metric if selects else "last",
                              "selected_step": best["step"] if selects else step, "sft_dropout": dropout})
    if not runtime.is_main:
        return
    summary = {"stage": "sft", "steps": step, "examples": len(trn), "val_examples": len(val),
               "selected_by": metric if selects else "last", "selected_step": best["step"] if selects else step,
               "best": best["value"] if selects else None, "seconds": round(time.time() - t0, 2)}
    write_done(out, summary, tokenizer_from=init)
    print(json.dumps(summary))
