"""PPO against the reward model with a per-token KL penalty to the SFT model, and PPO-ptx
(InstructGPT step 3; paper section 3.5 and appendix C.3-C.4).

The policy and the frozen reference both start from SFT; the value model starts from the reward model,
which stays frozen. Each step:

  1. rollout            sample one response per prompt (generation engine, temperature 1, KV cache)
  2. score_rollout      old log-probabilities, reference log-probabilities, old values, reward-model scores
  3. compute_rewards    r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)), plus the score at the last token
                        (a response that never produced the end token first loses missing_end_penalty)
  4. compute_advantages GAE (gamma 1, lambda 0.95), then whitened over the batch's response tokens
  5. ppo_update         clipped surrogate and clipped value loss over minibatches and inner epochs,
                        plus, for PPO-ptx, ptx_coef * the next-token loss on pretraining windows

    objective(phi) = E[r(x, y) - beta * log(pi_phi(y|x) / pi_SFT(y|x))] + gamma * E_pretrain[log pi_phi(x)]

Tensors of a batch: B rollouts, P prompt positions (prompts left-padded to the longest), R response
positions (responses right-padded to the longest); a response includes its end token.

Metrics follow TRL's names (objective/kl, objective/entropy, objective/scores, objective/rlhf_reward,
policy/approxkl, policy/clipfrac, loss/policy, loss/value, val/clipfrac, ...), so curves compare directly.

Under torchrun each rank rolls out its slice of the global batch of prompts (`--batch-size` per rank), with
sampling noise drawn for the whole batch (`GumbelPolicy`), and generation runs until every rank's rows have
ended. The advantages are whitened, the losses normalised and the statistics averaged over the tokens and
rollouts of every rank; each rank shuffles its own rollouts into its share of every minibatch. With one
minibatch per epoch, N ranks with batch B follow one process with batch N x B exactly.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import train
from .batching import EpochSampler, PretrainWindows, pad
from .chat import render_prompt
from .checkpoint import Checkpointer, check_out, load_model, read_config, write_done, writing
from .data import read_prompts
from .distributed import Runtime, all_ranks_finished, all_reduce, all_reduce_sums, prepare_model, rank_rows, shard_model
from .errors import UserError
from .generate import SamplingParams, generate
from .losses import (
    AdaptiveKL,
    compute_advantages,
    compute_rewards,
    masked_whiten,
    policy_loss,
    response_logprobs,
    response_values,
    rewards_of,
    token_cross_entropy,
    value_loss,
)
from .model import GPT, ScalarModel, set_dropout
from .recipe import to_dict, write_args
from .tokenizer import Tokenizer
from .train import TrainConfig

RewardFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass
class PPOConfig:
    """Hyperparameters of PPO (paper appendix C.4 where it gives them)."""

    beta: float = 0.02  # KL penalty coefficient (the paper's beta); the starting value when adaptive
    kl_target: float | None = None  # adaptive KL (Ziegler et al. 2019): move beta so the KL tracks this
    kl_horizon: int = 10000  # adaptive KL: rollouts over which beta may change by at most 20%
    gamma: float = 1.0  # discount; 1 because the only non-KL reward is at the end of the response
    lam: float = 0.95  # GAE lambda: bias (0) against variance (1) of the advantage estimate
    clip: float = 0.2  # policy ratio clip epsilon
    value_clip: float = 0.2  # how far a value may move from its rollout-time estimate before it is clipped
    ppo_epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # optimizer steps per pass (--batch-size must be a multiple)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss (the paper's gamma = 27.8); needs --ptx-data
    missing_end_penalty: float = 1.0  # subtracted from the score of a response that never ends
    ema: float = 0.0  # EMA decay of the policy weights (0: no EMA), e.g. 0.99; the exported policy is the EMA
    temperature: float = 1.0  # sampling temperature; log-probabilities are taken at the same temperature

    def validate(self) -> None:
        checks = [
            (self.beta >= 0, f"--beta must be >= 0, got {self.beta}"),
            (self.kl_target is None or self.kl_target > 0, f"--kl-target must be positive, got {self.kl_target}"),
            (self.kl_horizon >= 1, f"--kl-horizon must be at least 1, got {self.kl_horizon}"),
            (0 <= self.gamma <= 1, f"--gamma must be in [0, 1], got {self.gamma}"),
            (0 <= self.lam <= 1, f"--lam must be in [0, 1], got {self.lam}"),
            (self.clip > 0, f"--clip must be positive, got {self.clip}"),
            (self.value_clip > 0, f"--value-clip must be positive, got {self.value_clip}"),
            (self.ppo_epochs >= 1, f"--ppo-epochs must be at least 1, got {self.ppo_epochs}"),
            (self.minibatches >= 1, f"--minibatches must be at least 1, got {self.minibatches}"),
            (self.ptx_coef >= 0, f"--ptx-coef must be >= 0, got {self.ptx_coef}"),
            (math.isfinite(self.missing_end_penalty),
             f"--missing-end-penalty must be finite, got {self.missing_end_penalty}"),
            (0 <= self.ema < 1, f"--ema must be in [0, 1), got {self.ema}"),
            (self.temperature > 0, f"--temperature must be positive for PPO, got {self.temperature}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# ----------------------------------------------------------------------------------------------------
# Rollouts and scoring


@dataclass
class Rollout:
    ids: torch.Tensor  # (B, P + R): left-padded prompt, then right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    response_mask: torch.Tensor  # (B, R) 1 on real response tokens (the end token included)
    ended: torch.Tensor  # (B,) bool: the response produced the end token
    prompt_len: int  # P

    @property
    def response(self) -> torch.Tensor:
        return self.ids[:, self.prompt_len:]  # (B, R)

    def response_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.response, self.response_mask.sum(1).tolist())]


class GumbelPolicy(nn.Module):
    """The policy as the rollouts decode it: its next-token logits / temperature plus Gumbel noise -log(E),
    E ~ Exp(1), so that greedy decoding draws from softmax(logits / temperature) (the Gumbel-max trick, which
    is also how torch.multinomial samples). Each decode step draws the noise of the whole global batch from a
    generator in the same state on every rank, and keeps this rank's rows: a row's sample depends on its place
    in the global batch, not on the rank that decodes it, so N ranks with B prompts each sample exactly what
    one process with the N x B prompts does."""

    def __init__(self, policy: GPT, temperature: float, generator: torch.Generator | None, rank: int = 0,
                 world_size: int = 1):
        super().__init__()
        self.policy, self.config = policy, policy.config
        self.temperature, self.generator = temperature, generator
        self.rank, self.world_size = rank, world_size

    def forward(self, *args, **kwargs) -> torch.Tensor:
        logits = self.policy(*args, **kwargs)[:, -1:].float() / self.temperature  # (B, 1, V)
        B, _, V = logits.shape
        e = torch.empty(self.world_size * B, V, device=logits.device).exponential_(generator=self.generator)
        e = e[self.rank * B:(self.rank + 1) * B]  # (B, V): this rank's rows of the global batch
        return logits - e.log()[:, None]


def rollout(policy: GPT, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int | Sequence[int], pad_id: int,
            generator: torch.Generator | None, runtime: Runtime | None = None) -> Rollout:
    """1. Sample one response per prompt (lists of ids) with the generation engine, at params.temperature.
    Under torchrun the prompts are this rank's slice of the global batch; generation runs until every rank's
    rows have ended, so a sharded policy runs its forwards in step on every rank (invariant 12)."""
    if params.temperature <= 0 or params.top_k or params.top_p < 1:
        raise ValueError("rollouts sample from the whole distribution at a positive temperature (no top-k, top-p)")
    rank, world_size = (runtime.rank, runtime.world_size) if runtime is not None else (0, 1)
    sampler = GumbelPolicy(policy, params.temperature, generator, rank, world_size)
    all_finished = all_ranks_finished(runtime) if runtime is not None else None
    gen = generate(sampler, prompt_ids, replace(params, temperature=0.0), eos_id, pad_id, all_finished=all_finished)
    device = gen.tokens.device
    prompt, prompt_mask = (t.to(device) for t in pad(prompt_ids, pad_id, "left"))  # (B, P) each
    R = gen.tokens.size(1)
    resp_mask = (torch.arange(R, device=device)[None] < gen.lengths[:, None]).long()  # (B, R)
    ids = torch.cat([prompt, gen.tokens], 1)  # (B, P + R)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    return Rollout(ids, mask, resp_mask, gen.ended, prompt.size(1))


def score_rollout(ro: Rollout, policy: GPT, ref: GPT, value_model: ScalarModel, reward_model: ScalarModel | None,
                  runtime: Runtime, temperature: float = 1.0) -> dict[str, torch.Tensor]:
    """2. Old and reference log-probabilities (B, R), old values (B, R) and, with a reward model, the score
    of each response (B,), read at its last real token (the attention mask says where)."""
    ids, mask, P = ro.ids, ro.attention_mask, ro.prompt_len
    out = {}
    with torch.no_grad(), runtime.autocast():
        out["old_logp"] = response_logprobs(policy, ids, mask, P, temperature)
        out["ref_logp"] = response_logprobs(ref, ids, mask, P, temperature)
        out["old_values"] = response_values(value_model, ids, mask, P)
        if reward_model is not None:
            scores = rewards_of(reward_model, ids, mask)  # (B,) at each row's last real token
            if not torch.isfinite(scores).all():
                raise UserError("the reward model returned a non-finite score; check its checkpoint")
            out["scores"] = scores
    return out


def load_reward_fn(spec: str) -> tuple[str, RewardFn]:
    """`module:function` or `path/to/file.py:function`: a custom reward taking (prompts, responses) as lists
    of strings and returning one float per response. Modules are also looked up in the current folder.
    Returns (spec, function)."""
    module, sep, name = spec.rpartition(":")
    if not sep or not module or not name:
        raise UserError(f"--reward-fn must look like module:function or file.py:function, got {spec!r}")
    try:
        if module.endswith(".py"):
            if not Path(module).is_file():
                raise ImportError(f"no file {module}")
            loader_spec = importlib.util.spec_from_file_location(Path(module).stem, module)
            mod = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(mod)
        else:
            if str(Path.cwd()) not in sys.path and "" not in sys.path:
                sys.path.append(str(Path.cwd()))
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load reward function {spec!r}: {e}") from None
    if not callable(fn):
        raise UserError(f"reward function {spec!r} is not callable")
    return spec, fn


def custom_scores(fn: RewardFn, name: str, prompts: list[str], responses: list[str]) -> torch.Tensor:
    """Call a custom reward and check what it returns: one finite number per response, or a UserError
    that names the function."""
    values = fn(prompts, responses)
    if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__"):
        raise UserError(f"reward function {name} must return a list of {len(responses)} numbers, "
                        f"got {type(values).__name__}")
    if len(values) != len(responses):
        raise UserError(f"reward function {name} returned {len(values)} rewards for {len(responses)} responses")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise UserError(f"reward function {name} returned {v!r} for response {i} "
                            f"({responses[i]!r:.80}); expected a number") from None
        if not math.isfinite(out[-1]):
            raise UserError(f"reward function {name} returned a non-finite reward ({v}) for response {i}: "
                            f"{responses[i]!r:.80}")
    return torch.tensor(out, dtype=torch.float32)


def make_experience(ro: Rollout, scored: dict[str, torch.Tensor], cfg: PPOConfig, beta: float,
                    runtime: Runtime | None = None) -> dict[str, torch.Tensor]:
    """3-4. From the scored rollout to what the update needs: the penalised scores (B,), per-token rewards
    and KL (B, R), advantages whitened over the response tokens of every rank, and returns (B, R). The KL here
    is the one that is logged."""
    mask = ro.response_mask.float()
    # A response cut off at max_new_tokens loses missing_end_penalty (TRL's missing_eos_penalty), so that
    # rambling on is never a way around a reward model that dislikes how an answer ends.
    scores = scored["scores"] - cfg.missing_end_penalty * (~ro.ended).float()
    rewards, kl = compute_rewards(scores, scored["old_logp"], scored["ref_logp"], mask, beta)
    adv, returns = compute_advantages(scored["old_values"], rewards, mask, cfg.gamma, cfg.lam)
    return {**scored, "mask": mask, "penalised_scores": scores, "rewards": rewards, "kl": kl,
            "advantages": masked_whiten(adv, mask, runtime=runtime), "returns": returns}


def rollout_metrics(exp: dict[str, torch.Tensor], ended: torch.Tensor, beta: float,
                    runtime: Runtime | None = None) -> dict[str, float]:
    """What the rollouts say, under TRL's names; sums over each response's tokens, means over the responses
    (of every rank: each holds as many, so the mean of the ranks' means)."""
    kl = exp["kl"].sum(1)  # (B,)
    non_score = -beta * kl
    means = {
        "objective/kl": float(kl.mean()),
        "objective/entropy": float(-(exp["old_logp"] * exp["mask"]).sum(1).mean()),
        "objective/scores": float(exp["scores"].mean()),
        "objective/non_score_reward": float(non_score.mean()),
        "objective/rlhf_reward": float((exp["penalised_scores"] + non_score).mean()),
        "val/ended": float(ended.float().mean()),
        "val/response_length": float(exp["mask"].sum(1).mean()),
    }
    if runtime is not None and runtime.distributed:
        means = {k: v / runtime.world_size for k, v in all_reduce_sums(means, runtime).items()}
    return {"objective/kl_coef": beta, **means}


# The update


def ppo_update(policy: GPT, value_model: ScalarModel, opt_p: torch.optim.Optimizer, opt_v: torch.optim.Optimizer,
               ro: Rollout, exp: dict[str, torch.Tensor], cfg: PPOConfig, runtime: Runtime,
               rng: np.random.Generator, lr: float, grad_clip: float = 1.0,
               ptx: PretrainWindows | None = None, grad_accum: int = 1) -> dict[str, float]:
    """5. cfg.ppo_epochs passes over the rollout batch in cfg.minibatches shuffled minibatches, one optimizer
    step of the policy and of the value model per minibatch, its gradients added up over grad_accum
    micro-batches (the same step in less memory). Returns the mean of each statistic, and the ratio and
    approximate KL of the very first minibatch (1 and 0: nothing has moved yet).

    Under torchrun (the models wrapped by `prepare_model`) a minibatch is every rank's share of its own
    shuffled rollouts; its losses and statistics are means over the tokens of every rank."""
    B, W = ro.ids.size(0), runtime.world_size
    if B % (cfg.minibatches * grad_accum):
        raise UserError(f"the batch of {B} rollouts does not split into {cfg.minibatches} equal minibatches of "
                        f"{grad_accum} equal micro-batches")
    mb = B // cfg.minibatches
    for opt in (opt_p, opt_v):
        for group in opt.param_groups:
            group["lr"] = lr
    policy.train()
    value_model.train()
    stats: dict[str, list[float]] = {}
    first: dict[str, float] = {}
    for _ in range(cfg.ppo_epochs):
        order = torch.from_numpy(rng.permutation(B)).to(ro.ids.device)
        for s in range(0, B, mb):
            idx = order[s:s + mb]
            n = all_reduce(exp["mask"][idx].sum(), runtime).clamp(min=1)  # the minibatch's response tokens, all ranks
            if ptx is not None:  # this rank's rows of the windows drawn for the whole minibatch
                w = {k: v.to(ro.ids.device) for k, v in rank_rows(ptx.batch(mb * W), runtime).items()}
            opt_p.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            row: dict[str, float] = {}
            for part in (slice(j * mb // grad_accum, (j + 1) * mb // grad_accum) for j in range(grad_accum)):
                i = idx[part]
                ids, amask, mask = ro.ids[i], ro.attention_mask[i], exp["mask"][i]
                with runtime.autocast():
                    logp = response_logprobs(policy, ids, amask, ro.prompt_len, cfg.temperature)
                    values = response_values(value_model, ids, amask, ro.prompt_len)
                pl, pstats = policy_loss(logp, exp["old_logp"][i], exp["advantages"][i], mask, cfg.clip, n)
                vl, vstats = value_loss(values, exp["old_values"][i], exp["returns"][i], mask, cfg.value_clip, n)
                loss = pl + vl
                if ptx is not None:
                    with runtime.autocast():
                        logits = policy(w["ids"][part])
                    ptx_loss = token_cross_entropy(logits, w["labels"][part]) / (w["labels"].numel() * W)
                    loss = loss + cfg.ptx_coef * ptx_loss
                    pstats["loss/ptx"] = float(ptx_loss.detach())
                # each rank's loss is its share of the minibatch's mean; DDP and FSDP average gradients over
                # ranks (at every micro-batch: they add up in .grad all the same)
                (loss * W).backward()
                part_stats = {**pstats, **vstats, "loss/policy": float(pl.detach()), "loss/value": float(vl.detach())}
                for k, v in part_stats.items():  # shares of the means add up; the ratio's deviation is the max
                    row[k] = v if k not in row else max(row[k], v) if k == "policy/ratio_maxdev" else row[k] + v
            ratio_maxdev = row.pop("policy/ratio_maxdev")
            row = all_reduce_sums(row, runtime)
            total = row["loss/policy"] + row["loss/value"] + cfg.ptx_coef * row.get("loss/ptx", 0.0)
            if not math.isfinite(total):  # the same sums on every rank: all of them stop here, before any step
                raise train.DivergedError(f"PPO loss is {total} (policy {row['loss/policy']}, "
                                          f"value {row['loss/value']}); try a lower --lr or a higher --beta")
            # a finite loss can still have a non-finite gradient (a bf16 overflow): every rank stops before the step
            train.clip_and_check({"policy": policy, "value": value_model}, grad_clip)
            opt_p.step()
            opt_v.step()
            if not first:
                maxdev = all_reduce(torch.tensor(ratio_maxdev, device=ro.ids.device), runtime, op="max")
                first = {"policy/first_ratio_maxdev": float(maxdev), "policy/first_approxkl": row["policy/approxkl"]}
            for k, v in row.items():
                stats.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in stats.items()} | first


def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p, 1 - decay)


# ----------------------------------------------------------------------------------------------------
# The stage

# PPO's defaults of the shared training settings; --max-steps and --warmup-steps count rollout batches
TRAIN_DEFAULTS = dict(batch_size=64, lr=1e-5, warmup_steps=5, max_steps=100, weight_decay=0.0, compile=False,
                      log_interval=1, checkpoint_interval=20)


@dataclass
class PPOArgs:
    """`ppo_command`'s arguments: inputs and outputs, the RL hyperparameters, the training settings."""

    init: Path  # the SFT checkpoint: the initial policy and the frozen reference
    prompts: Path  # prompt file (any format the readers accept)
    out: Path  # stage folder to write
    reward: Path | None = None  # the reward-model checkpoint (frozen); also the value model's initialisation
    # instead of --reward: module:function or file.py:function, (last user messages, responses) -> one float each
    reward_fn: str | None = None
    # value-model initialisation; None: the reward model (as in the paper), with --reward-fn the policy + new head
    value_init: Path | None = None
    max_new_tokens: int = 48  # longest response; one cut off here loses --missing-end-penalty
    ptx_data: Path | None = None  # PPO-ptx: a folder written by `instructgpt prepare` (the pretraining data)
    sample_interval: int = 10  # append a few samples to OUT/samples.jsonl every this many steps (0: never)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(**TRAIN_DEFAULTS))


def check_args(args: PPOArgs) -> TrainConfig:
    """Every user error found before anything is written. Returns the training settings resolved: None means
    PPO's default max_steps or warmup_steps, min_lr = lr (constant after warm-up), a checkpoint at the end only."""
    t, cfg = args.train, args.ppo
    check_out(args.out, t.resume, "PPO")
    if (args.reward is None) == (args.reward_fn is None):
        raise UserError("give exactly one of --reward (a reward-model folder) and --reward-fn (module:function)")
    if cfg.ptx_coef > 0 and args.ptx_data is None:
        raise UserError("--ptx-coef needs --ptx-data (a folder written by `instructgpt prepare`)")
    if args.ptx_data is not None and cfg.ptx_coef <= 0:
        raise UserError("--ptx-data is used only by PPO-ptx: give --ptx-coef too (the paper used 27.8)")
    if t.compile:
        raise UserError("PPO does not compile its models yet: drop --compile")
    if t.eval_interval is not None:
        raise UserError("PPO has no evaluation: drop --eval-interval (metrics are logged every --log-interval steps)")
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
    """What the loop needs: models, optimizers, reward, prompts, and every generator whose state a resumed
    run must find again."""

    runtime: Runtime
    tok: Tokenizer
    models: dict[str, nn.Module]  # the trained ones, as checkpoints hold them: policy, value (and ema)
    optimizers: dict[str, torch.optim.Optimizer]  # policy, value
    fwd: tuple[nn.Module, nn.Module]  # the policy and the value model as the update calls them (DDP or FSDP)
    ref: GPT
    rm: ScalarModel | None
    reward_fn: tuple[str, RewardFn] | None
    ptx: PretrainWindows | None
    kl_ctl: AdaptiveKL
    items: list  # the prompts that fit, and their ids
    prompt_ids: list[list[int]]
    sampler: EpochSampler  # prompt order
    rng: np.random.Generator  # minibatch order
    generator: torch.Generator  # sampling noise of the global batch (every rank)
    ckpt: Checkpointer
    step: int = 0
    fingerprint: dict | None = None  # the data and settings a resumed run must share (`train.check_resume`)


def set_up(args: PPOArgs, t: TrainConfig) -> Run:
    """The runtime; policy and reference from SFT, the reward model frozen, the value model from the reward
    model; the prompts; every generator, restored from OUT's latest checkpoint with --resume."""
    fn = load_reward_fn(args.reward_fn) if args.reward_fn else None
    runtime = train.setup(t)
    dev, init, reward = runtime.device, args.init, args.reward
    tok = Tokenizer.load(init / "tokenizer.json")
    pol = _no_dropout(load_model(init, kind="gpt", device=dev))
    ref = _no_dropout(load_model(init, kind="gpt", device=dev)).eval().requires_grad_(False)
    rm = _no_dropout(load_model(reward, kind="scalar", device=dev)).eval().requires_grad_(False) if reward else None
    value_model = _no_dropout(load_model(args.value_init or reward or init, kind="scalar", device=dev))
    for name, m in (("reward model", rm), ("value model", value_model)):
        if m is not None and m.config.vocab_size != pol.config.vocab_size:
            raise UserError(f"the {name} has a vocabulary of {m.config.vocab_size} tokens, the policy "
                            f"{pol.config.vocab_size}: they must share the policy's tokenizer")
    models = {"policy": pol, "value": value_model}
    if args.ppo.ema > 0:
        models["ema"] = _no_dropout(load_model(init, kind="gpt", device=dev)).eval().requires_grad_(False)
    # DDP or FSDP wrappers for the update; rollouts, scoring and checkpoints use the models themselves
    # (sharded in place by FSDP, together with the frozen ones, whose forwards every rank runs in step)
    fwd = (prepare_model(pol, runtime), prepare_model(value_model, runtime))
    for m in (m for m in (ref, rm, models.get("ema")) if m is not None and runtime.fsdp):
        shard_model(m, runtime)
    optimizers = {"policy": train.make_optimizer(pol, t, runtime),
                  "value": train.make_optimizer(value_model, t, runtime)}
    ptx = PretrainWindows(args.ptx_data, pol.config.block_size // 2, t.seed) if args.ppo.ptx_coef > 0 else None
    if ptx is not None and ptx.vocab_size != tok.vocab_size:
        raise UserError(f"{args.ptx_data} was tokenized with a vocabulary of {ptx.vocab_size} tokens, the policy's "
                        f"tokenizer has {tok.vocab_size}: prepare it with the policy's tokenizer")
    if not (raw_prompts := list(read_prompts(args.prompts))):
        raise UserError(f"{args.prompts}: no prompts")
    items, prompt_ids = encode_prompts(tok, raw_prompts, pol.config.block_size, args.max_new_tokens)
    run = Run(runtime, tok, models, optimizers, fwd, ref, rm, fn, ptx,
              AdaptiveKL(args.ppo.beta, args.ppo.kl_target, args.ppo.kl_horizon), items, prompt_ids,
              EpochSampler(len(items), t.seed), np.random.default_rng([t.seed, 3]),
              torch.Generator(device=dev).manual_seed(t.seed), Checkpointer(args.out, keep_last=t.keep_last))
    # --grad-accum only splits a minibatch: a step's rollouts are --batch-size x processes
    run.fingerprint = train.run_fingerprint(args, runtime, t.max_steps, per_step=t.batch_size * runtime.world_size)
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
    rt, tok, W = run.runtime, run.tok, run.runtime.world_size
    pol, value_model = run.models["policy"], run.models["value"]
    step_t0 = time.time()
    # 1. rollout: every rank its slice of the global batch of prompts
    idx = rank_rows(run.sampler.take(t.batch_size * W), rt)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.ppo.temperature)
    ro = rollout(pol, [run.prompt_ids[i] for i in idx], params, tok.stop_ids, tok.pad_id, run.generator, rt)
    texts = [tok.decode(r) for r in ro.response_lists()]
    prompts = [run.items[i].messages[-1]["content"] for i in idx]
    t_gen = time.time() - step_t0
    # 2. score: old and reference log-probabilities, values, and the reward of each response
    scored = score_rollout(ro, pol, run.ref, value_model, run.rm, rt, args.ppo.temperature)
    if run.reward_fn is not None:
        scored["scores"] = custom_scores(run.reward_fn[1], run.reward_fn[0], prompts, texts).to(rt.device)
    # 3-4. rewards with the KL penalty, advantages
    exp = make_experience(ro, scored, args.ppo, run.kl_ctl.beta, rt)
    t_score = time.time() - step_t0 - t_gen
    # 5. update
    try:
        upd = ppo_update(*run.fwd, run.optimizers["policy"], run.optimizers["value"], ro, exp, args.ppo, rt, run.rng,
                         train.lr_at(run.step, t), t.grad_clip, run.ptx, t.grad_accum)
    except train.DivergedError as e:
        raise train.DivergedError(f"step {run.step + 1}: {e}") from None
    if "ema" in run.models:
        ema_update(run.models["ema"], pol, args.ppo.ema)
    run.step += 1
    row = {"step": run.step, "episode": run.step * t.batch_size * W, "lr": train.lr_at(run.step - 1, t),
           **rollout_metrics(exp, ro.ended, run.kl_ctl.beta, rt), **upd,
           "time/generate": t_gen, "time/score": t_score, "time/step": time.time() - step_t0}
    run.kl_ctl.update(row["objective/kl"], t.batch_size * W)
    samples = [{"step": run.step, "prompt": prompts[j], "response": texts[j], "score": float(scored["scores"][j]),
                "ended": bool(ro.ended[j])} for j in range(min(4, len(idx)))]
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
    """PPO (and PPO-ptx with --ptx-coef and --ptx-data) against a reward model or a custom reward.

    A step samples a response to each of --batch-size prompts per process, then takes --ppo-epochs x --minibatches
    optimizer steps (each minibatch in --grad-accum micro-batches); --max-steps and --warmup-steps count these
    steps. The learning rate is constant after warm-up unless --min-lr is given (a cosine down to it)."""
    t0 = time.time()
    with writing(args.out):  # OUT/.lock: one process writes OUT at a time
        # 1. every flag checked before anything is written (an unfinished run in OUT needs --resume)
        t = check_args(args)
        # 2. models, reward, prompts and generators (from OUT's latest checkpoint with --resume)
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
        run.ckpt.export(run.models.get("ema", run.models["policy"]), extra={"stage": stage})
        summary = {"stage": stage, "steps": run.step, "seconds": time.time() - t0}
        if run.runtime.is_main:
            write_done(args.out, summary, tokenizer_from=args.init)
            print(json.dumps(summary))
        return summary
