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

With --lora-rank the trunk trains LoRA adapters over the frozen SFT weights and the scalar head trains in full;
the exported model is merged (a plain reward model), and there is no OUT/adapter/: PEFT's adapter would not
hold the head.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from . import finetune, train
from .batching import EpochSampler, pad
from .chat import render_prompt, render_response, unended_response
from .checkpoint import Checkpointer, check_out, load_model, read_config, read_done, write_done, writing
from .data import Comparison, ended_flags, read_examples, read_rankings, split_comparisons
from .distributed import Runtime, all_reduce_sums, prepare_model, rank_rows
from .errors import UserError
from .lora import LoRAConfig
from .losses import ranking_loss, rewards_of
from .model import ScalarModel
from .recipe import to_dict, write_args
from .resume import check_resume, run_fingerprint
from .tokenizer import Tokenizer
from .train import TrainConfig

# ----------------------------------------------------------------------------------------------------
# Scoring


def encode_pair(tok: Tokenizer, prompt_messages: list[dict], response: str, max_length: int,
                ended: bool = True) -> list[int]:
    """Prompt + response ids as the chat template renders them (the end token only if the reply ended);
    a prompt too long for the context loses its oldest tokens (the response and its end are kept, since
    the score is read there)."""
    reply = render_response(tok, response) if ended else unended_response(tok, response)
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
    if not math.isfinite(mean):  # the shift would make every reward non-finite
        raise train.DivergedError(f"the reward model's mean score on the {len(replies)} responses it is centred on "
                                  f"is {mean}: training diverged (lower --lr, or check the data)")
    with torch.no_grad():
        if hasattr(rm, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward: shift the shards
            rm.reshard()
        rm.score_head.bias -= mean
    return mean


# ----------------------------------------------------------------------------------------------------
# The stage


@dataclass
class RMArgs:
    init: Path  # the SFT checkpoint folder; its unembedding is replaced by a scalar head
    # comparison files: rankings {prompt, completions, ranking}, pairs {prompt, chosen, rejected}, or Anthropic HH
    # dialogues {chosen, rejected}
    data: list[Path]
    out: Path  # stage folder to write
    # demonstration files; after training the reward is shifted so their mean is 0. Without them, the top-ranked
    # completions of the training data stand in for demonstrations
    demos: list[Path] | None = None
    # held-out comparison files; without them, --val-fraction of the prompts is held out
    val_data: list[Path] | None = None
    val_fraction: float = 0.1  # share of the prompts held out for the pairwise accuracy when no --val-data is given
    epochs: float = 1.0  # passes over the training prompts (the paper used 1: more overfits); --max-steps overrides
    max_length: int | None = None  # longest prompt + response in tokens; None: the model's context
    skip_invalid: bool = False  # skip invalid records (counted and reported) instead of stopping at the first
    # the shared training settings. Here --batch-size counts prompts (each brings all K of its completions);
    # --max-steps None: --epochs passes; --warmup-steps None: 10; --eval-interval None: 5 times per run (and at
    # the end); --checkpoint-interval None: at the end only
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=8, grad_accum=1, lr=1e-4, min_lr=None, warmup_steps=10, max_steps=None, weight_decay=0.0,
        beta1=0.9, beta2=0.95, grad_clip=1.0, seed=1337, eval_interval=None, log_interval=10,
        checkpoint_interval=500, keep_last=2))


def rm_command(args: RMArgs) -> dict:
    """Train a reward model on rankings (K-way) or pairs, starting from the SFT model."""
    t0 = time.time()
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        if args.train.resume and (summary := read_done(args.out)) is not None:  # a finished run: nothing to do
            print(json.dumps(summary))
            return summary
        check_args(args)

        # 1. read everything first: a bad file fails here, before anything is written to OUT
        data = read_data(args)

        # 2. model, optimizer, data order; restored from the latest checkpoint on --resume
        run = set_up(args, data)

        # 3. the loop: every micro-batch holds all K completions of batch_size prompts
        train_loop(args, data, run)

        # 4. centre the reward on the demonstrations (paper section 3.5), then save; done.json last
        return finish(args, data, run, t0)


def check_args(args: RMArgs) -> None:
    """Every mistake in the flags, before anything is read or written."""
    check_out(args.out, args.train.resume, "reward-model")
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")
    args.train.validate()


@dataclass
class RMData:
    tok: Tokenizer
    train_comps: list[Comparison]
    val_comps: list[Comparison]
    norm_prompts: list[list[dict]]  # the responses whose mean reward is set to 0, and their prompts
    norm_replies: list[str]
    norm_source: str


def read_data(args: RMArgs) -> RMData:
    """The tokenizer, the training and held-out comparisons, and the responses to centre the reward on."""
    tok = Tokenizer.load(args.init / "tokenizer.json")
    if read_config(args.init)["kind"] not in ("gpt", "scalar"):
        raise UserError(f"{args.init}: a reward model needs a decoder-only checkpoint")
    comps = read_rankings(args.data, args.skip_invalid)
    if args.val_data:
        trn_c, val_c = comps, read_rankings(args.val_data, args.skip_invalid)
    else:
        trn_c, val_c = split_comparisons(comps, args.val_fraction, args.train.seed)
    if not trn_c:
        raise UserError(f"no training comparisons left after holding out {len(val_c)} for validation")
    if args.demos:
        examples = [e for p in args.demos for e in read_examples(p, skip_invalid=args.skip_invalid)]
        return RMData(tok, trn_c, val_c, [e.messages[:-1] for e in examples],
                      [e.messages[-1]["content"] for e in examples], "demonstrations")
    return RMData(tok, trn_c, val_c, [c.prompt for c in trn_c], [c.completions[c.ranking[0]] for c in trn_c],
                  "top-ranked training completions")


@dataclass
class RMRun:
    cfg: TrainConfig  # args.train with max_steps and warmup_steps resolved
    runtime: Runtime
    model: nn.Module  # the ScalarModel: what is saved (sharded in place under FSDP)
    fwd: nn.Module  # what is called: the model under DDP or FSDP
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    ckpt: Checkpointer
    log: train.MetricsLog
    trn: list[EncodedComparison]
    val: list[EncodedComparison]
    step: int  # the next step's index (steps done so far)
    total_steps: int
    eval_every: int
    checkpoint_every: int
    fingerprint: dict  # the data and settings a resumed run must share with this one (`resume.check_resume`)
    lora: LoRAConfig | None  # the trunk's adapters (the head trains in full); None: every weight trains


def set_up(args: RMArgs, data: RMData) -> RMRun:
    """Runtime, model, encoded data, schedule, optimizer and data order, restored on --resume; OUT/args.json."""
    # max_steps is a placeholder until epoch_schedule knows the world size; it sets the schedule's length
    cfg = replace(args.train, max_steps=args.train.max_steps or 1,
                  warmup_steps=10 if args.train.warmup_steps is None else args.train.warmup_steps)
    runtime = train.setup(cfg)
    model = load_model(args.init, kind="scalar")
    L = min(args.max_length or model.config.block_size, model.config.block_size)
    trn = encode_comparisons(data.tok, data.train_comps, L)
    val = encode_comparisons(data.tok, data.val_comps, L)
    _, total_steps = train.epoch_schedule(len(trn), args.epochs, args.train.max_steps, cfg, runtime)

    lora = finetune.prepare(model, cfg, trainable=("score_head",))  # LoRA and activation checkpointing, per flags
    fwd = prepare_model(model, runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(model, cfg, runtime)
    sampler = EpochSampler(len(trn), cfg.seed)
    ckpt = Checkpointer(args.out, keep_last=cfg.keep_last, weights=finetune.checkpoint_weights(lora))
    if ckpt.latest() is not None and not cfg.resume:
        raise UserError(f"{args.out} holds checkpoints of an unfinished reward-model run; pass --resume to continue "
                        "it, or choose another --out")
    step, fp = 0, run_fingerprint(args, runtime, total_steps)
    if cfg.resume and (latest := ckpt.latest()) is not None:
        check_resume(ckpt.state_of(latest), fp, latest)
        state = ckpt.load(latest, {"model": model}, {"optimizer": optimizer})
        step = state["step"]
        sampler.restore(state["sampler"])
    args.out.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        write_args(args.out, args)
        print(f"rm: {finetune.describe(model, lora)}")
    log = train.MetricsLog(args.out / "metrics.jsonl", resume_step=step, enabled=runtime.is_main,
                           report_to=cfg.report_to, stage="rm", config=to_dict(args))
    return RMRun(cfg, runtime, model, fwd, optimizer, sampler, ckpt, log, trn, val, step, total_steps,
                 eval_every=cfg.eval_interval or max(1, total_steps // 5),
                 checkpoint_every=cfg.checkpoint_interval or total_steps, fingerprint=fp, lora=lora)


def train_loop(args: RMArgs, data: RMData, run: RMRun) -> None:
    """Train from run.step to run.total_steps: metrics, held-out accuracy and checkpoints on their intervals."""
    cfg, runtime = run.cfg, run.runtime
    seen: dict[str, float] = {}

    def loss_sum(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        # batch_loss_sum, also counting the pairs the model already orders right (the training accuracy)
        rewards = rewards_of(m, b["ids"], b["attention_mask"])
        diff = (rewards[b["pairs"][:, 0]] - rewards[b["pairs"][:, 1]]).detach()
        seen["correct"] = seen.get("correct", 0.0) + float((diff > 0).sum() + 0.5 * (diff == 0).sum())
        seen["pairs"] = seen.get("pairs", 0.0) + len(diff)
        return ranking_loss(rewards, b["pairs"], b["group"], int(b["n_groups"]))

    progress = train.Progress(run.total_steps, "reward model", start=run.step)
    run.model.train()
    while run.step < run.total_steps:
        micro = [make_batch([run.trn[i] for i in rank_rows(run.sampler.take(cfg.batch_size * runtime.world_size),
                                                            runtime)], data.tok.pad_id)
                 for _ in range(cfg.grad_accum)]
        micro = [{k: v.to(runtime.device) for k, v in b.items()} for b in micro]
        seen.clear()
        stats = train.train_step(run.fwd, run.optimizer, micro, loss_sum, n_prompts, cfg, runtime, run.step)
        run.step += 1
        step = run.step
        sums = all_reduce_sums(seen, runtime)
        row = {"step": step, "loss": stats["loss"], "accuracy": sums["correct"] / sums["pairs"],
               "grad_norm": stats["grad_norm"], "lr": stats["lr"], "prompts": stats["tokens"]}
        if run.val and (step % run.eval_every == 0 or step == run.total_steps):
            acc = pairwise_accuracy(run.model, data.tok, run.val)
            row |= {"val_accuracy": acc["accuracy"], "val_loss": acc["loss"]}
        if step % cfg.log_interval == 0 or "val_accuracy" in row:
            run.log.write(row)
        if step % run.checkpoint_every == 0 or step == run.total_steps:
            run.ckpt.save(step, {"model": run.model}, {"optimizer": run.optimizer},
                          {"step": step, "sampler": run.sampler.state(), "fingerprint": run.fingerprint})
        progress.update(step, stats)
    progress.close()


def finish(args: RMArgs, data: RMData, run: RMRun, t0: float) -> dict:
    """Shift the bias so the demonstrations score 0 on average, export the model, write done.json."""
    model, val = run.model, run.val
    shift = normalise_bias(model, data.tok, data.norm_prompts, data.norm_replies)
    acc = pairwise_accuracy(model, data.tok, val) if val else None
    run.ckpt.export(model, extra={"stage": "rm", "bias_shift": shift, "normalised_on": data.norm_source,
                                  **finetune.lora_record(run.lora, args.init, run.fingerprint["--init"])})
    summary = {"stage": "rm", "steps": run.step, "train_prompts": len(run.trn), "val_prompts": len(val),
               "train_pairs": sum(len(c.pairs) for c in run.trn),
               "val_accuracy": acc["accuracy"] if acc else None, "val_loss": acc["loss"] if acc else None,
               "val_pairs": acc["pairs"] if acc else 0, "normalised_on": data.norm_source, "bias_shift": shift,
               "seconds": round(time.time() - t0, 2)}
    if run.runtime.is_main:
        write_done(args.out, summary, tokenizer_from=args.init)
        print(json.dumps(summary))
    run.log.close()
    return summary
