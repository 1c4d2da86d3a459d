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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import train
from .batching import EpochSampler, PretrainWindows, pad
from .chat import render_prompt
from .checkpoint import Checkpointer, check_out, load_model, read_config, write_done
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
from .tokenizer import Tokenizer

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
    minibatches: int = 4  # optimizer steps per pass (the batch size must be a multiple)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss (the paper's gamma = 27.8)
    missing_end_penalty: float = 1.0  # subtracted from the score of a response that never ends
    ema: float = 0.0  # EMA decay of the policy weights (0: no EMA), e.g. 0.99
    temperature: float = 1.0  # sampling temperature; log-probabilities are taken at the same temperature

    def validate(self) -> None:
        checks = [
            (self.beta >= 0, f"--beta must be >= 0, got {self.beta}"),
            (self.kl_target is None or self.kl_target > 0, f"--kl-target must be positive, got {self.kl_target}"),
            (self.kl_horizon >= 1, f"the KL horizon must be at least 1, got {self.kl_horizon}"),
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
# Rewards, advantages and losses: small functions with the formulas


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


def rollout(policy: GPT, prompt_ids: list[list[int]], params: SamplingParams, eos_id: int, pad_id: int,
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


# ----------------------------------------------------------------------------------------------------
# The update


def ppo_update(policy: GPT, value_model: ScalarModel, opt_p: torch.optim.Optimizer, opt_v: torch.optim.Optimizer,
               ro: Rollout, exp: dict[str, torch.Tensor], cfg: PPOConfig, runtime: Runtime,
               rng: np.random.Generator, lr: float, grad_clip: float = 1.0,
               ptx: PretrainWindows | None = None) -> dict[str, float]:
    """5. cfg.ppo_epochs passes over the rollout batch in cfg.minibatches shuffled minibatches, one optimizer
    step of the policy and of the value model per minibatch. Returns the mean of each statistic, and the
    ratio and approximate KL of the very first minibatch (1 and 0: nothing has moved yet).

    Under torchrun (the models wrapped by `prepare_model`) a minibatch is every rank's share of its own
    shuffled rollouts; its losses and statistics are means over the tokens of every rank."""
    B = ro.ids.size(0)
    if B % cfg.minibatches:
        raise UserError(f"the batch of {B} rollouts does not split into {cfg.minibatches} equal minibatches")
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
            ids, amask, mask = ro.ids[idx], ro.attention_mask[idx], exp["mask"][idx]
            n = all_reduce(mask.sum(), runtime).clamp(min=1)  # the minibatch's response tokens on every rank
            with runtime.autocast():
                logp = response_logprobs(policy, ids, amask, ro.prompt_len, cfg.temperature)
                values = response_values(value_model, ids, amask, ro.prompt_len)
            pl, pstats = policy_loss(logp, exp["old_logp"][idx], exp["advantages"][idx], mask, cfg.clip, n)
            vl, vstats = value_loss(values, exp["old_values"][idx], exp["returns"][idx], mask, cfg.value_clip, n)
            loss = pl + vl
            if ptx is not None:  # this rank's rows of the windows drawn for the whole minibatch
                w = rank_rows(ptx.batch(mb * runtime.world_size), runtime)
                w = {k: v.to(ro.ids.device) for k, v in w.items()}
                with runtime.autocast():
                    logits = policy(w["ids"])
                ptx_loss = token_cross_entropy(logits, w["labels"]) / (w["labels"].numel() * runtime.world_size)
                loss = loss + cfg.ptx_coef * ptx_loss
                pstats["loss/ptx"] = float(ptx_loss.detach())
            ratio_maxdev = pstats.pop("policy/ratio_maxdev")
            row = all_reduce_sums({**pstats, **vstats, "loss/policy": float(pl.detach()),
                                         "loss/value": float(vl.detach())}, runtime)
            total = row["loss/policy"] + row["loss/value"] + cfg.ptx_coef * row.get("loss/ptx", 0.0)
            if not math.isfinite(total):  # the same sums on every rank: all of them stop here
                raise train.DivergedError(f"PPO loss is {total} (policy {row['loss/policy']}, "
                                          f"value {row['loss/value']}); try a lower --lr or a higher --beta")
            opt_p.zero_grad(set_to_none=True)
            opt_v.zero_grad(set_to_none=True)
            # each rank's loss is its share of the minibatch's mean; DDP and FSDP average gradients over ranks
            (loss * runtime.world_size).backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(policy.parameters(), grad_clip)
                torch.nn.utils.clip_grad_norm_(value_model.parameters(), grad_clip)
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


def _no_dropout(model: nn.Module) -> nn.Module:
    # Dropout would make the ratio differ from 1 at the first minibatch and the values noisy.
    set_dropout(model, 0.0, attn=0.0)
    model.config.dropout = model.config.attn_dropout = 0.0
    return model


def encode_prompts(tok: Tokenizer, prompts: list, block_size: int, max_new_tokens: int) -> tuple[list, list]:
    """Render every prompt with the chat template; prompts that leave no room for max_new_tokens in the
    model's context are left out (and counted). Returns (prompts, ids)."""
    kept, ids = [], []
    for p in prompts:
        x = render_prompt(tok, p.messages)
        if len(x) + max_new_tokens <= block_size:
            kept.append(p)
            ids.append(x)
    dropped = len(prompts) - len(kept)
    if dropped:
        print(f"ppo: {dropped} of {len(prompts)} prompt(s) leave no room for {max_new_tokens} new tokens in the "
              f"context of {block_size} and are left out")
    if not kept:
        raise UserError(f"no prompt fits the context of {block_size} tokens with {max_new_tokens} new tokens")
    return kept, ids


def ppo_command(
    policy: Path,
    prompts: Path,
    out: Path,
    reward: Path | None = None,
    reward_fn: str | None = None,
    value_init: Path | None = None,
    batch_size: int = 64,
    max_steps: int = 100,
    max_new_tokens: int = 48,
    temperature: float = 1.0,
    lr: float = 1e-5,
    warmup_steps: int = 5,
    grad_clip: float = 1.0,
    beta: float = 0.02,
    kl_target: float | None = None,
    ppo_epochs: int = 4,
    minibatches: int = 4,
    clip: float = 0.2,
    value_clip: float = 0.2,
    gamma: float = 1.0,
    lam: float = 0.95,
    ptx_coef: float = 0.0,
    ptx_data: Path | None = None,
    missing_end_penalty: float = 1.0,
    ema: float = 0.0,
    sample_interval: int = 10,
    checkpoint_interval: int = 20,
    log_interval: int = 1,
    seed: int = 1337,
    device: str = "auto",
    dtype: str = "auto",
    fsdp: bool = False,
    resume: bool = False,
) -> None:
    """PPO (and PPO-ptx with --ptx-coef and --ptx-data) against a reward model or a custom reward.

    Args:
        policy: the SFT checkpoint: the initial policy and the frozen reference.
        prompts: prompt file (any format the readers accept).
        out: stage folder to write.
        reward: the reward-model checkpoint (frozen); also the value model's initialisation.
        reward_fn: instead of a reward model, `module:function` or `file.py:function` mapping (prompts,
            responses), two lists of strings (the last user message, the decoded response), to one float each.
        value_init: value-model initialisation (default: the reward model, as in the paper; with
            --reward-fn, the policy with a fresh scalar head).
        batch_size: prompts per rollout batch and process (one response each); a multiple of minibatches.
        max_steps: rollout batches (each followed by ppo_epochs x minibatches optimizer steps).
        max_new_tokens: longest response; one cut off here gets missing_end_penalty.
        temperature: sampling temperature of the rollouts (log-probabilities are taken at the same one).
        lr: learning rate of the policy and the value model (constant after warm-up).
        warmup_steps: rollout batches of linear learning-rate warm-up.
        grad_clip: clip each model's gradient norm to this (0: off).
        beta: KL penalty coefficient (the paper's 0.02); the starting value with kl_target.
        kl_target: turns on the adaptive KL controller (Ziegler et al. 2019), which moves beta toward this KL.
        ppo_epochs: passes over each rollout batch.
        minibatches: optimizer steps per pass.
        clip: policy ratio clip epsilon.
        value_clip: value clip epsilon.
        gamma: discount of GAE.
        lam: lambda of GAE.
        ptx_coef: PPO-ptx pretraining-loss coefficient (the paper used 27.8); needs ptx_data.
        ptx_data: a folder written by `instructgpt prepare` (the pretraining distribution).
        missing_end_penalty: subtracted from the score of a response that hits max_new_tokens unfinished.
        ema: EMA decay of the policy weights; the exported policy is the EMA when > 0.
        sample_interval: append a few sample completions to OUT/samples.jsonl every this many steps (0: never).
        checkpoint_interval: save a resumable checkpoint every this many steps (and at the end).
        log_interval: write a metrics row every this many steps.
        seed: seeds sampling, prompt order, minibatch order and pretraining windows.
        device: auto, cpu, cuda, cuda:N.
        dtype: auto, float32 or bfloat16 (autocast; log-probabilities in fp32).
        fsdp: under torchrun, shard the models (and the trained ones' gradients and optimizer states) over the
            ranks (FSDP2) instead of replicating them (DDP).
        resume: continue from the latest checkpoint in OUT.
    """
    t0 = time.time()
    policy_dir, out = Path(policy), Path(out)
    check_out(out, resume, "PPO")
    if (reward is None) == (reward_fn is None):
        raise UserError("give exactly one of --reward (a reward-model folder) and --reward-fn (module:function)")
    if ptx_coef > 0 and ptx_data is None:
        raise UserError("--ptx-coef needs --ptx-data (a folder written by `instructgpt prepare`)")
    if ptx_data is not None and ptx_coef <= 0:
        raise UserError("--ptx-data is used only by PPO-ptx: give --ptx-coef too (the paper used 27.8)")
    if batch_size % minibatches:
        raise UserError(f"--batch-size {batch_size} must be a multiple of --minibatches {minibatches}")
    if read_config(policy_dir)["kind"] != "gpt":
        raise UserError(f"{policy_dir}: PPO needs a decoder-only language model as the policy")
    cfg = PPOConfig(beta=beta, kl_target=kl_target, gamma=gamma, lam=lam, clip=clip, value_clip=value_clip,
                    ppo_epochs=ppo_epochs, minibatches=minibatches, ptx_coef=ptx_coef,
                    missing_end_penalty=missing_end_penalty, ema=ema, temperature=temperature)
    cfg.validate()
    tcfg = train.TrainConfig(batch_size=batch_size, lr=lr, min_lr=lr, warmup_steps=warmup_steps,
                             max_steps=max_steps, weight_decay=0.0, grad_clip=grad_clip, seed=seed, device=device,
                             dtype=dtype, compile=False, log_interval=log_interval,
                             checkpoint_interval=checkpoint_interval, fsdp=fsdp)
    fn = load_reward_fn(reward_fn) if reward_fn else None
    runtime = train.setup(tcfg)
    dev = runtime.device
    tok = Tokenizer.load(policy_dir / "tokenizer.json")

    # Models: policy and reference from SFT; reward frozen; value from the reward model.
    pol = _no_dropout(load_model(policy_dir, kind="gpt", device=dev))
    ref = _no_dropout(load_model(policy_dir, kind="gpt", device=dev)).eval().requires_grad_(False)
    rm = _no_dropout(load_model(reward, kind="scalar", device=dev)).eval().requires_grad_(False) if reward else None
    value_model = _no_dropout(load_model(value_init or reward or policy_dir, kind="scalar", device=dev))
    for name, m in (("reward model", rm), ("value model", value_model)):
        if m is not None and m.config.vocab_size != pol.config.vocab_size:
            raise UserError(f"the {name} has a vocabulary of {m.config.vocab_size} tokens, the policy "
                            f"{pol.config.vocab_size}: they must share the policy's tokenizer")
    ema_model = None
    if ema > 0:
        ema_model = _no_dropout(load_model(policy_dir, kind="gpt", device=dev)).eval().requires_grad_(False)
    # DDP or FSDP wrappers for the update; rollouts, scoring and checkpoints use the models themselves
    # (sharded in place by FSDP, together with the frozen ones, whose forwards every rank runs in step)
    fwd_p, fwd_v = prepare_model(pol, runtime), prepare_model(value_model, runtime)
    if runtime.fsdp:
        for m in (ref, rm, ema_model):
            if m is not None:
                shard_model(m, runtime)
    opt_p = train.make_optimizer(pol, tcfg, runtime)
    opt_v = train.make_optimizer(value_model, tcfg, runtime)
    kl_ctl = AdaptiveKL(beta, kl_target, cfg.kl_horizon)
    ptx = None
    if ptx_coef > 0:
        ptx = PretrainWindows(Path(ptx_data), pol.config.block_size // 2, seed)
        ptx_vocab = json.loads((Path(ptx_data) / "meta.json").read_text()).get("vocab_size")
        if ptx_vocab != tok.vocab_size:
            raise UserError(f"{ptx_data} was tokenized with a vocabulary of {ptx_vocab} tokens, the policy's "
                            f"tokenizer has {tok.vocab_size}: prepare it with the policy's tokenizer")

    # Prompts, and every generator whose state a resumed run must find again.
    raw_prompts = list(read_prompts(prompts))
    if not raw_prompts:
        raise UserError(f"{prompts}: no prompts")
    items, prompt_ids = encode_prompts(tok, raw_prompts, pol.config.block_size, max_new_tokens)
    sampler = EpochSampler(len(items), seed)
    rng = np.random.default_rng([seed, 3])  # minibatch order
    generator = torch.Generator(device=dev).manual_seed(seed)  # sampling noise of the global batch (every rank)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)

    ckpt = Checkpointer(out, keep_last=2)
    step = 0
    models = {"policy": pol, "value": value_model} | ({"ema": ema_model} if ema_model is not None else {})
    optimizers = {"policy": opt_p, "value": opt_v}
    if resume and (latest := ckpt.latest()) is not None:
        state = ckpt.load(latest, models, optimizers)
        step = state["step"]
        sampler.restore(state["sampler"])
        kl_ctl.restore(state["kl"])
        rng.bit_generator.state = state["rng"]
        generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        if ptx:
            ptx.restore(state["ptx"])
    out.mkdir(parents=True, exist_ok=True)
    log = train.MetricsLog(out / "metrics.jsonl", resume_step=step, enabled=runtime.is_main)
    samples_path = out / "samples.jsonl"
    stage = "ppo-ptx" if ptx else "ppo"

    def save(step: int) -> None:
        state = {"step": step, "sampler": sampler.state(), "kl": kl_ctl.state(), "rng": rng.bit_generator.state,
                 "generator": generator.get_state().tolist()}
        if ptx:
            state["ptx"] = ptx.state()
        ckpt.save(step, models, optimizers, state)

    progress = train.Progress(max_steps, stage, start=step)
    W = runtime.world_size
    while step < max_steps:
        step_t0 = time.time()
        # 1. rollout: every rank its slice of the global batch of prompts
        idx = rank_rows(sampler.take(batch_size * W), runtime)
        ro = rollout(pol, [prompt_ids[i] for i in idx], params, tok.eos_id, tok.pad_id, generator, runtime)
        texts = [tok.decode(r) for r in ro.response_lists()]
        t_gen = time.time() - step_t0
        # 2. score: old and reference log-probabilities, values, and the reward of each response
        scored = score_rollout(ro, pol, ref, value_model, rm, runtime, cfg.temperature)
        if fn is not None:
            prompt_texts = [items[i].messages[-1]["content"] for i in idx]
            scored["scores"] = custom_scores(fn[1], fn[0], prompt_texts, texts).to(dev)
        # 3-4. rewards with the KL penalty, advantages
        exp = make_experience(ro, scored, cfg, kl_ctl.beta, runtime)
        t_score = time.time() - step_t0 - t_gen
        # 5. update
        upd = ppo_update(fwd_p, fwd_v, opt_p, opt_v, ro, exp, cfg, runtime, rng, train.lr_at(step, tcfg),
                         grad_clip, ptx)
        if ema_model is not None:
            ema_update(ema_model, pol, cfg.ema)
        step += 1
        row = {"step": step, "episode": step * batch_size * W, "lr": train.lr_at(step - 1, tcfg),
               **rollout_metrics(exp, ro.ended, kl_ctl.beta, runtime), **upd,
               "time/generate": t_gen, "time/score": t_score, "time/step": time.time() - step_t0}
        kl_ctl.update(row["objective/kl"], batch_size * W)
        if step % log_interval == 0:
            log.write(row)
        if runtime.is_main and sample_interval and step % sample_interval == 0:
            with samples_path.open("a") as f:
                for j in range(min(4, len(idx))):
                    f.write(json.dumps({"step": step, "prompt": items[idx[j]].messages[-1]["content"],
                                        "response": texts[j], "score": float(scored["scores"][j]),
                                        "ended": bool(ro.ended[j])}) + "\n")
        if step % checkpoint_interval == 0 or step == max_steps:
            save(step)
        progress.update(step, {"score": row["objective/scores"], "kl": row["objective/kl"]})
    progress.close()

    final = ema_model if ema_model is not None else pol
    ckpt.export(final, extra={"stage": stage})
    if not runtime.is_main:
        return
    summary = {"stage": stage, "steps": step, "seconds": time.time() - t0}
    write_done(out, summary, tokenizer_from=policy_dir)
    print(json.dumps(summary))
