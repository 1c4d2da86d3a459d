"""Direct Preference Optimisation (Rafailov et al., 2023, arXiv 2305.18290): the RL-free alternative.

For a prompt x with a preferred response y_w and a rejected one y_l, and the frozen reference pi_ref
(the SFT model), with the implicit rewards r(y) = beta * (log pi(y|x) - log pi_ref(y|x)) (DPO eq. 7):

    loss = -log sigmoid(r(y_w) - r(y_l))

The reference log-probabilities are computed once, before training, and kept beside each pair; the
reference model is then freed. Rankings are split into their C(K,2) pairs. Logged per step (and on the
held-out pairs at each evaluation): rewards/chosen, rewards/rejected (mean implicit rewards),
rewards/accuracy (share of pairs with r(y_w) > r(y_l), ties half) and rewards/margins (mean r(y_w) - r(y_l)).

With --lora-rank the policy trains adapters over the frozen SFT weights, and the reference is the policy with
its adapters off: no second model is loaded. Otherwise the reference is a copy of the SFT model, held in bf16
when the run computes in bf16 on CUDA.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn

from . import finetune, train
from .batching import IGNORE, EpochSampler, pad_labelled
from .chat import render_prompt, render_response, unended_response
from .checkpoint import Checkpointer, check_out, load_model, read_config, read_done, write_done, writing
from .data import ended_flags, read_rankings, split_comparisons
from .distributed import Runtime, all_reduce_sums, prepare_model, rank_rows, shard_model
from .errors import UserError
from .lora import LoRAConfig, adapters_off
from .losses import dpo_loss, sequence_logprobs
from .model import set_dropout
from .recipe import to_dict, write_args
from .resume import check_resume, run_fingerprint
from .tokenizer import Tokenizer
from .train import TrainConfig


def encode(tok: Tokenizer, prompt: list[dict], response: str, max_length: int,
           ended: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels) with labels only on the response and its end token (when the reply ended);
    the prompt loses its oldest tokens if the whole does not fit in max_length inputs."""
    p = render_prompt(tok, prompt)
    r = render_response(tok, response) if ended else unended_response(tok, response)
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


# ----------------------------------------------------------------------------------------------------
# The stage

WARMUP_STEPS = 10  # the default --warmup-steps, and what None means


@dataclass
class DPOArgs:
    """The arguments of `instructgpt dpo`: flags, or the keys of a --config recipe file."""

    init: Path  # the SFT checkpoint: the initial policy and the frozen reference
    data: list[Path]  # comparison files (pairs, Anthropic HH, or K-way rankings)
    out: Path  # stage folder to write
    val_data: list[Path] | None = None  # held-out comparison files; None: --val-fraction of the prompts is held out
    val_fraction: float = 0.1  # share of the prompts (with all their pairs) held out when no --val-data is given
    beta: float = 0.1  # strength of the implicit KL constraint (0.1, as in the DPO paper)
    epochs: float = 1.0  # passes over the training pairs (--max-steps, when given, overrides it)
    max_length: int | None = None  # longest prompt + response in tokens; None: the model's context
    # keep the checkpoint's dropout in the policy (off by default: with it, log pi differs from log pi_ref at
    # step 0 by noise alone)
    dropout: bool = False
    skip_invalid: bool = False  # skip invalid records (counted and reported) instead of stopping at the first
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        batch_size=16,  # pairs per micro-batch
        lr=5e-5,
        warmup_steps=WARMUP_STEPS,  # None: the same 10
        max_steps=None,  # None: --epochs passes over the training pairs
        weight_decay=0.0,
        grad_clip=1.0,
        log_interval=1,
        eval_interval=None,  # held-out metrics every this many steps; None: 5 times per run (and at the end)
        checkpoint_interval=500,  # None: at the end only
        keep_last=2,
        seed=1337,  # also draws the held-out prompts (the same ones `instructgpt rm` holds out) and the pair order
    ))


def check_args(args: DPOArgs) -> None:
    """Every user error that shows without reading the data, before anything is written."""
    check_out(args.out, args.train.resume, "DPO")
    args.train.validate()
    if not 0 <= args.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.beta <= 0:
        raise UserError(f"--beta must be positive, got {args.beta}")
    if args.epochs <= 0:
        raise UserError(f"--epochs must be positive, got {args.epochs}")


@dataclass
class Run:
    """What the steps of the stage share: the resolved settings, the runtime, the policy and the pairs."""

    cfg: TrainConfig  # args.train with max_steps, warmup_steps and checkpoint_interval resolved
    runtime: Runtime
    tok: Tokenizer
    model: nn.Module  # the policy (sharded in place under FSDP); `fwd` wraps it for the training forward
    trn: list[dict]  # training pairs, with their reference log-probabilities once scored
    val: list[dict]  # held-out pairs
    every: int  # held-out metrics every this many steps
    fingerprint: dict  # the data and settings a resumed run must share with this one (`resume.check_resume`)
    lora: LoRAConfig | None  # the policy's adapters (the reference: adapters off); None: every weight trains
    ref: nn.Module | None = None  # a reference copy of INIT (full fine-tuning), only while pairs are scored


def load(args: DPOArgs) -> Run:
    """Read and encode the data, start the runtime, load the policy, resolve the schedule."""
    # a bad file fails here, before anything is written to OUT
    if read_config(args.init)["kind"] != "gpt":
        raise UserError(f"{args.init}: DPO needs a decoder-only language model")
    tok = Tokenizer.load(args.init / "tokenizer.json")
    comps = read_rankings(args.data, args.skip_invalid)
    if args.val_data:
        trn_c, val_c = comps, read_rankings(args.val_data, args.skip_invalid)
    else:
        # held out by prompt (no prompt's pairs on both sides), the same prompts as `instructgpt rm` holds out
        trn_c, val_c = split_comparisons(comps, args.val_fraction, args.train.seed)
    given = args.train
    # max_steps is a placeholder until epoch_schedule knows the world size
    cfg = replace(given, max_steps=given.max_steps or 1,
                  warmup_steps=WARMUP_STEPS if given.warmup_steps is None else given.warmup_steps)
    runtime = train.setup(cfg)
    model = load_model(args.init, kind="gpt", device=runtime.device)
    lora = finetune.prepare(model, cfg)  # LoRA adapters and activation checkpointing, as the flags say
    L = min(args.max_length or model.config.block_size, model.config.block_size)
    trn, val = to_pairs(tok, trn_c, L), to_pairs(tok, val_c, L)
    if not trn:
        raise UserError(f"no training pairs left after holding out {len(val)} for validation")
    _, total_steps = train.epoch_schedule(len(trn), args.epochs, given.max_steps, cfg, runtime)
    cfg.checkpoint_interval = cfg.checkpoint_interval or total_steps
    every = cfg.eval_interval or max(1, total_steps // 5)
    return Run(cfg, runtime, tok, model, trn, val, every, run_fingerprint(args, runtime, total_steps), lora)


def score_reference(args: DPOArgs, run: Run) -> None:
    """The reference's log-probabilities, once for the whole run, of the pairs the run will visit (a replay of
    the sampler: a short run over many pairs scores only its steps' pairs); then the reference is freed."""
    replay = EpochSampler(len(run.trn), run.cfg.seed)
    per_step = train.examples_per_step(run.cfg, run.runtime)
    visited = sorted({i for _ in range(run.cfg.max_steps) for i in replay.take(per_step)})
    score_pairs(args, run, [run.trn[i] for i in visited])
    score_pairs(args, run, run.val)
    run.ref = None


def score_pairs(args: DPOArgs, run: Run, pairs: list[dict]) -> None:
    """Reference log-probabilities of `pairs` (the same list on every rank: under FSDP the sharded forward runs
    in step on all of them). The reference is run.ref when it is loaded; else, with LoRA, the policy with its
    adapters off (its train/eval mode restored after); else a frozen copy of INIT, loaded (and kept in run.ref)."""
    if run.ref is None and run.lora is None:
        run.ref = finetune.frozen(load_model(args.init, kind="gpt", device=run.runtime.device), run.runtime)
        if run.runtime.fsdp:
            shard_model(run.ref, run.runtime)
    ref = run.ref if run.ref is not None else run.model
    as_init = adapters_off(ref) if ref is run.model else contextlib.nullcontext()  # the policy computes INIT alone
    was = ref.training
    with as_init, run.runtime.autocast():
        reference_logprobs(ref, pairs, run.tok.pad_id, run.runtime.device)
    ref.train(was)


@dataclass
class Loop:
    """The training state: wrapped policy, optimizer, pair order, checkpoints, metrics, where the run is."""

    fwd: nn.Module  # the policy under DDP or FSDP
    optimizer: torch.optim.Optimizer
    sampler: EpochSampler
    ckpt: Checkpointer
    log: train.MetricsLog
    step: int
    before: dict | None  # held-out metrics of the initial policy (kept in the checkpoints)


def start(args: DPOArgs, run: Run) -> Loop:
    """Optimizer and pair order, fresh or from the latest checkpoint; OUT/args.json and the metrics log."""
    if not args.dropout:
        set_dropout(run.model, 0.0, attn=0.0)  # with dropout, log pi differs from log pi_ref at step 0 by noise
    fwd = prepare_model(run.model, run.runtime)  # DDP or FSDP; `model` (sharded in place by FSDP) is saved
    optimizer = train.make_optimizer(run.model, run.cfg, run.runtime)
    sampler = EpochSampler(len(run.trn), run.cfg.seed)
    ckpt = Checkpointer(args.out, keep_last=run.cfg.keep_last, weights=finetune.checkpoint_weights(run.lora))
    step, before = 0, None
    if run.cfg.resume and (latest := ckpt.latest()) is not None:
        check_resume(ckpt.state_of(latest), run.fingerprint, latest)
        state = ckpt.load(latest, {"model": run.model}, {"optimizer": optimizer})
        step, before = state["step"], state.get("before")
        sampler.restore(state["sampler"])
    elif run.val:
        before = evaluate(run.model, run.val, run.tok.pad_id, args.beta, run.runtime.device)
    args.out.mkdir(parents=True, exist_ok=True)
    if run.runtime.is_main:
        write_args(args.out, args)
        print(f"dpo: {finetune.describe(run.model, run.lora)}")
    log = train.MetricsLog(args.out / "metrics.jsonl", resume_step=step, enabled=run.runtime.is_main,
                           report_to=run.cfg.report_to, stage="dpo", config=to_dict(args))
    return Loop(fwd, optimizer, sampler, ckpt, log, step, before)


def train_loop(args: DPOArgs, run: Run, loop: Loop) -> dict | None:
    """The optimizer steps up to max_steps; returns the held-out metrics of the last step (None if it ran none)."""
    cfg, runtime, dev, pad_id = run.cfg, run.runtime, run.runtime.device, run.tok.pad_id
    seen: dict[str, float] = {}

    def loss_sum(m: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        lp = sequence_logprobs(m, b)  # (2N,) chosen rows, then rejected rows
        n = b["ref"].size(0)
        loss, chosen, rejected = dpo_loss(lp[:n], lp[n:], b["ref"][:, 0], b["ref"][:, 1], args.beta)
        for k, v in pair_metrics(loss, chosen, rejected).items():
            seen[k] = seen.get(k, 0.0) + v
        return loss.sum()

    progress = train.Progress(cfg.max_steps, "dpo", start=loop.step)
    run.model.train()
    after = None  # the held-out metrics of the last step, evaluated once
    while loop.step < cfg.max_steps:
        micro = []
        for _ in range(cfg.grad_accum):
            idx = loop.sampler.take(cfg.batch_size * runtime.world_size)  # the global batch, the same on every rank
            if missing := sorted({i for i in idx if "ref_w" not in run.trn[i]}):  # never, unless the replay missed
                score_pairs(args, run, [run.trn[i] for i in missing])
            micro.append(pair_batch(run.trn, rank_rows(idx, runtime), pad_id, dev))
        seen.clear()
        stats = train.train_step(loop.fwd, loop.optimizer, micro, loss_sum, lambda b: b["ref"].size(0), cfg,
                                 runtime, loop.step)
        loop.step += 1
        step, n_pairs = loop.step, stats["tokens"]
        sums = all_reduce_sums(seen, runtime)
        row = {"step": step, "loss": stats["loss"], **{k: v / n_pairs for k, v in sums.items() if k != "loss"},
               "grad_norm": stats["grad_norm"], "lr": stats["lr"], "pairs": n_pairs}
        if run.val and (step % run.every == 0 or step == cfg.max_steps):
            ev = evaluate(run.model, run.val, pad_id, args.beta, dev)
            row |= {f"eval/{k}": v for k, v in ev.items() if k != "rewards/accuracy"}
            after = ev if step == cfg.max_steps else None
        if step % cfg.log_interval == 0 or "eval/accuracy" in row:
            loop.log.write(row)
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            loop.ckpt.save(step, {"model": run.model}, {"optimizer": loop.optimizer},
                           {"step": step, "sampler": loop.sampler.state(), "before": loop.before,
                            "fingerprint": run.fingerprint})
        progress.update(step, stats)
    progress.close()
    return after


def finish(args: DPOArgs, run: Run, loop: Loop, after: dict | None, t0: float) -> dict:
    """Export the policy and write done.json (last); returns the summary."""
    if run.val and after is None:  # a resumed run that had already finished its steps
        after = evaluate(run.model, run.val, run.tok.pad_id, args.beta, run.runtime.device)
    loop.ckpt.export(run.model, extra={"stage": "dpo", "beta": args.beta,
                                       **finetune.lora_record(run.lora, args.init, run.fingerprint["--init"])})
    finetune.write_adapter(run.model, run.lora, args.init, args.out,
                           log=lambda m: print(m) if run.runtime.is_main else None)
    before = loop.before
    summary = {"stage": "dpo", "steps": loop.step, "pairs": len(run.trn), "val_pairs": len(run.val),
               "beta": args.beta,
               "val_accuracy_before": before["accuracy"] if before else None,
               "val_accuracy_after": after["accuracy"] if after else None,
               "val_margin_after": after["rewards/margins"] if after else None,
               "seconds": round(time.time() - t0, 2)}
    if run.runtime.is_main:
        write_done(args.out, summary, tokenizer_from=args.init)
        print(json.dumps(summary))
    return summary


def dpo_command(args: DPOArgs) -> dict:
    """DPO on preference pairs (or rankings split into their pairs), with the SFT model as the reference.

    Writes OUT/args.json, metrics.jsonl, checkpoints/, the policy (model.safetensors) and done.json last;
    returns the summary that done.json holds (that of the finished run, with --resume on one).
    """
    t0 = time.time()
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        check_args(args)
        if args.train.resume and (summary := read_done(args.out)) is not None:
            print(json.dumps(summary))
            return summary

        # 1. read and encode the data, load the policy
        run = load(args)

        # 2. the reference's log-probabilities of the pairs, once; then the reference is freed
        score_reference(args, run)

        # 3. the loop
        loop = start(args, run)
        after = train_loop(args, run, loop)
        loop.log.close()

        # 4. save; done.json last
        return finish(args, run, loop, after, t0)
