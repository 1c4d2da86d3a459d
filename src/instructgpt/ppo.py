"""PPO against the reward model with a per-token KL penalty to the SFT model, PPO-ptx (InstructGPT step 3;
paper section 3.5 and appendix C.3-C.4), and critic-free group RL (GRPO, Dr. GRPO, RLOO, REINFORCE++) with
learned or verifiable rewards: one stage, one rollout, scoring and update path (`instructgpt.rl`).

The policy and the frozen reference both start from SFT; for PPO (--estimator gae) the value model starts
from the reward model, which stays frozen. Each step:

  1. rollout            sample --group-size responses to each of the step's prompts (generation engine,
                        temperature 1, KV cache); the samples of a prompt sit side by side on one rank
  2. score              old and reference log-probabilities, old values (gae only), and the reward: the reward
                        model's score and/or verifiable reward functions (--reward-fn), weighted and summed
  3. rewards            r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) (--kl-mode reward), plus the score at
                        the last token (a response that never produced the end token first loses
                        missing_end_penalty)
  4. advantages         by --estimator: GAE (gamma 1, lambda 0.95) whitened over the batch's response tokens;
                        group-relative (grpo, dr_grpo, rloo); REINFORCE++'s whitened return-to-go
  5. update             clipped surrogate (aggregated by --loss-agg), with --kl-mode loss plus beta * the k3 KL,
                        with gae the clipped value loss, over minibatches and inner epochs, plus, for PPO-ptx,
                        ptx_coef * the next-token loss on pretraining windows

    objective(phi) = E[r(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi_phi(x)]

Tensors of a batch: B rollouts, P prompt positions (prompts left-padded to the longest), R response
positions (responses right-padded to the longest); a response includes its end token.

Metrics follow TRL's names: PPO's (objective/kl, objective/entropy, objective/scores, objective/rlhf_reward,
policy/approxkl, policy/clipfrac, loss/policy, loss/value, val/clipfrac, ...) and GRPO's (reward,
reward_std, kl, entropy, clip_ratio, completion_length, frac_reward_zero_std, rewards/<name>), so curves
compare directly.

Under torchrun each rank rolls out its slice of the global batch of prompts (`--batch-size` samples per rank),
with sampling noise drawn for the whole batch (`GumbelPolicy`), and generation runs until every rank's rows
have ended. The advantages are whitened, the losses normalised and the statistics averaged over the tokens
and rollouts of every rank; each rank shuffles its own rollouts into its share of every minibatch. With one
minibatch per epoch, N ranks with batch B follow one process with batch N x B exactly.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import finetune, train
from .batching import EpochSampler, PretrainWindows
from .chat import render_prompt, reply_text
from .checkpoint import Checkpointer, check_out, load_model, read_config, write_done, writing
from .data import read_prompts
from .distributed import Runtime, prepare_model, rank_rows, shard_model
from .errors import UserError
from .generate import SamplingParams
from .lora import LoRAConfig
from .losses import AdaptiveKL
from .model import GPT, ScalarModel, set_dropout
from .recipe import to_dict, write_args
from .resume import data_digest
from .rewards import RewardFn, load_reward_fn
from .rl import (
    PPOConfig,
    ema_update,
    make_experience,
    ppo_update,
    rollout,
    rollout_metrics,
    score_responses,
    score_rollout,
)
from .tokenizer import Tokenizer
from .train import TrainConfig

# ----------------------------------------------------------------------------------------------------
# The stage

# PPO's defaults of the shared training settings; --max-steps and --warmup-steps count rollout batches
TRAIN_DEFAULTS = dict(batch_size=64, lr=1e-5, warmup_steps=5, max_steps=100, weight_decay=0.0, compile=False,
                      log_interval=1, checkpoint_interval=20)


@dataclass
class PPOArgs:
    """`ppo_command`'s arguments: inputs and outputs, the rewards, the RL hyperparameters, the training settings."""

    init: Path  # the SFT checkpoint: the initial policy and the frozen reference
    prompts: Path  # prompt file (any format the readers accept); a record's other fields reach --reward-fn
    out: Path  # stage folder to write
    reward: Path | None = None  # the reward-model checkpoint (frozen); also the value model's initialisation
    # verifiable rewards, fn(prompt messages, response, prompt record) -> float each, added to --reward's score:
    # world (the instruction world's checker, needs --world), gsm8k, module:function or file.py:function
    reward_fn: list[str] | None = None
    reward_weights: list[float] | None = None  # one weight per --reward-fn (default 1 each)
    rm_weight: float = 1.0  # the weight of the reward model's score in the sum
    world: Path | None = None  # the instruction world's folder (holding world.json), for --reward-fn world
    # value-model initialisation (gae only); None: the reward model (as in the paper), else the policy + new head
    value_init: Path | None = None
    max_new_tokens: int = 48  # longest response; one cut off here loses --missing-end-penalty
    ptx_data: Path | None = None  # PPO-ptx: a folder written by `instructgpt prepare` (the pretraining data)
    sample_interval: int = 10  # append a few samples to OUT/samples.jsonl every this many steps (0: never)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**TRAIN_DEFAULTS))


def check_rewards(args: PPOArgs) -> None:
    """The reward flags: a reward model, reward functions or both, with a weight each."""
    fns = args.reward_fn or []
    if args.reward is None and not fns:
        raise UserError("give a reward: --reward (a reward-model folder) and/or --reward-fn (world, gsm8k, "
                        "module:function or file.py:function)")
    if len(set(fns)) != len(fns):
        raise UserError(f"--reward-fn names a function twice: {' '.join(fns)}")
    if args.reward_weights is not None and len(args.reward_weights) != len(fns):
        raise UserError(f"--reward-weights gives {len(args.reward_weights)} weight(s) for {len(fns)} --reward-fn")
    if args.reward is None and args.rm_weight != 1.0:
        raise UserError("--rm-weight weighs the reward model's score: give --reward too")
    if args.world is not None and "world" not in fns:
        raise UserError("--world is read only by --reward-fn world")
    if args.value_init is not None and not args.ppo.critic:
        raise UserError(f"--estimator {args.ppo.estimator} has no value model: drop --value-init")


def check_args(args: PPOArgs) -> TrainConfig:
    """Every user error found before anything is written. Returns the training settings resolved: None means
    PPO's default max_steps or warmup_steps, min_lr = lr (constant after warm-up), a checkpoint at the end only."""
    t, cfg = args.train, args.ppo
    check_out(args.out, t.resume, "PPO")
    check_rewards(args)
    if cfg.ptx_coef > 0 and args.ptx_data is None:
        raise UserError("--ptx-coef needs --ptx-data (a folder written by `instructgpt prepare`)")
    if args.ptx_data is not None and cfg.ptx_coef <= 0:
        raise UserError("--ptx-data is used only by PPO-ptx: give --ptx-coef too (the paper used 27.8)")
    if t.compile:
        raise UserError("PPO does not compile its models yet: drop --compile")
    if t.eval_interval is not None:
        raise UserError("PPO has no evaluation: drop --eval-interval (metrics are logged every --log-interval steps)")
    if t.lora_rank and cfg.ema > 0:
        raise UserError("--ema averages every weight of the policy: it does not combine with --lora-rank")
    cfg.validate()
    t.validate()
    steps = TRAIN_DEFAULTS["max_steps"] if t.max_steps is None else t.max_steps
    t = replace(t, max_steps=steps, compile=False,
                warmup_steps=TRAIN_DEFAULTS["warmup_steps"] if t.warmup_steps is None else t.warmup_steps,
                min_lr=t.lr if t.min_lr is None else t.min_lr,
                checkpoint_interval=steps if t.checkpoint_interval is None else t.checkpoint_interval)
    if t.batch_size % (cfg.minibatches * t.grad_accum):
        times = f" x --grad-accum {t.grad_accum}" if t.grad_accum > 1 else ""
        raise UserError(f"--batch-size {t.batch_size} must be a multiple of --minibatches {cfg.minibatches}{times}")
    if t.batch_size % cfg.group_size:
        raise UserError(f"--batch-size {t.batch_size} counts samples: it must be a multiple of --group-size "
                        f"{cfg.group_size}")
    if read_config(args.init)["kind"] != "gpt":
        raise UserError(f"{args.init}: PPO needs a decoder-only language model as the policy")
    return t


def _no_dropout(model: nn.Module) -> nn.Module:
    # Dropout would make the ratio differ from 1 at the first minibatch and the values noisy.
    set_dropout(model, 0.0, attn=0.0)
    model.config.dropout = model.config.attn_dropout = 0.0
    return model


def encode_prompts(tok: Tokenizer, prompts: list, block_size: int, max_new_tokens: int) -> tuple[list, list]:
    """Render every prompt with the chat template; prompts that leave no room for max_new_tokens in the
    model's context are left out (and counted). Returns (prompts, ids)."""
    rendered = [(p, render_prompt(tok, p.messages)) for p in prompts]
    kept = [(p, x) for p, x in rendered if len(x) + max_new_tokens <= block_size]
    dropped = len(prompts) - len(kept)
    if dropped:
        print(f"ppo: {dropped} of {len(prompts)} prompt(s) leave no room for {max_new_tokens} new tokens in the "
              f"context of {block_size} and are left out")
    if not kept:
        raise UserError(f"no prompt fits the context of {block_size} tokens with {max_new_tokens} new tokens")
    return [p for p, _ in kept], [x for _, x in kept]


@dataclass
class Run:
    """What the loop needs: models, optimizers, rewards, prompts, and every generator whose state a resumed
    run must find again."""

    runtime: Runtime
    tok: Tokenizer
    models: dict[str, nn.Module]  # the trained ones, as checkpoints hold them: policy, value (gae) and ema
    optimizers: dict[str, torch.optim.Optimizer]  # policy, value (gae)
    fwd: tuple[nn.Module, nn.Module | None]  # the policy and the value model as the update calls them (DDP, FSDP)
    ref: GPT | None  # None with LoRA: the policy with its adapters off
    rm: ScalarModel | finetune.BaseScorer | None  # with LoRA and gae, the value model's base (BaseScorer)
    reward_fns: list[tuple[str, RewardFn, float]]  # (name, function, weight) of each --reward-fn
    ptx: PretrainWindows | None
    kl_ctl: AdaptiveKL
    items: list  # the prompts that fit, and their ids
    prompt_ids: list[list[int]]
    sampler: EpochSampler  # prompt order
    rng: np.random.Generator  # minibatch order
    generator: torch.Generator  # sampling noise of the global batch (every rank)
    ckpt: Checkpointer
    lora: LoRAConfig | None = None  # the policy's (and value model's) adapters; None: every weight trains
    step: int = 0
    fingerprint: dict | None = None  # the data and settings a resumed run must share (`train.check_resume`)


def set_up(args: PPOArgs, t: TrainConfig) -> Run:
    """The runtime; policy and reference from SFT, the reward model frozen, for gae the value model from the
    reward model; the reward functions; the prompts; every generator, restored from OUT's latest checkpoint
    with --resume."""
    weights = args.reward_weights or [1.0] * len(args.reward_fn or [])
    fns = [(*load_reward_fn(spec, args.world), w) for spec, w in zip(args.reward_fn or [], weights)]
    runtime = train.setup(t)
    dev, init, reward = runtime.device, args.init, args.reward
    tok = Tokenizer.load(init / "tokenizer.json")
    pol = _no_dropout(load_model(init, kind="gpt", device=dev))
    lora = finetune.prepare(pol, t)  # LoRA adapters and activation checkpointing, as the flags say
    # with LoRA the reference is the policy with its adapters off: no second copy of the weights
    ref = None if lora else finetune.frozen(_no_dropout(load_model(init, kind="gpt", device=dev)), runtime)
    value_model = (_no_dropout(load_model(args.value_init or reward or init, kind="scalar", device=dev))
                   if args.ppo.critic else None)
    if value_model is not None:
        finetune.prepare(value_model, t, trainable=("score_head",))
    # with LoRA the value model's base is the reward model: no second copy (under FSDP the trunk's forward is
    # the sharded root's, whose hooks a call past its head would skip: a copy there)
    if reward and lora and value_model is not None and args.value_init in (None, reward) and not runtime.fsdp:
        rm = finetune.BaseScorer(value_model)
    else:
        rm = finetune.frozen(_no_dropout(load_model(reward, kind="scalar", device=dev)), runtime) if reward else None
    for name, m in (("reward model", rm), ("value model", value_model)):
        if m is not None and m.config.vocab_size != pol.config.vocab_size:
            raise UserError(f"the {name} has a vocabulary of {m.config.vocab_size} tokens, the policy "
                            f"{pol.config.vocab_size}: they must share the policy's tokenizer")
    models = {"policy": pol} | ({"value": value_model} if value_model is not None else {})
    if args.ppo.ema > 0:
        models["ema"] = _no_dropout(load_model(init, kind="gpt", device=dev)).eval().requires_grad_(False)
    # DDP or FSDP wrappers for the update; rollouts, scoring and checkpoints use the models themselves
    # (sharded in place by FSDP, together with the frozen ones, whose forwards every rank runs in step)
    fwd = (prepare_model(pol, runtime), prepare_model(value_model, runtime) if value_model is not None else None)
    for m in (m for m in (ref, rm, models.get("ema")) if m is not None and runtime.fsdp):
        shard_model(m, runtime)
    optimizers = {name: train.make_optimizer(models[name], t, runtime) for name in ("policy", "value")
                  if name in models}
    ptx = PretrainWindows(args.ptx_data, pol.config.block_size // 2, t.seed) if args.ppo.ptx_coef > 0 else None
    if ptx is not None and ptx.vocab_size != tok.vocab_size:
        raise UserError(f"{args.ptx_data} was tokenized with a vocabulary of {ptx.vocab_size} tokens, the policy's "
                        f"tokenizer has {tok.vocab_size}: prepare it with the policy's tokenizer")
    if not (raw_prompts := list(read_prompts(args.prompts))):
        raise UserError(f"{args.prompts}: no prompts")
    items, prompt_ids = encode_prompts(tok, raw_prompts, pol.config.block_size, args.max_new_tokens)
    run = Run(runtime, tok, models, optimizers, fwd, ref, rm, fns, ptx,
              AdaptiveKL(args.ppo.beta, args.ppo.kl_target, args.ppo.kl_horizon), items, prompt_ids,
              EpochSampler(len(items), t.seed), np.random.default_rng([t.seed, 3]),
              torch.Generator(device=dev).manual_seed(t.seed),
              Checkpointer(args.out, keep_last=t.keep_last, weights=finetune.checkpoint_weights(lora)), lora=lora)
    # --grad-accum only splits a minibatch: a step's rollouts are --batch-size x processes
    world = {"--world": data_digest(args.world / "world.json")} if args.world else None  # the folder's file
    run.fingerprint = train.run_fingerprint(args, runtime, t.max_steps, per_step=t.batch_size * runtime.world_size,
                                            extra=world)
    if t.resume and (latest := run.ckpt.latest()) is not None:
        train.check_resume(run.ckpt.state_of(latest), run.fingerprint, latest)
        state = run.ckpt.load(latest, models, optimizers)
        run.step, run.rng.bit_generator.state = state["step"], state["rng"]
        run.sampler.restore(state["sampler"])
        run.kl_ctl.restore(state["kl"])
        run.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if ptx:
            ptx.restore(state["ptx"])
    return run


def ppo_step(run: Run, args: PPOArgs, t: TrainConfig) -> tuple[dict, list[dict]]:
    """One rollout batch through steps 1-5 (the module docstring), then the EMA and the KL controller.
    Returns the metrics row and the batch's first samples."""
    rt, tok, W, cfg = run.runtime, run.tok, run.runtime.world_size, args.ppo
    pol = run.models["policy"]
    step_t0 = time.time()
    # 1. rollout: every rank its slice of the global batch of prompts, each prompt G times side by side
    G = cfg.group_size
    idx = [i for i in rank_rows(run.sampler.take(t.batch_size * W // G), rt) for _ in range(G)]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=cfg.temperature)
    ro = rollout(pol, [run.prompt_ids[i] for i in idx], params, tok.stop_ids, tok.pad_id, run.generator, rt, G,
                 cfg.shared_prefill)
    texts = [reply_text(tok, r) for r in ro.response_lists()]
    t_gen = time.time() - step_t0
    # 2. score: old and reference log-probabilities, values (gae), and the reward of each response
    scored = score_rollout(ro, pol, run.ref, run.models.get("value"), run.rm, rt, cfg.temperature)
    model = (scored["scores"], args.rm_weight) if run.rm is not None else None
    scored["scores"], parts = score_responses(run.reward_fns, model, [run.items[i].messages for i in idx], texts,
                                              [run.items[i].meta for i in idx], rt.device)
    # 3-4. rewards (with the KL penalty for --kl-mode reward), advantages
    exp = make_experience(ro, scored, cfg, run.kl_ctl.beta, rt)
    t_score = time.time() - step_t0 - t_gen
    # 5. update
    try:
        upd = ppo_update(*run.fwd, run.optimizers["policy"], run.optimizers.get("value"), ro, exp, cfg, rt, run.rng,
                         train.lr_at(run.step, t), t.grad_clip, run.ptx, t.grad_accum, beta=run.kl_ctl.beta,
                         max_len=args.max_new_tokens)
    except train.DivergedError as e:
        raise train.DivergedError(f"step {run.step + 1}: {e}") from None
    if "ema" in run.models:
        ema_update(run.models["ema"], pol, cfg.ema)
    run.step += 1
    row = {"step": run.step, "episode": run.step * t.batch_size * W, "lr": train.lr_at(run.step - 1, t),
           **rollout_metrics(exp, ro.ended, run.kl_ctl.beta, rt, G, parts), **upd,
           "clip_ratio": upd["policy/clipfrac"],
           "time/generate": t_gen, "time/score": t_score, "time/step": time.time() - step_t0}
    run.kl_ctl.update(row["objective/kl"], t.batch_size * W)
    samples = [{"step": run.step, "prompt": run.items[idx[j]].messages[-1]["content"], "response": texts[j],
                "score": float(scored["scores"][j]), "ended": bool(ro.ended[j])} for j in range(min(4, len(idx)))]
    return row, samples


def train_loop(run: Run, args: PPOArgs, t: TrainConfig, log: train.MetricsLog, stage: str) -> None:
    """Rollout batches from run.step to --max-steps: a metrics row every --log-interval steps, samples every
    --sample-interval, a resumable checkpoint every --checkpoint-interval and at the end."""
    progress = train.Progress(t.max_steps, stage, start=run.step)
    while run.step < t.max_steps:
        row, samples = ppo_step(run, args, t)
        if (step := run.step) % t.log_interval == 0:
            log.write(row)
        if run.runtime.is_main and args.sample_interval and step % args.sample_interval == 0:
            with (args.out / "samples.jsonl").open("a") as f:
                f.writelines(json.dumps(s) + "\n" for s in samples)
        if step % t.checkpoint_interval == 0 or step == t.max_steps:
            state = {"step": step, "sampler": run.sampler.state(), "kl": run.kl_ctl.state(),
                     "rng": run.rng.bit_generator.state, "generator": run.generator.get_state().tolist(),
                     "fingerprint": run.fingerprint}
            run.ckpt.save(step, run.models, run.optimizers, state | ({"ptx": run.ptx.state()} if run.ptx else {}))
        progress.update(step, {"score": row["objective/scores"], "kl": row["objective/kl"]})
    progress.close()


def ppo_command(args: PPOArgs) -> dict:
    """PPO (and PPO-ptx with --ptx-coef and --ptx-data), or group RL with --estimator and --group-size, against a
    reward model, verifiable reward functions, or a weighted sum of both.

    A step samples --batch-size responses per process (--group-size to each prompt), then takes --ppo-epochs x
    --minibatches optimizer steps (each minibatch in --grad-accum micro-batches); --max-steps and --warmup-steps
    count these steps. The learning rate is constant after warm-up unless --min-lr is given (a cosine down to it)."""
    t0 = time.time()
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        # 1. every flag checked before anything is written (an unfinished run in OUT needs --resume);
        # the estimator's defaults filled in, so that args.json says what ran
        t = check_args(args)
        args = replace(args, ppo=args.ppo.resolved())
        # 2. models, rewards, prompts and generators (from OUT's latest checkpoint with --resume)
        run = set_up(args, t)
        stage = "ppo-ptx" if run.ptx else "ppo"
        if run.runtime.is_main:
            write_args(args.out, args)
            train.keep_rows_up_to(args.out / "samples.jsonl", run.step)  # later samples come again
        log = train.MetricsLog(args.out / "metrics.jsonl", resume_step=run.step, enabled=run.runtime.is_main,
                               report_to=t.report_to, stage=stage, config=to_dict(args))
        # 3. rollout batches up to --max-steps
        train_loop(run, args, t, log, stage)
        log.close()
        # 4. export the policy (its EMA with --ema); done.json last
        if run.runtime.is_main:
            print(f"{stage}: {finetune.describe(run.models['policy'], run.lora)}")
        run.ckpt.export(run.models.get("ema", run.models["policy"]),
                        extra={"stage": stage, **finetune.lora_record(run.lora, args.init, run.fingerprint["--init"])})
        finetune.write_adapter(run.models["policy"], run.lora, args.init, args.out)
        summary = {"stage": stage, "steps": run.step, "seconds": time.time() - t0}
        if run.runtime.is_main:
            write_done(args.out, summary, tokenizer_from=args.init)
            print(json.dumps(summary))
        return summary
