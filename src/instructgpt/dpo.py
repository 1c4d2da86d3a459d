"""Direct Preference Optimisation (Rafailov et al., 2023, arXiv 2305.18290): the RL-free alternative.

For a prompt x with a preferred response y_w and a rejected one y_l, and the frozen reference pi_ref
(the SFT model):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])

The reference log-probabilities are computed once, before training. Rankings are split into their
C(K,2) pairs.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import train
from .chat import render_prompt, render_response
from .checkpoint import load_model, read_config
from .data import read_comparisons
from .errors import UserError
from .sft import EpochSampler
from .tokenizer import Tokenizer

IGNORE = -100


def dpo_loss(pi_w: torch.Tensor, pi_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss (N,) and the implicit rewards beta * (log pi - log pi_ref) of chosen and rejected.

    Args:
        pi_w, pi_l: (N,) summed log-probabilities of the chosen / rejected responses under the policy.
        ref_w, ref_l: (N,) the same under the reference.
    """
    chosen = beta * (pi_w - ref_w)
    rejected = beta * (pi_l - ref_l)
    return -F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach()


def encode(tok: Tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels only on the response and its end token; the prompt loses its oldest
    tokens if the whole does not fit."""
    p = render_prompt(tok, prompt)
    r = render_response(tok, response)
    ids = (p + r)[-(max_length + 1):]
    n_r = min(len(r), len(ids) - 1)
    labels = [IGNORE] * (len(ids) - 1 - n_r) + ids[-n_r:]
    return ids[:-1], labels


def pad(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    T = max(len(i) for i, _ in items)
    ids = torch.full((len(items), T), pad_id, dtype=torch.long)
    labels = torch.full((len(items), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), T), dtype=torch.long)
    for n, (i, l) in enumerate(items):
        ids[n, :len(i)] = torch.tensor(i)
        labels[n, :len(l)] = torch.tensor(l)
        mask[n, :len(i)] = 1
    return {"ids": ids, "labels": labels, "attention_mask": mask}


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of log p(label) over each row's labelled tokens (B,), in fp32."""
    logits = model(batch["ids"], attention_mask=batch["attention_mask"]).float()
    labels = batch["labels"]
    logp = -F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    return (logp * (labels != IGNORE)).sum(1)


def pair_batch(pairs: list[dict], idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows in one padded batch (2N, T), and the pairs' reference log-probs."""
    rows = [pairs[i]["chosen"] for i in idx] + [pairs[i]["rejected"] for i in idx]
    b = pad(rows, pad_id)
    if "ref_w" in pairs[idx[0]]:
        b["ref"] = torch.tensor([[pairs[i]["ref_w"], pairs[i]["ref_l"]] for i in idx], dtype=torch.float32)
    return {k: v.to(device) for k, v in b.items()}


@torch.no_grad()
def reference_logprobs(ref, pairs: list[dict], pad_id: int, device, batch_size: int = 32) -> None:
    ref.eval()
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(s + batch_size, len(pairs))))
        lp = sequence_logprobs(ref, pair_batch(pairs, idx, pad_id, device)).cpu()
        for j, i in enumerate(idx):
            pairs[i]["ref_w"], pairs[i]["ref_l"] = float(lp[j]), float(lp[len(idx) + j])


@torch.no_grad()
def evaluate(model, pairs: list[dict], pad_id: int, beta: float, device, batch_size: int = 32) -> dict:
    """Preference accuracy (the implicit reward of the chosen response is higher), loss and margin."""
    was = model.training
    model.eval()
    acc, loss, margin = [], [], []
    for s in range(0, len(pairs), batch_size):
        idx = list(range(s, min(s + batch_size, len(pairs))))
        b = pair_batch(pairs, idx, pad_id, device)
        lp = sequence_logprobs(model, b)
        n = len(idx)
        l, c, r = dpo_loss(lp[:n], lp[n:], b["ref"][:, 0], b["ref"][:, 1], beta)
        acc += ((c > r).float() + 0.5 * (c == r).float()).tolist()
        loss += l.tolist()
        margin += (c - r).tolist()
    model.train(was)
    return {"accuracy": float(np.mean(acc)), "loss": float(np.mean(loss)), "margin": float(np.mean(margin))}


def load_pairs(tok: Tokenizer, paths: list[Path], max_length: int, skip_invalid: bool) -> list[dict]:
    pairs = []
    for p in paths:
        for c in read_comparisons(p, skip_invalid=skip_invalid):
            for w, l in c.pairs():
                pairs.append({"chosen": encode(tok, c.prompt, c.completions[w], max_length),
                              "rejected": encode(tok, c.prompt, c.completions[l], max_length)})
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
    log_interval: int = 10,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    resume: bool = False,
    skip_invalid: bool = False,
) -> None:
    """DPO on preference pairs (or rankings split into their pairs), with the SFT model as the reference.

    Args:
        init: the SFT checkpoint: the initial policy and the frozen reference.
        data: comparison files (pairs, Anthropic HH, or K-way rankings).
        out: stage folder to write.
        beta: strength of the implicit KL constraint (0.1 by default, as in the DPO paper).
        batch_size: pairs per micro-batch.
    """
    t0 = time.time()
    init, out = Path(init), Path(out)
    if (out / "done.json").exists() and not resume:
        raise UserError(f"{out} holds a finished DPO run; choose another --out or pass --resume")
    if read_config(init)["kind"] != "gpt":
        raise UserError(f"{init}: DPO needs a decoder-only language model")
    tok = Tokenizer.load(init / "tokenizer.json")
    tcfg = train.TrainConfig(batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr,
                             warmup_steps=warmup_steps, max_steps=1, weight_decay=0.0, seed=seed, device=device,
                             dtype=dtype, compile=False, log_interval=log_interval)
    runtime = train.setup(tcfg)
    dev = runtime.device
    model = load_model(init, kind="gpt", device=dev)
    L = min(max_length or model.config.block_size, model.config.block_size)
    pairs = load_pairs(tok, data, L, skip_invalid)
    if val_data:
        trn, val = pairs, load_pairs(tok, val_data, L, skip_invalid)
    else:
        order = np.random.default_rng([seed, 17]).permutation(len(pairs))
        n_val = max(1, int(len(pairs) * val_fraction)) if val_fraction > 0 and len(pairs) > 1 else 0
        val, trn = [pairs[i] for i in order[:n_val]], [pairs[i] for i in order[n_val:]]
    ref = load_model(init, kind="gpt", device=dev).requires_grad_(False)
    reference_logprobs(ref, trn, tok.pad_id, dev)
    reference_logprobs(ref, val, tok.pad_id, dev)
    del ref
    steps_per_epoch = math.ceil(len(trn) / (batch_size * grad_accum))
    tcfg.max_steps = total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    optimizer = train.make_optimizer(model, tcfg, runtime)
    sampler = EpochSampler(len(trn), seed)
    ckpt = train.Checkpointer(out, keep_last=2)
    step = 0
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step = state["step"]
        sampler.restore(state["sampler"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step)
    before = evaluate(model, val, tok.pad_id, beta, dev) if val else None

    def loss_sum(m, b):
        lp = sequence_logprobs(m, b)
        n = b["ref"].size(0)
        loss, _, _ = dpo_loss(lp[:n], lp[n:], b["ref"][:, 0], b["ref"][:, 1], beta)
        return loss.sum()

    progress = train.Progress(total_steps, "dpo", start=step)
    model.train()
    while step < total_steps:
        micro = [pair_batch(trn, sampler.take(batch_size), tok.pad_id, dev) for _ in range(grad_accum)]
        stats = train.train_step(model, optimizer, micro, loss_sum, lambda b: b["ref"].size(0), tcfg, runtime, step)
        step += 1
        row = {"step": step, **stats}
        if val and (step % max(1, total_steps // 5) == 0 or step == total_steps):
            ev = evaluate(model, val, tok.pad_id, beta, dev)
            row |= {"eval/accuracy": ev["accuracy"], "eval/loss": ev["loss"], "eval/margin": ev["margin"]}
        if step % log_interval == 0 or "eval/accuracy" in row:
            log.write(row)
        if step % tcfg.checkpoint_interval == 0:
            ckpt.save(step, {"model": model}, {"optimizer": optimizer}, {"step": step, "sampler": sampler.state()})
        progress.update(step, stats)
    progress.close()
    after = evaluate(model, val, tok.pad_id, beta, dev) if val else None
    ckpt.export(model, extra={"stage": "dpo", "beta": beta})
    shutil.copy(init / "tokenizer.json", out / "tokenizer.json")
    summary = {"stage": "dpo", "steps": step, "pairs": len(trn), "val_pairs": len(val),
               "val_accuracy_before": before["accuracy"] if before else None,
               "val_accuracy_after": after["accuracy"] if after else None, "seconds": time.time() - t0}
    (out / "done.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
