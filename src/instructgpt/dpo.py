"""Direct Preference Optimisation (Rafailov et al., 2023, arXiv 2305.18290): the RL-free alternative.

For a prompt x with a preferred response y_w and a rejected one y_l, and the frozen reference pi_ref
(the SFT model), with the implicit rewards r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO eq. 7):

    loss = -log sigmoid(r(y_w) - r(y_l))

The reference log-probabilities are computed once, before training, and kept beside each pair; the
reference model is then freed. Rankings are split into their C(K,2) pairs. Logged per step (and on the
held-out pairs at each evaluation): rewards/chosen, rewards/rejected (mean implicit rewards),
rewards/accuracy (share of pairs with r(y_w) > r(y_l), ties half) and rewards/margins (mean r(y_w) - r(y_l)).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from . import train
from .batching import IGNORE, EpochSampler, pad_labelled
from .chat import render_prompt, render_response
from .checkpoint import Checkpointer, check_out, load_model, read_config, read_done, write_done
from .data import ended_flags, read_rankings, split_comparisons
from .distributed import all_reduce_sums, prepare_model, rank_rows, shard_model
from .errors import UserError
from .losses import dpo_loss, sequence_logprobs
from .model import set_dropout
from .tokenizer import Tokenizer


def encode(tok: Tokenizer, prompt: list[dict], response: str, max_length: int,
           ended: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels only on the response and its end token (when the reply ended);
    the prompt loses its oldest tokens if the whole does not fit in max_length inputs."""
    p = render_prompt(tok, prompt)
    r = render_response(tok, response) if ended else tok.encode(response)
    if not r:
        raise UserError("a DPO response must have at least one token")
    ids = (p + r)[-(max_length + 1):]
    n_r = min(len(r), len(ids) - 1)
    labels = [IGNORE] * (len(ids) - 1 - n_r) + ids[-n_r:]
    return ids[:-1], labels


def pair_batch(pairs: list[dict], idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch (2N, T), and the pairs' reference log-probs
    "ref" (N, 2) once they are known."""
    rows = [pairs[i]["chosen"] for i in idx] + [pairs[i]["rejected"] for i in idx]
    b = pad_labelled(rows, pad_id)
    if "ref_w" in pairs[idx[0]]:
        b["ref"] = torch.tensor([[pairs[i]["ref_w"], pairs[i]["ref_l"]] for i in idx], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def reference_logprobs(ref: nn.Module, pairs: list[dict], pad_id: int, device, batch_size: int = 32) -> None:
    """Store ref_w, ref_l (the reference's summed log-probabilities) in each pair, once for the run."""
    ref.eval()
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(s + batch_size, len(pairs))))
        lp = sequence_logprobs(ref, pair_batch(pairs, idx, pad_id, device)).cpu()
        for j, i in enumerate(idx):
            pairs[i]["ref_w"], pairs[i]["ref_l"] = float(lp[j]), float(lp[len(idx) + j])


def pair_metrics(loss: torch.Tensor, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Sums over the pairs (divide by their count): loss, rewards/chosen, rewards/rejected,
    rewards/accuracy (ties count half), rewards/margins."""
    margin = chosen - rejected
    return {"loss": float(loss.detach().sum()), "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(rejected.sum()),
            "rewards/accuracy": float((margin > 0).sum() + 0.5 * (margin == 0).sum()),
            "rewards/margins": float(margin.sum())}


@torch.no_grad()
def evaluate(model: nn.Module, pairs: list[dict], pad_id: int, beta: float, device, batch_size: int = 32) -> dict:
    """Mean loss and implicit-reward metrics over held-out pairs (see `pair_metrics`); "accuracy" is the
    preference accuracy (the chosen response's implicit reward is the higher)."""
    was = model.training
    model.eval()
    total: dict[str, float] = {}
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(s + batch_size, len(pairs))))
        b = pair_batch(pairs, idx, pad_id, device)
        lp = sequence_logprobs(model, b)
        n = len(idx)
        for k, v in pair_metrics(*dpo_loss(lp[:n], lp[n:], b["ref"][:, 0], b["ref"][:, 1], beta)).items():
            total[k] = total.get(k, 0.0) + v
    model.train(was)
    out = {k: v / max(1, len(pairs)) for k, v in total.items()}
    out["accuracy"] = out.get("rewards/accuracy", 0.5)
    return out


def to_pairs(tok: Tokenizer, comps: list, max_length: int) -> list[dict]:
    """Every (chosen, rejected) pair of every comparison, encoded."""
    pairs = []
    for c in comps:
        ended = ended_flags(c) or [True] * len(c.completions)
        for w, l in c.pairs():
            pairs.append({"chosen": encode(tok, c.prompt, c.completions[w], max_length, ended[w]),
                          "rejected": encode(tok, c.prompt, c.completions[l], max_length, ended[l])})
    return pairs


def dpo_command(
    init: Path,
    data: list[Path],
    out: Path,
    val_data: list[Path] | None = None,
    val_fraction: float = 0.1,
    beta: float = 0.1,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 16,
    grad_accum: int = 1,
    lr: float = 5e-5,
    min_lr: float | None = None,
    warmup_steps: int = 10,
    max_length: int | None = None,
    dropout: bool = False,
    log_interval: int = 1,
    eval_interval: int | None = None,
    checkpoint_interval: int = 500,
    keep_last: int = 2,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    fsdp: bool = False,
    resume: bool = False,
    skip_invalid: bool = False,
) -> dict:
    """DPO on preference pairs (or rankings split into their pairs), with the SFT model as the reference.

    Args:
        init: the SFT checkpoint: the initial policy and the frozen reference.
        data: comparison files (pairs, Anthropic HH, or K-way rankings).
        out: stage folder to write.
        val_data: held-out comparison files; without them, val_fraction of the prompts is held out.
        val_fraction: share of the prompts (with all their pairs) held out when no --val-data is given.
        beta: strength of the implicit KL constraint (0.1 by default, as in the DPO paper).
        epochs: passes over the training pairs.
        max_steps: optimizer steps (overrides epochs).
        batch_size: pairs per micro-batch.
        max_length: longest prompt + response in tokens (default: the model's context).
        dropout: keep the checkpoint's dropout in the policy (off by default: with it, log pi differs from log pi_ref at
            step 0 by noise alone).
        log_interval: write the per-step metrics every this many steps.
        eval_interval: held-out metrics every this many steps (default: 5 times per run, and at the end).
        checkpoint_interval: resumable checkpoint every this many steps (and at the end).
        keep_last: step checkpoints to keep.
        fsdp: under torchrun, shard the model, gradients and optimizer state over the ranks (FSDP2) instead
            of replicating them (DDP).
        resume: continue the run in OUT from its latest checkpoint.
        skip_invalid: skip invalid records (counted and reported) instead of stopping at the first.
    """
    t0 = time.time()
    init, out = Path(init), Path(out)
    check_out(out, resume, "DPO")
    if resume and (summary := read_done(out)) is not None:
        print(json.dumps(summary))
        return summary
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if beta <= 0:
        raise UserError(f"--beta must be positive, got {beta}")
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")

    # 1. read and encode the data (a bad file fails here, before anything is written to OUT)
    if read_config(init)["kind"] != "gpt":
        raise UserError(f"{init}: DPO needs a decoder-only language model")
    tok = Tokenizer.load(init / "tokenizer.json")
    comps = read_rankings(data, skip_invalid)
    if val_data:
        trn_c, val_c = comps, read_rankings(val_data, skip_invalid)
    else:
        # held out by prompt (no prompt's pairs on both sides), the same prompts as `instructgpt rm` holds out
        trn_c, val_c = split_comparisons(comps, val_fraction, seed)
    tcfg = train.TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
                             warmup_steps=warmup_steps, max_steps=max_steps or 1, weight_decay=0.0, seed=seed,
                             device=device, dtype=dtype, compile=compile, log_interval=log_interval,
                             checkpoint_interval=checkpoint_interval, keep_last=keep_last, fsdp=fsdp)
    runtime = train.setup(tcfg)
    dev = runtime.device
    model = load_model(init, kind="gpt", device=dev)
    L = min(max_length or model.config.block_size, model.config.block_size)
    trn, val = to_pairs(tok, trn_c, L), to_pairs(tok, val_c, L)
    if not trn:
        raise UserError(f"no training pairs left after holding out {len(val)} for validation")

    steps_per_epoch, total_steps = train.epoch_schedule(len(trn), epochs, max_steps, tcfg, runtime)
    every = eval_interval or max(1, total_steps // 5)

    # 2. the reference's log-probabilities, once for the whole run, of the pairs the run will visit (a
    # replay of the sampler: a short run over many pairs scores only its steps' pairs); then it is freed
    ref = load_model(init, kind="gpt", device=dev).requires_grad_(False)
    if runtime.fsdp:  # every rank scores every pair, so the sharded forward runs in step on all of them
        shard_model(ref, runtime)
    replay = EpochSampler(len(trn), seed)
    per_step = train.examples_per_step(tcfg, runtime)
    visited = sorted({i for _ in range(total_steps) for i in replay.take(per_step)})
    with runtime.autocast():
        reference_logprobs(ref, [trn[i] for i in visited], tok.pad_id, dev)
        reference_logprobs(ref, val, tok.pad_id, dev)
    del ref

    if not dropout:
        set_dropout(model, 0.0, attn=0.0)  # with dropout, log pi differs from log pi_ref at step 0 by noise
    fwd = prepare_model(model, runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(model, tcfg, runtime)
    sampler = EpochSampler(len(trn), seed)
    ckpt = Checkpointer(out, keep_last=keep_last)
    step, before = 0, None
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step, before = state["step"], state.get("before")
        sampler.restore(state["sampler"])
    elif val:
        before = evaluate(model, val, tok.pad_id, beta, dev)
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=runtime.is_main)

    # 3. the loop
    seen: dict[str, float] = {}

    def loss_sum(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = sequence_logprobs(m, b)  # (2N,) chosen rows, then rejected rows
        n = b["ref"].size(0)
        loss, chosen, rejected = dpo_loss(lp[:n], lp[n:], b["ref"][:, 0], b["ref"][:, 1], beta)
        for k, v in pair_metrics(loss, chosen, rejected).items():
            seen[k] = seen.get(k, 0.0) + v
        return loss.sum()

    progress = train.Progress(total_steps, "dpo", start=step)
    model.train()
    after = None  # the held-out metrics of the last step, evaluated once
    while step < total_steps:
        micro = [pair_batch(trn, rank_rows(sampler.take(batch_size * runtime.world_size), runtime), tok.pad_id,
                            dev) for _ in range(grad_accum)]
        seen.clear()
        stats = train.train_step(fwd, optimizer, micro, loss_sum, lambda b: b["ref"].size(0), tcfg, runtime, step)
        step += 1
        n_pairs = stats["tokens"]
        sums = all_reduce_sums(seen, runtime)
        row = {"step": step, "loss": stats["loss"], **{k: v / n_pairs for k, v in sums.items() if k != "loss"},
               "grad_norm": stats["grad_norm"], "lr": stats["lr"], "pairs": n_pairs}
        if val and (step % every == 0 or step == total_steps):
            ev = evaluate(model, val, tok.pad_id, beta, dev)
            row |= {f"eval/{k}": v for k, v in ev.items() if k != "rewards/accuracy"}
            after = ev if step == total_steps else None
        if step % log_interval == 0 or "eval/accuracy" in row:
            log.write(row)
        if step % checkpoint_interval == 0 or step == total_steps:
            ckpt.save(step, {"model": model}, {"optimizer": optimizer},
                      {"step": step, "sampler": sampler.state(), "before": before})
        progress.update(step, stats)
    progress.close()

    # 4. save; done.json last
    if val and after is None:  # a resumed run that had already finished its steps
        after = evaluate(model, val, tok.pad_id, beta, dev)
    ckpt.export(model, extra={"stage": "dpo", "beta": beta})
    summary = {"stage": "dpo", "steps": step, "pairs": len(trn), "val_pairs": len(val), "beta": beta,
               "val_accuracy_before": before["accuracy"] if before else None,
               "val_accuracy_after": after["accuracy"] if after else None,
               "val_margin_after": after["rewards/margins"] if after else None,
               "seconds": round(time.time() - t0, 2)}
    if runtime.is_main:
        write_done(out, summary, tokenizer_from=init)
        print(json.dumps(summary))
    return summary
