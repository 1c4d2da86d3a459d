"""The reward model, trained on rankings of K responses per prompt (InstructGPT step 2, paper section 3.5).

For a prompt x with K ranked completions, every one of the C(K,2) pairs (y_w preferred to y_l) is a
comparison, and the loss of the prompt is (paper equation 1)

    loss(x) = -1 / C(K,2) * sum over pairs of log sigmoid(r(x, y_w) - r(x, y_l))

All K completions of a prompt are scored in one forward pass each (not one per pair) and their pairs
stay in one batch element, which the paper found both faster and less prone to overfitting than
shuffling pairs into separate batch elements. Pairwise data is the case K = 2. A step's loss is the mean
over its prompts of each prompt's loss.

After training, the score head's bias is shifted so that the labeler demonstrations get mean reward 0
("normalised so that the labeler demonstrations achieve a mean score of 0 before doing RL").

A reply that never ended (a sample cut at max_new_tokens, flagged by `"ended": false` in the rankings
that `collect` writes) is encoded without the end token, as PPO scores such a rollout.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from . import train
from .batching import EpochSampler, pad
from .chat import render_prompt, render_response
from .checkpoint import Checkpointer, check_out, load_model, read_config, read_done, write_done
from .data import Comparison, ended_flags, read_examples, read_rankings, split_comparisons
from .distributed import all_reduce_sums, prepare_model, rank_rows
from .errors import UserError
from .losses import ranking_loss, rewards_of
from .model import ScalarModel
from .tokenizer import Tokenizer

# ----------------------------------------------------------------------------------------------------
# Scoring


def encode_pair(tok: Tokenizer, prompt_messages: list[dict], response: str, max_length: int,
                ended: bool = True) -> list[int]:
    """Prompt + response ids as the chat template renders them (the end token only if the reply ended);
    a prompt too long for the context loses its oldest tokens (the response and its end are kept, since
    the score is read there)."""
    reply = render_response(tok, response) if ended else tok.encode(response)
    ids = render_prompt(tok, prompt_messages) + reply
    return ids[-max_length:]


@torch.no_grad()
def score_sequences(rm: ScalarModel, seqs: list[list[int]], pad_id: int, batch_size: int = 32,
                    padding_side: str = "left") -> torch.Tensor:
    """Reward (N,) of each full sequence (prompt + response ids): the value at its last real token.
    The same whatever the batch and the padding side (DESIGN invariant 2)."""
    if not seqs:
        return torch.zeros(0)
    if any(len(s) == 0 for s in seqs):
        raise ValueError("score_sequences: an empty sequence has no token to read a reward at")
    device = next(rm.parameters()).device
    was = rm.training
    rm.eval()
    try:
        out = []
        for i in range(0, len(seqs), batch_size):
            ids, mask = pad(seqs[i:i + batch_size], pad_id, padding_side)
            out.append(rewards_of(rm, ids.to(device), mask.to(device)))
    finally:
        rm.train(was)
    return torch.cat(out).cpu()


def score_responses(rm: ScalarModel, tok: Tokenizer, prompts: list[list[dict]], responses: list[str],
                    ended: list[bool] | None = None, batch_size: int = 32) -> torch.Tensor:
    """Reward (N,) of each (prompt messages, response text) pair; `ended[i]` False scores a reply that
    was cut off (no end token)."""
    if len(prompts) != len(responses) or (ended is not None and len(ended) != len(responses)):
        raise ValueError("score_responses needs one prompt (and one ended flag) per response")
    L = rm.config.block_size
    flags = ended if ended is not None else [True] * len(responses)
    seqs = [encode_pair(tok, p, r, L, e) for p, r, e in zip(prompts, responses, flags)]
    return score_sequences(rm, seqs, tok.pad_id, batch_size)


# ----------------------------------------------------------------------------------------------------
# The loss


@dataclass
class EncodedComparison:
    seqs: list[list[int]]  # K full sequences
    pairs: list[tuple[int, int]]  # (winner, loser) indices into seqs


def encode_comparisons(tok: Tokenizer, comps: list[Comparison], max_length: int) -> list[EncodedComparison]:
    out = []
    for c in comps:
        flags = ended_flags(c) or [True] * len(c.completions)
        out.append(EncodedComparison([encode_pair(tok, c.prompt, y, max_length, e)
                                      for y, e in zip(c.completions, flags)], c.pairs()))
    return out


def make_batch(items: list[EncodedComparison], pad_id: int) -> dict[str, torch.Tensor]:
    """All completions of all prompts in one padded (N, T) batch, with the pairs as indices into it."""
    seqs, pairs, group, offset = [], [], [], 0
    for g, item in enumerate(items):
        seqs.extend(item.seqs)
        pairs.extend((offset + w, offset + l) for w, l in item.pairs)
        group.extend([g] * len(item.pairs))
        offset += len(item.seqs)
    ids, mask = pad(seqs, pad_id, "left")
    return {"ids": ids, "attention_mask": mask, "pairs": torch.tensor(pairs, dtype=torch.long),
            "group": torch.tensor(group, dtype=torch.long), "n_groups": torch.tensor(len(items))}


def batch_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the batch's prompts of each prompt's loss; divide by the step's prompt count."""
    rewards = rewards_of(model, batch["ids"], batch["attention_mask"])  # (N,)
    return ranking_loss(rewards, batch["pairs"], batch["group"], int(batch["n_groups"]))


def n_prompts(batch: dict[str, torch.Tensor]) -> int:
    return int(batch["n_groups"])


@torch.no_grad()
def pairwise_accuracy(rm: ScalarModel, tok: Tokenizer, data: list[EncodedComparison], batch_size: int = 16) -> dict:
    """Share of held-out pairs where the preferred completion gets the higher reward (ties count half),
    and the mean per-prompt loss."""
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


def normalise_bias(rm: ScalarModel, tok: Tokenizer, prompts: list[list[dict]], replies: list[str]) -> float:
    """Shift the score head's bias so that the given (demonstration) responses have mean reward 0."""
    mean = float(score_responses(rm, tok, prompts, replies).double().mean())
    with torch.no_grad():
        rm.score_head.bias -= mean
    return mean


# ----------------------------------------------------------------------------------------------------
# The stage


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
    """Train a reward model on rankings (K-way) or pairs, starting from the SFT model.

    Args:
        init: the SFT checkpoint folder; its unembedding is replaced by a scalar head.
        data: comparison files: rankings {prompt, completions, ranking}, pairs {prompt, chosen, rejected},
            or Anthropic HH dialogues {chosen, rejected}.
        out: stage folder to write.
        demos: demonstration files; after training the reward is shifted so their mean is 0. Without them,
            the top-ranked completions of the training data stand in for demonstrations.
        val_data: held-out comparison files; without them, val_fraction of the prompts is held out.
        val_fraction: share of the prompts held out for the pairwise accuracy when no --val-data is given.
        epochs: passes over the training prompts (the paper used 1: more overfits).
        max_steps: optimizer steps (overrides epochs).
        batch_size: prompts per micro-batch (each brings all K of its completions).
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate (cosine decay to min_lr after warmup_steps).
        max_length: longest prompt + response in tokens (default: the model's context).
        log_interval: write metrics every this many steps.
        eval_interval: held-out accuracy every this many steps (default: 5 times per run, and at the end).
        checkpoint_interval: resumable checkpoint every this many steps (and at the end).
        keep_last: step checkpoints to keep.
        fsdp: under torchrun, shard the model, gradients and optimizer state over the ranks (FSDP2) instead
            of replicating them (DDP).
        resume: continue the run in OUT from its latest checkpoint.
        skip_invalid: skip invalid records (counted and reported) instead of stopping at the first.
    """
    t0 = time.time()
    init, out = Path(init), Path(out)
    check_out(out, resume, "reward-model")
    if resume and (summary := read_done(out)) is not None:
        print(json.dumps(summary))
        return summary
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if epochs <= 0:
        raise UserError(f"--epochs must be positive, got {epochs}")

    # 1. read everything first: a bad file fails here, before anything is written to OUT
    tok = Tokenizer.load(init / "tokenizer.json")
    if read_config(init)["kind"] not in ("gpt", "scalar"):
        raise UserError(f"{init}: a reward model needs a decoder-only checkpoint")
    comps = read_rankings(data, skip_invalid)
    if val_data:
        trn_c, val_c = comps, read_rankings(val_data, skip_invalid)
    else:
        trn_c, val_c = split_comparisons(comps, val_fraction, seed)
    if not trn_c:
        raise UserError(f"no training comparisons left after holding out {len(val_c)} for validation")
    if demos:
        examples = [e for p in demos for e in read_examples(p, skip_invalid=skip_invalid)]
        norm_prompts = [e.messages[:-1] for e in examples]
        norm_replies = [e.messages[-1]["content"] for e in examples]
        norm_source = "demonstrations"
    else:
        norm_prompts = [c.prompt for c in trn_c]
        norm_replies = [c.completions[c.ranking[0]] for c in trn_c]
        norm_source = "top-ranked training completions"

    tcfg = train.TrainConfig(
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
        max_steps=max_steps or 1, weight_decay=weight_decay, seed=seed, device=device, dtype=dtype,
        compile=compile, log_interval=log_interval, checkpoint_interval=checkpoint_interval, keep_last=keep_last,
        fsdp=fsdp,
    )
    runtime = train.setup(tcfg)
    model = load_model(init, kind="scalar")
    L = min(max_length or model.config.block_size, model.config.block_size)
    trn = encode_comparisons(tok, trn_c, L)
    val = encode_comparisons(tok, val_c, L)
    steps_per_epoch, total_steps = train.epoch_schedule(len(trn), epochs, max_steps, tcfg, runtime)
    every = eval_interval or max(1, total_steps // 5)

    # 2. model, optimizer, data order; restored from the latest checkpoint on --resume
    fwd = prepare_model(model, runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(model, tcfg, runtime)
    sampler = EpochSampler(len(trn), seed)
    ckpt = Checkpointer(out, keep_last=keep_last)
    if ckpt.latest() is not None and not resume:
        raise UserError(f"{out} holds checkpoints of an unfinished reward-model run; pass --resume to continue it, "
                        "or choose another --out")
    step = 0
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step = state["step"]
        sampler.restore(state["sampler"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=runtime.is_main)

    # 3. the loop: every micro-batch holds all K completions of batch_size prompts
    seen: dict[str, float] = {}

    def loss_sum(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        rewards = rewards_of(m, b["ids"], b["attention_mask"])
        diff = (rewards[b["pairs"][:, 0]] - rewards[b["pairs"][:, 1]]).detach()
        seen["correct"] = seen.get("correct", 0.0) + float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        seen["pairs"] = seen.get("pairs", 0.0) + len(diff)
        return ranking_loss(rewards, b["pairs"], b["group"], int(b["n_groups"]))

    progress = train.Progress(total_steps, "reward model", start=step)
    model.train()
    while step < total_steps:
        micro = [make_batch([trn[i] for i in rank_rows(sampler.take(batch_size * runtime.world_size), runtime)],
                            tok.pad_id) for _ in range(grad_accum)]
        micro = [{k: v.to(runtime.device) for k, v in b.items()} for b in micro]
        seen.clear()
        stats = train.train_step(fwd, optimizer, micro, loss_sum, n_prompts, tcfg, runtime, step)
        step += 1
        sums = all_reduce_sums(seen, runtime)
        row = {"step": step, "loss": stats["loss"], "accuracy": sums["correct"] / sums["pairs"],
               "grad_norm": stats["grad_norm"], "lr": stats["lr"], "prompts": stats["tokens"]}
        if val and (step % every == 0 or step == total_steps):
            acc = pairwise_accuracy(model, tok, val)
            row |= {"val_accuracy": acc["accuracy"], "val_loss": acc["loss"]}
        if step % log_interval == 0 or "val_accuracy" in row:
            log.write(row)
        if step % checkpoint_interval == 0 or step == total_steps:
            ckpt.save(step, {"model": model}, {"optimizer": optimizer}, {"step": step, "sampler": sampler.state()})
        progress.update(step, stats)
    progress.close()

    # 4. centre the reward on the demonstrations (paper section 3.5), then save; done.json last
    shift = normalise_bias(model, tok, norm_prompts, norm_replies)
    acc = pairwise_accuracy(model, tok, val) if val else None
    ckpt.export(model, extra={"stage": "rm", "bias_shift": shift, "normalised_on": norm_source})
    summary = {"stage": "rm", "steps": step, "train_prompts": len(trn), "val_prompts": len(val),
               "train_pairs": sum(len(c.pairs) for c in trn),
               "val_accuracy": acc["accuracy"] if acc else None, "val_loss": acc["loss"] if acc else None,
               "val_pairs": acc["pairs"] if acc else 0, "normalised_on": norm_source, "bias_shift": shift,
               "seconds": round(time.time() - t0, 2)}
    if runtime.is_main:
        write_done(out, summary, tokenizer_from=init)
        print(json.dumps(summary))
    return summary
