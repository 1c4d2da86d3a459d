"""The reward model, trained on rankings of K responses per prompt (InstructGPT step 2, paper section 3.5).

For a prompt x with K ranked completions, every one of the C(K,2) pairs (y_w preferred to y_l) is a
comparison, and the loss of the prompt is (paper equation 1)

    loss(x) = -1 / C(K,2) * sum over pairs of log sigmoid(r(x, y_w) - r(x, y_l))

All K completions of a prompt are scored in one forward pass each (not one per pair) and their pairs
stay in one batch element, which the paper found both faster and less prone to overfitting than
shuffling pairs into separate batch elements. Pairwise data is the case K = 2.

After training, the score head's bias is shifted so that the labeler demonstrations get mean reward 0
("normalised so that the labeler demonstrations achieve a mean score of 0 before doing RL").
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
import torch.nn.functional as F

from . import train
from .chat import render_prompt, render_response
from .checkpoint import load_model, read_config
from .data import Comparison, read_comparisons, read_examples
from .errors import UserError
from .model import ScalarModel
from .sft import EpochSampler
from .tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------
# Scoring: the one function PPO, evaluation and the server call


def encode_pair(tok: Tokenizer, prompt_messages: list[dict], response: str, max_length: int) -> list[int]:
    """Prompt + response ids as the chat template renders them; a prompt too long for the context loses
    its oldest tokens (the response and its end are always kept, since the score is read there)."""
    ids = render_prompt(tok, prompt_messages) + render_response(tok, response)
    return ids[-max_length:]


def pad_left(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_sequences(rm: ScalarModel, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """Reward (N,) of each full sequence (prompt + response ids): the value at its last real token."""
    device = next(rm.parameters()).device
    was = rm.training
    rm.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        ids, mask = pad_left(seqs[i:i + batch_size], pad_id, device)
        out.append(rm.score(ids, mask).float())
    rm.train(was)
    return torch.cat(out).cpu()


def score_responses(rm: ScalarModel, tok: Tokenizer, prompts: list[list[dict]], responses: list[str],
                    batch_size: int = 32) -> torch.Tensor:
    """Reward (N,) of each (prompt messages, response text) pair."""
    L = rm.config.block_size
    seqs = [encode_pair(tok, p, r, L) for p, r in zip(prompts, responses)]
    return score_sequences(rm, seqs, tok.pad_id, batch_size)


# ----------------------------------------------------------------------------------------------------
# The loss


def ranking_loss(rewards: torch.Tensor, pairs: torch.Tensor, group: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum over prompts of the mean pairwise loss of each prompt (paper equation 1).

    Args:
        rewards: (N,) one reward per completion, all prompts' completions concatenated.
        pairs: (P, 2) indices into `rewards`: (winner, loser).
        group: (P,) the prompt each pair belongs to, in [0, n_groups).
    Returns:
        a scalar: sum over prompts of -mean over the prompt's pairs of log sigmoid(r_w - r_l).
    """
    pair_loss = -F.logsigmoid(rewards[pairs[:, 0]] - rewards[pairs[:, 1]])  # (P,)
    per_prompt = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device)
    per_prompt.index_add_(0, group, pair_loss)
    count = torch.zeros(n_groups, dtype=pair_loss.dtype, device=pair_loss.device)
    count.index_add_(0, group, torch.ones_like(pair_loss))
    return (per_prompt / count).sum()


@dataclass
class EncodedComparison:
    seqs: list[list[int]]  # K full sequences
    pairs: list[tuple[int, int]]  # (winner, loser) indices into seqs


def encode_comparisons(tok: Tokenizer, comps: list[Comparison], max_length: int) -> list[EncodedComparison]:
    return [EncodedComparison([encode_pair(tok, c.prompt, y, max_length) for y in c.completions], c.pairs())
            for c in comps]


def make_batch(items: list[EncodedComparison], pad_id: int) -> dict[str, torch.Tensor]:
    """All completions of all prompts in one padded (N, T) batch, with the pairs as indices into it."""
    seqs, pairs, group, offset = [], [], [], 0
    for g, item in enumerate(items):
        seqs.extend(item.seqs)
        pairs.extend((offset + w, offset + l) for w, l in item.pairs)
        group.extend([g] * len(item.pairs))
        offset += len(item.seqs)
    ids, mask = pad_left(seqs, pad_id, "cpu")
    return {"ids": ids, "attention_mask": mask, "pairs": torch.tensor(pairs), "group": torch.tensor(group),
            "n_groups": torch.tensor(len(items))}


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    rewards = model.score(batch["ids"], batch["attention_mask"]).float()
    return ranking_loss(rewards, batch["pairs"], batch["group"], int(batch["n_groups"]))


def n_prompts(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["n_groups"])


@torch.no_grad()
def pairwise_accuracy(rm: ScalarModel, tok: Tokenizer, data: list[EncodedComparison], batch_size: int = 16) -> dict:
    """Share of held-out pairs where the preferred completion gets the higher reward (ties count half)."""
    correct, total, loss = 0.0, 0, 0.0
    for i in range(0, len(data), batch_size):
        items = data[i:i + batch_size]
        batch = make_batch(items, tok.pad_id)
        rewards = score_sequences(rm, [s for it in items for s in it.seqs], tok.pad_id, 64)
        pairs = batch["pairs"]
        diff = rewards[pairs[:, 0]] - rewards[pairs[:, 1]]
        correct += float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        total += len(pairs)
        loss += float(ranking_loss(rewards, pairs, batch["group"], len(items)))
    return {"accuracy": correct / max(total, 1), "pairs": total, "loss": loss / max(len(data), 1)}


# ----------------------------------------------------------------------------------------------------
# The stage


def normalise_bias(rm: ScalarModel, tok: Tokenizer, prompts: list[list[dict]], replies: list[str]) -> float:
    """Shift the score head's bias so that the given (demonstration) responses have mean reward 0."""
    mean = float(score_responses(rm, tok, prompts, replies).mean())
    with torch.no_grad():
        rm.score_head.bias -= mean
    return mean


def rm_command(
    init: Path,
    data: list[Path],
    out: Path,
    demos: list[Path] | None = None,
    val_data: list[Path] | None = None,
    val_fraction: float = 0.1,
    epochs: float = 1.0,
    max_steps: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 1e-4,
    min_lr: float | None = None,
    warmup_steps: int = 10,
    weight_decay: float = 0.0,
    max_length: int | None = None,
    log_interval: int = 10,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool | None = None,
    resume: bool = False,
    skip_invalid: bool = False,
) -> None:
    """Train a reward model on rankings (K-way) or pairs, starting from the SFT model.

    Args:
        init: the SFT checkpoint folder; its unembedding is replaced by a scalar head.
        data: comparison files: rankings {prompt, completions, ranking}, pairs {prompt, chosen, rejected},
            or Anthropic HH dialogues {chosen, rejected}.
        out: stage folder to write.
        demos: demonstration files; after training the reward is shifted so their mean is 0. Without them,
            the top-ranked completions of the training data stand in for demonstrations.
        batch_size: prompts per micro-batch (each brings all K of its completions).
        epochs: passes over the training prompts (the paper used 1: more overfits).
    """
    t0 = time.time()
    init, out = Path(init), Path(out)
    if (out / "done.json").exists() and not resume:
        raise UserError(f"{out} holds a finished reward-model run; choose another --out or pass --resume")
    tok = Tokenizer.load(init / "tokenizer.json")
    if read_config(init)["kind"] not in ("gpt", "scalar"):
        raise UserError(f"{init}: a reward model needs a decoder-only checkpoint")
    comps: list[Comparison] = []
    for p in data:
        comps.extend(read_comparisons(p, skip_invalid=skip_invalid))
    if val_data:
        trn_c = comps
        val_c = [c for p in val_data for c in read_comparisons(p, skip_invalid=skip_invalid)]
    else:
        order = np.random.default_rng([seed, 13]).permutation(len(comps))
        n_val = max(1, int(round(len(comps) * val_fraction))) if val_fraction > 0 and len(comps) > 1 else 0
        val_c = [comps[i] for i in order[:n_val]]
        trn_c = [comps[i] for i in order[n_val:]]
    model = load_model(init, kind="scalar")
    L = min(max_length or model.config.block_size, model.config.block_size)
    trn = encode_comparisons(tok, trn_c, L)
    val = encode_comparisons(tok, val_c, L)
    steps_per_epoch = math.ceil(len(trn) / (batch_size * grad_accum))
    total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))

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
    ckpt = train.Checkpointer(out, keep_last=2)
    step = 0
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step = state["step"]
        sampler.restore(state["sampler"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step)
    progress = train.Progress(total_steps, "reward model", start=step)
    model.train()
    while step < total_steps:
        micro = [make_batch([trn[i] for i in sampler.take(batch_size)], tok.pad_id) for _ in range(grad_accum)]
        micro = [{k: v.to(runtime.device) for k, v in b.items()} for b in micro]
        stats = train.train_step(fwd, optimizer, micro, batch_loss_sum, n_prompts, tcfg, runtime, step)
        step += 1
        row = {"step": step, **stats}
        if val and (step % max(1, total_steps // 5) == 0 or step == total_steps):
            acc = pairwise_accuracy(model, tok, val)
            row |= {"val_accuracy": acc["accuracy"], "val_loss": acc["loss"]}
        if step % log_interval == 0 or "val_accuracy" in row:
            log.write(row)
        if step % tcfg.checkpoint_interval == 0:
            ckpt.save(step, {"model": model}, {"optimizer": optimizer}, {"step": step, "sampler": sampler.state()})
        progress.update(step, stats)
    progress.close()

    # Centre the reward on the demonstrations (paper section 3.5).
    if demos:
        examples = [e for p in demos for e in read_examples(p, skip_invalid=skip_invalid)]
        norm_prompts = [e.messages[:-1] for e in examples]
        norm_replies = [e.messages[-1]["content"] for e in examples]
        norm_source = "demonstrations"
    else:
        norm_prompts = [c.prompt for c in trn_c]
        norm_replies = [c.completions[c.ranking[0]] for c in trn_c]
        norm_source = "top-ranked training completions"
    shift = normalise_bias(model, tok, norm_prompts, norm_replies)
    acc = pairwise_accuracy(model, tok, val) if val else None
    ckpt.export(model, extra={"stage": "rm", "bias_shift": shift, "normalised_on": norm_source})
    shutil.copy(init / "tokenizer.json", out / "tokenizer.json")
    summary = {"stage": "rm", "steps": step, "train_prompts": len(trn), "val_prompts": len(val),
               "val_accuracy": acc["accuracy"] if acc else None, "val_pairs": acc["pairs"] if acc else 0,
               "normalised_on": norm_source, "bias_shift": shift, "seconds": time.time() - t0}
    (out / "done.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))
