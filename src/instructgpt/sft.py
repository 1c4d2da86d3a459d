"""Supervised fine-tuning on demonstrations (InstructGPT step 1, paper section 3.5).

Every example goes through the one chat template; the loss is next-token cross-entropy on the assistant
replies and their end tokens only, normalised by the number of target tokens in the whole optimizer step.
Batches are padded, or packed (`--packing`): several examples share a row, never attend to each other,
and each restarts its positions at 0. `--ptx-fraction` mixes pretraining windows into every step (the
paper's PPO initialisation was SFT with 10% pretraining data). An encoder-decoder model reads the prompt
with its encoder and learns the reply with its decoder.

Reads top to bottom: encode the data -> batches -> the loss -> the loop -> choose and export the model.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import train
from .chat import render, render_prompt, render_response
from .checkpoint import load_model, read_config
from .data import Example, read_examples
from .errors import UserError
from .model import Seq2Seq
from .tokenizer import Tokenizer

IGNORE = -100


# ----------------------------------------------------------------------------------------------------
# 1. Encode the data


@dataclass
class Encoded:
    """One example as token ids: decoder-only `ids` with `labels` (IGNORE where not trained, already
    shifted: labels[t] is the target for ids[t]); for seq2seq also the encoder's `src`."""

    ids: list[int]
    labels: list[int]
    src: list[int] | None = None


def encode_example(tok: Tokenizer, ex: Example, max_length: int, seq2seq: bool = False) -> Encoded | None:
    """Render one demonstration; None when nothing trainable fits in `max_length` tokens."""
    if seq2seq:
        src = render_prompt(tok, ex.messages[:-1])
        reply = render_response(tok, ex.messages[-1]["content"])
        if len(src) > max_length:
            return None
        tgt = ([tok.bos_id] + reply)[: max_length + 1]
        return Encoded(ids=tgt[:-1], labels=tgt[1:], src=src)
    ids, mask = render(tok, ex.messages)
    ids, mask = ids[: max_length + 1], mask[: max_length + 1]
    labels = [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]
    if not any(m for m in mask[1:]):
        return None
    return Encoded(ids=ids[:-1], labels=labels)


def encode_all(tok: Tokenizer, examples: list[Example], max_length: int, seq2seq: bool, source: str) -> list[Encoded]:
    out = [encode_example(tok, ex, max_length, seq2seq) for ex in examples]
    kept = [e for e in out if e is not None]
    dropped = len(out) - len(kept)
    if dropped:
        print(f"sft: {source}: {dropped} of {len(out)} example(s) have no reply token within {max_length} tokens "
              "and are left out")
    if not kept:
        raise UserError(f"{source}: no example has a trainable reply within {max_length} tokens")
    return kept


# ----------------------------------------------------------------------------------------------------
# 2. Batches


def pad_batch(items: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, labels and attention mask (B, T); seq2seq adds src and src_mask (B, S)."""
    T = max(len(e.ids) for e in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, e in enumerate(items):
        n = len(e.ids)
        ids[i, :n] = torch.tensor(e.ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"ids": ids, "labels": labels, "attention_mask": mask}
    if items[0].src is not None:
        S = max(len(e.src) for e in items)
        src = torch.full((B, S), pad_id, dtype=torch.long)
        src_mask = torch.zeros((B, S), dtype=torch.long)
        for i, e in enumerate(items):
            src[i, : len(e.src)] = torch.tensor(e.src)
            src_mask[i, : len(e.src)] = 1
        batch |= {"src": src, "src_mask": src_mask}
    return batch


def pack_batch(items: list[Encoded], pad_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Examples laid end to end in rows of `row_length` (first fit, in order; an example never spans two
    rows). `segment_ids` keep examples from attending to each other; `position_ids` restart at 0 for each
    example. Padding gets its own segment (-1) and no label."""
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for e in items:
        for r, free in enumerate(room):
            if len(e.ids) <= free:
                rows[r].append(e)
                room[r] -= len(e.ids)
                break
        else:
            rows.append([e])
            room.append(row_length - len(e.ids))
    B = len(rows)
    T = max(row_length - free for free in room)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seg = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    for r, row in enumerate(rows):
        t = 0
        for s, e in enumerate(row):
            n = len(e.ids)
            ids[r, t : t + n] = torch.tensor(e.ids)
            labels[r, t : t + n] = torch.tensor(e.labels)
            seg[r, t : t + n] = s
            pos[r, t : t + n] = torch.arange(n)
            t += n
    return {"ids": ids, "labels": labels, "segment_ids": seg, "position_ids": pos}


def make_batch(items: list[Encoded], pad_id: int, packing: bool, row_length: int) -> dict[str, torch.Tensor]:
    return pack_batch(items, pad_id, row_length) if packing else pad_batch(items, pad_id)


class EpochSampler:
    """Shuffled passes over the examples, with a position that a checkpoint saves and restores exactly."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm(0)

    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm(self.epoch)
            take = min(k - len(out), self.n - self.pos)
            out.extend(self._order[self.pos : self.pos + take].tolist())
            self.pos += take
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def restore(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm(self.epoch)


# ----------------------------------------------------------------------------------------------------
# 3. The loss


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def logits_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "src" in batch:
        return model(batch["src"], batch["ids"], src_mask=batch["src_mask"], tgt_mask=batch["attention_mask"])
    if "segment_ids" in batch:
        return model(batch["ids"], position_ids=batch["position_ids"], segment_ids=batch["segment_ids"])
    return model(batch["ids"], attention_mask=batch.get("attention_mask"))


def sft_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over target tokens of -log p(target): prompt and padding positions carry IGNORE labels."""
    return train.token_cross_entropy(logits_of(model, batch), batch["labels"], ignore_index=IGNORE)


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


class PretrainWindows:
    """Random windows of `block_size + 1` tokens from prepared shards, as an SFT-shaped batch."""

    def __init__(self, data_dir: Path, block_size: int, seed: int):
        from .prepare import load_shards

        meta, self.shards, _ = load_shards(data_dir)
        self.shards = [s for s in self.shards if len(s) > block_size + 1]
        if not self.shards:
            raise UserError(f"{data_dir}: no train shard is longer than one window of {block_size + 1} tokens")
        self.block_size = block_size
        self.rng = np.random.default_rng([seed, 7])

    def batch(self, n: int) -> dict[str, torch.Tensor]:
        shard_ix = self.rng.integers(len(self.shards), size=n)
        rows = []
        for s in shard_ix:
            shard = self.shards[s]
            start = int(self.rng.integers(len(shard) - self.block_size - 1))
            rows.append(np.asarray(shard[start : start + self.block_size + 1], dtype=np.int64))
        w = torch.from_numpy(np.stack(rows))
        return {"ids": w[:, :-1], "labels": w[:, 1:]}

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def restore(self, state: dict) -> None:
        self.rng.bit_generator.state = state


# ----------------------------------------------------------------------------------------------------
# 5. The stage


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
    warmup_steps: int = 20,
    weight_decay: float = 0.0,
    dropout: float = 0.2,
    max_length: int | None = None,
    packing: bool = False,
    ptx_fraction: float = 0.0,
    ptx_data: Path | None = None,
    log_interval: int = 10,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    resume: bool = False,
    skip_invalid: bool = False,
) -> None:
    """Supervised fine-tuning on demonstrations (any instruction format the readers accept).

    Args:
        init: checkpoint folder to start from (pretrain output, an imported Hugging Face model, ...).
        data: instruction files (prompt/completion, messages, Alpaca, GSM8K, the world's demonstrations).
        out: stage folder to write (model.safetensors, config.json, tokenizer.json, metrics.jsonl, state).
        val_data: validation files; without them `val_fraction` of `data` is held out.
        epochs: passes over the training examples (ignored when `max_steps` is given).
        dropout: residual dropout during fine-tuning (the paper used 0.2).
        max_length: longest example in tokens (default: the model's context); longer ones are truncated.
        packing: pack several examples per row (document mask, positions restart) instead of padding.
        ptx_fraction: share of each step's sequences drawn from pretraining shards (`ptx_data`).
        ptx_data: a `prepare` output folder, needed with `ptx_fraction`.
        resume: continue from the latest checkpoint in `out`.
        skip_invalid: skip malformed records (and report how many) instead of stopping at the first.
    """
    t0 = time.time()
    init, out = Path(init), Path(out)
    if (out / "done.json").exists() and not resume:
        raise UserError(f"{out} holds a finished SFT run; choose another --out or pass --resume")
    if not 0 <= ptx_fraction < 1:
        raise UserError(f"--ptx-fraction must be in [0, 1), got {ptx_fraction}")
    if ptx_fraction > 0 and ptx_data is None:
        raise UserError("--ptx-fraction needs --ptx-data (a folder written by `instructgpt prepare`)")
    tok = Tokenizer.load(init / "tokenizer.json")
    base = read_config(init)
    if base["kind"] not in ("gpt", "seq2seq"):
        raise UserError(f"{init}: SFT needs a language model, found a {base['kind']!r} checkpoint")

    # 1. data
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
    trn = encode_all(tok, trn_ex, max_length, seq2seq, "training data")
    val = encode_all(tok, val_ex, max_length, seq2seq, "validation data") if val_ex else []
    steps_per_epoch = math.ceil(len(trn) / (batch_size * grad_accum))
    total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))

    # 2. model, optimizer, runtime
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = dropout
    cfg.dropout = dropout
    tcfg = train.TrainConfig(
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        max_steps=total_steps, weight_decay=weight_decay, seed=seed, device=device, dtype=dtype,
        compile=compile, log_interval=log_interval,
    )
    runtime = train.setup(tcfg)
    model.to(runtime.device)
    optimizer = train.make_optimizer(model, tcfg, runtime)
    fwd = train.maybe_compile(model, tcfg, runtime)
    sampler = EpochSampler(len(trn), seed)
    ptx = PretrainWindows(Path(ptx_data), max_length, seed) if ptx_fraction > 0 else None
    n_ptx = max(1, round(batch_size * ptx_fraction / (1 - ptx_fraction))) if ptx else 0

    ckpt = train.Checkpointer(out, keep_last=2)
    step, best = 0, {"val_loss": math.inf, "step": 0}
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step, best = state["step"], state["best"]
        sampler.restore(state["sampler"])
        if ptx:
            ptx.restore(state["ptx"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step)
    eval_every = max(1, steps_per_epoch if max_steps is None else min(steps_per_epoch, max(1, total_steps // 4)))

    def save_state(step: int) -> None:
        state = {"step": step, "best": best, "sampler": sampler.state()}
        if ptx:
            state["ptx"] = ptx.state()
        ckpt.save(step, {"model": model}, {"optimizer": optimizer}, state)

    # 3. the loop
    progress = train.Progress(total_steps, "sft", start=step)
    model.train()
    while step < total_steps:
        micro = []
        for _ in range(grad_accum):
            items = [trn[i] for i in sampler.take(batch_size)]
            micro.append(to_device(make_batch(items, tok.pad_id, packing, max_length), runtime.device))
        if ptx:
            micro.append(to_device(ptx.batch(n_ptx), runtime.device))
        stats = train.train_step(fwd, optimizer, micro, sft_loss_sum, n_targets, tcfg, runtime, step)
        step += 1
        row = {"step": step, "epoch": step / steps_per_epoch, **stats}
        if step % eval_every == 0 or step == total_steps:
            if val:
                row["val_loss"] = mean_loss(model, val, tok.pad_id, batch_size, runtime)
                if row["val_loss"] < best["val_loss"]:
                    best = {"val_loss": row["val_loss"], "step": step}
                    ckpt.save_best(model, {"val_loss": row["val_loss"], "step": step})
            save_state(step)
        if step % log_interval == 0 or "val_loss" in row:
            log.write(row)
        progress.update(step, stats)
    progress.close()

    # 4. choose and export: the checkpoint with the lowest validation loss (the last one without validation)
    final = ckpt.best_model_path() if val else None
    if final is not None:
        model = load_model(final)
    ckpt.export(model, extra={"stage": "sft", "selected_step": best["step"] if val else step})
    shutil.copy(init / "tokenizer.json", out / "tokenizer.json")
    summary = {"stage": "sft", "steps": step, "examples": len(trn), "val_examples": len(val),
               "best_val_loss": best["val_loss"] if val else None, "selected_step": best["step"] if val else step,
               "seconds": time.time() - t0}
    (out / "done.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
