"""RLHF stages on the CPU against Hugging Face TRL, both in the same run (see ../shared/BENCHMARKS.md, "RLHF
stages"; ../shared/peers/trl/ has TRL's side of the workload and the set-up of its virtual environments).

A randomly initialised GPT-2-style model of 4 layers, 4 heads, 128 dims, vocabulary 512 (0.9M parameters),
fp32, no dropout, 2 threads; synthetic token data: prompts of 47..51 tokens (mean 49), completions of 46..50
(mean 48), batches right- or left-padded to their longest (about 98 tokens); batch 16. Each stage is driven
through the library functions its command uses, so this measures the hot loops:

  sft   train.train_step with sft.sft_loss_sum                     16 demonstrations per step
  rm    train.train_step with rm.batch_loss_sum (K = 2)            16 pairs (32 sequences) per step
  dpo   train.train_step with losses.dpo_loss on losses.sequence_logprobs, 16 pairs per step; the reference
        log-probabilities are computed in every step (as TRL does by default), not once up front
  grpo  rl.rollout of 4 prompts x G = 4 samples (each prompt prefilled once), rl.score_rollout (policy and
  rloo  reference), a Python reward of each response, rl.make_experience (the estimator's advantages, KL 0.05),
        rl.ppo_update (one optimizer step); 16 completions per step
  ppo   rl.rollout (exactly 32 new tokens: the end token is an id that never occurs), rl.score_rollout
        (policy, reference, value and reward model), rl.make_experience (compute_rewards and
        compute_advantages), rl.ppo_update (4 epochs); 16 completions per step

Rates exclude 2 warm-up steps. One JSON line per stage with our rate and, with --trl (and --trl-ppo for ppo),
TRL's rate measured right after ours in a process of its own with the same threads, and the ratio; the RL
stages add the seconds per step spent generating, scoring and updating.

    bash ../shared/peers/trl/setup.sh /tmp/trl-venvs      # once: TRL 1.16 and 1.12 in two virtual environments
    python benchmarks/rlhf_cpu.py --trl /tmp/trl-venvs/trl/bin/python --trl-ppo /tmp/trl-venvs/trl-ppo/bin/python
    python benchmarks/rlhf_cpu.py --stages ppo --ppo-minibatches 1 4   # ours alone; also 4 minibatches

On a machine shared with other busy processes, 2 OpenMP threads that spin-wait at every barrier can make
small kernels 100x slower; `OMP_WAIT_POLICY=passive python benchmarks/rlhf_cpu.py` keeps the figures
meaningful there (the JSON records the load average and the policy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from instructgpt import distributed, losses, rm, sft, train
from instructgpt.batching import IGNORE, pad_labelled
from instructgpt.generate import SamplingParams
from instructgpt.model import GPT, ModelConfig, ScalarModel
from instructgpt.ppo import PPOConfig, make_experience, ppo_update, rollout, score_rollout

BATCH = 16
PROMPT_LEN = (47, 51)  # inclusive range, mean 49
COMPLETION_LEN = (46, 50)  # mean 48
NEW_TOKENS = 32
PAD, FIRST_ID, VOCAB = 0, 6, 512  # ids below FIRST_ID are the special tokens
GROUP = 4  # samples per prompt in grpo and rloo (TRL's workload: 4 prompts x 4 completions)
STAGES = ("sft", "rm", "dpo", "grpo", "rloo", "ppo")
UNIT = {"sft": "samples/s", "rm": "pairs/s", "dpo": "pairs/s", "grpo": "completions/s", "rloo": "completions/s",
        "ppo": "completions/s"}
TRL_SCRIPT = Path(__file__).resolve().parents[2] / "shared" / "peers" / "trl" / "bench_trl.py"
TRL_WORKLOAD = {"sft": "sft", "rm": "reward", "dpo": "dpo", "grpo": "grpo", "rloo": "rloo", "ppo": "ppo"}


def model_config() -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, n_layer=4, n_head=4, n_embd=128, block_size=128, dropout=0.0)


def tokens(rng: np.random.Generator, bounds: tuple[int, int]) -> list[int]:
    n = int(rng.integers(bounds[0], bounds[1] + 1))
    return rng.integers(FIRST_ID, VOCAB, n).tolist()


def runtime(threads: int) -> distributed.Runtime:
    torch.set_num_threads(threads)
    return distributed.Runtime(device=torch.device("cpu"), dtype=torch.float32, autocast=contextlib.nullcontext,
                         threads=threads)


CPU_SECONDS: dict[str, float] = {}


def timed(step_fn, steps: int, warmup: int = 2) -> float:
    """Wall seconds per step over `steps` steps after `warmup` untimed ones (the process's CPU seconds per
    step go to CPU_SECONDS["last"]: on a busy machine, CPU seconds / threads estimates the idle wall time)."""
    for i in range(warmup):
        step_fn(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    CPU_SECONDS["last"] = (time.process_time() - c0) / steps
    return (time.perf_counter() - t0) / steps


# ----------------------------------------------------------------------------------------------------
# Offline stages


def bench_sft(rt: distributed.Runtime, steps: int, rng: np.random.Generator) -> dict:
    torch.manual_seed(0)
    model = GPT(model_config())
    tcfg = train.TrainConfig(batch_size=BATCH, lr=1e-4, warmup_steps=0, max_steps=10**6, weight_decay=0.0)
    opt = train.make_optimizer(model, tcfg, rt)
    batches = []
    for _ in range(4):
        items = []
        for _ in range(BATCH):
            p, c = tokens(rng, PROMPT_LEN), tokens(rng, COMPLETION_LEN) + [2]
            ids = p + c
            labels = [IGNORE] * (len(p) - 1) + c
            items.append(sft.Encoded(ids=ids[:-1], labels=labels))
        batches.append(sft.pad_batch(items, PAD))
    model.train()
    sec = timed(lambda i: train.train_step(model, opt, [batches[i % 4]], sft.sft_loss_sum, sft.n_targets, tcfg, rt,
                                           i), steps)
    return {"stage": "sft", "seconds_per_step": sec, "rate": BATCH / sec, "cpu_seconds_per_step": CPU_SECONDS["last"],
            "tokens_per_batch": int(batches[0]["ids"].size(1))}


def bench_rm(rt: distributed.Runtime, steps: int, rng: np.random.Generator) -> dict:
    torch.manual_seed(0)
    model = ScalarModel(model_config())
    tcfg = train.TrainConfig(batch_size=BATCH, lr=1e-4, warmup_steps=0, max_steps=10**6, weight_decay=0.0)
    opt = train.make_optimizer(model, tcfg, rt)
    batches = []
    for _ in range(4):
        items = []
        for _ in range(BATCH):
            p = tokens(rng, PROMPT_LEN)
            seqs = [p + tokens(rng, COMPLETION_LEN) + [2] for _ in range(2)]
            items.append(rm.EncodedComparison(seqs=seqs, pairs=[(0, 1)]))
        batches.append(rm.make_batch(items, PAD))
    model.train()
    sec = timed(lambda i: train.train_step(model, opt, [batches[i % 4]], rm.batch_loss_sum, rm.n_prompts, tcfg, rt,
                                           i), steps)
    return {"stage": "rm", "seconds_per_step": sec, "rate": BATCH / sec, "cpu_seconds_per_step": CPU_SECONDS["last"],
            "tokens_per_batch": int(batches[0]["ids"].size(1))}


def bench_dpo(rt: distributed.Runtime, steps: int, rng: np.random.Generator) -> dict:
    torch.manual_seed(0)
    model = GPT(model_config())
    ref = GPT(model_config()).requires_grad_(False).eval()
    ref.load_state_dict(model.state_dict())
    tcfg = train.TrainConfig(batch_size=BATCH, lr=1e-4, warmup_steps=0, max_steps=10**6, weight_decay=0.0)
    opt = train.make_optimizer(model, tcfg, rt)
    batches = []
    for _ in range(4):
        rows = []
        for _ in range(2 * BATCH):  # chosen rows, then rejected rows
            p, c = tokens(rng, PROMPT_LEN), tokens(rng, COMPLETION_LEN) + [2]
            ids = p + c
            rows.append((ids[:-1], [IGNORE] * (len(p) - 1) + c))
        batches.append(pad_labelled(rows, PAD))

    def loss_sum(m, b):
        lp = losses.sequence_logprobs(m, b)
        loss, _, _ = losses.dpo_loss(lp[:BATCH], lp[BATCH:], b["ref"][:BATCH], b["ref"][BATCH:], 0.1)
        return loss.sum()

    def step(i: int) -> None:
        b = dict(batches[i % 4])
        with torch.no_grad():
            b["ref"] = losses.sequence_logprobs(ref, b)
        train.train_step(model, opt, [b], loss_sum, lambda _: BATCH, tcfg, rt, i)

    model.train()
    sec = timed(step, steps)
    return {"stage": "dpo", "seconds_per_step": sec, "rate": BATCH / sec, "cpu_seconds_per_step": CPU_SECONDS["last"],
            "tokens_per_batch": int(batches[0]["ids"].size(1))}


# ----------------------------------------------------------------------------------------------------
# PPO


def bench_ppo(rt: distributed.Runtime, steps: int, rng: np.random.Generator, minibatches: int) -> dict:
    torch.manual_seed(0)
    policy = GPT(model_config())
    ref = GPT(model_config()).requires_grad_(False).eval()
    ref.load_state_dict(policy.state_dict())
    reward_model = ScalarModel(model_config()).requires_grad_(False).eval()
    value = ScalarModel(model_config())
    value.load_state_dict(reward_model.state_dict())
    cfg = PPOConfig(ppo_epochs=4, minibatches=minibatches)
    tcfg = train.TrainConfig(lr=1e-5, weight_decay=0.0)
    opt_p = train.make_optimizer(policy, tcfg, rt)
    opt_v = train.make_optimizer(value, tcfg, rt)
    order_rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
    prompt_sets = [[tokens(rng, PROMPT_LEN) for _ in range(BATCH)] for _ in range(4)]
    never = -1  # the end-token id: no sampled token equals it, so every row generates exactly NEW_TOKENS
    split = {"generate": 0.0, "score": 0.0, "update": 0.0}
    lengths = []

    def step(i: int) -> None:
        t0 = time.perf_counter()
        ro = rollout(policy, prompt_sets[i % 4], params, never, PAD, generator)
        t1 = time.perf_counter()
        scored = score_rollout(ro, policy, ref, value, reward_model, rt)
        exp = make_experience(ro, scored, cfg, cfg.beta)
        t2 = time.perf_counter()
        ppo_update(policy, value, opt_p, opt_v, ro, exp, cfg, rt, order_rng, lr=1e-5)
        t3 = time.perf_counter()
        if i >= 2:
            split["generate"] += t1 - t0
            split["score"] += t2 - t1
            split["update"] += t3 - t2
            lengths.append(int(ro.response_mask.sum(1).min()))
        assert ro.response_mask.size(1) == NEW_TOKENS

    sec = timed(step, steps)
    return {"stage": "ppo", "seconds_per_step": sec, "rate": BATCH / sec, "cpu_seconds_per_step": CPU_SECONDS["last"],
            "minibatches": minibatches,
            "ppo_epochs": cfg.ppo_epochs, "new_tokens": min(lengths),
            "tokens_per_batch": max(len(p) for p in prompt_sets[0]) + NEW_TOKENS,
            **{f"seconds_{k}": v / steps for k, v in split.items()}}


# ----------------------------------------------------------------------------------------------------
# Group RL: GRPO and RLOO


def bench_group(rt: distributed.Runtime, steps: int, rng: np.random.Generator, estimator: str) -> dict:
    """TRL's GRPO / RLOO workload: 4 prompts x G = 4 samples of exactly 32 tokens at temperature 1, a Python
    reward function of each response, a frozen reference (beta 0.05: the k3 term in the loss for GRPO, the
    penalty in the rewards for RLOO, as each trainer does), one optimizer step per rollout batch."""
    torch.manual_seed(0)
    policy = GPT(model_config())
    ref = GPT(model_config()).requires_grad_(False).eval()
    ref.load_state_dict(policy.state_dict())
    cfg = PPOConfig(estimator=estimator, group_size=GROUP, beta=0.05, ppo_epochs=1, minibatches=1)
    tcfg = train.TrainConfig(lr=1e-4, weight_decay=0.0)
    opt = train.make_optimizer(policy, tcfg, rt)
    order_rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0)
    prompt_sets = [[p for p in (tokens(rng, PROMPT_LEN) for _ in range(BATCH // GROUP)) for _ in range(GROUP)]
                   for _ in range(4)]
    never = -1  # no sampled token is the end token: every row generates exactly NEW_TOKENS
    split = {"generate": 0.0, "score": 0.0, "update": 0.0}

    def reward(response: list[int]) -> float:  # TRL's workload scores the decoded text in Python; so do we
        return sum(t % 5 == 0 for t in response) / len(response) - 0.001 * len(response)

    def step(i: int) -> None:
        t0 = time.perf_counter()
        ro = rollout(policy, prompt_sets[i % 4], params, never, PAD, generator, rt, group_size=GROUP)
        t1 = time.perf_counter()
        scored = score_rollout(ro, policy, ref, None, None, rt)
        scored["scores"] = torch.tensor([reward(r) for r in ro.response_lists()])
        exp = make_experience(ro, scored, cfg, cfg.beta)
        t2 = time.perf_counter()
        ppo_update(policy, None, opt, None, ro, exp, cfg, rt, order_rng, lr=1e-4, beta=cfg.beta,
                   max_len=NEW_TOKENS)
        t3 = time.perf_counter()
        if i >= 2:
            for k, v in zip(split, (t1 - t0, t2 - t1, t3 - t2)):
                split[k] += v
        assert ro.response_mask.size(1) == NEW_TOKENS and bool(ro.response_mask.all())

    sec = timed(step, steps)
    return {"stage": estimator, "seconds_per_step": sec, "rate": BATCH / sec,
            "cpu_seconds_per_step": CPU_SECONDS["last"], "group_size": GROUP, "new_tokens": NEW_TOKENS,
            **{f"seconds_{k}": v / steps for k, v in split.items()}}


# ----------------------------------------------------------------------------------------------------
# TRL in the same run


def run_trl(python: Path, stage: str, steps: int | None, threads: int) -> dict:
    """TRL's rate for a stage, from ../shared/peers/trl/bench_trl.py run by `python` (a virtual environment
    with TRL; that folder's setup.sh makes them) in a process of its own with the same thread count."""
    cmd = [str(python), str(TRL_SCRIPT), "--only", TRL_WORKLOAD[stage]]
    if steps is not None:
        cmd += ["--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines or lines[-1].get("per_second") is None:
        tail = (lines[-1].get("error") if lines else None) or proc.stderr[-2000:]
        raise SystemExit(f"TRL's {stage} workload failed ({' '.join(cmd)}): {tail}")
    rec = lines[-1]
    return {"trl_rate": rec["per_second"], "trl_version": rec["trl_version"], "trl_steps": rec["steps"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    ap.add_argument("--steps", type=int, default=20, help="timed steps of sft, rm, dpo, grpo and rloo")
    ap.add_argument("--ppo-steps", type=int, default=8, help="timed PPO steps (rollout batch + 4 epochs each)")
    ap.add_argument("--ppo-minibatches", type=int, nargs="+", default=[1],
                    help="PPO minibatches per epoch (1: one update of all 16 rollouts per epoch, TRL's default "
                         "num_mini_batches; several values give one line each)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trl", type=Path, help="python of a virtual environment with TRL 1.16 (sft, rm, dpo, grpo, "
                    "rloo): its bench_trl.py runs each stage right after ours, for the ratio")
    ap.add_argument("--trl-ppo", type=Path, help="python of a virtual environment with TRL 1.12, for ppo")
    ap.add_argument("--trl-steps", type=int, help="TRL's timed steps (default: its own per workload)")
    args = ap.parse_args()
    rt = runtime(args.threads)
    for stage in args.stages:
        context = {"threads": args.threads, "load_avg_1min": round(os.getloadavg()[0], 2),
                   "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "torch": torch.__version__}
        rng = np.random.default_rng(0)
        if stage == "ppo":
            runs = [bench_ppo(rt, args.ppo_steps, rng, m) for m in args.ppo_minibatches]
        elif stage in ("grpo", "rloo"):
            runs = [bench_group(rt, args.steps, rng, stage)]
        else:
            runs = [{"sft": bench_sft, "rm": bench_rm, "dpo": bench_dpo}[stage](rt, args.steps, rng)]
        python = args.trl_ppo if stage == "ppo" else args.trl
        peer = run_trl(python, stage, args.trl_steps, args.threads) if python is not None else {}
        for r in runs:
            r = {**r, "unit": UNIT[stage], **peer, "cpu_seconds_per_step": r.pop("cpu_seconds_per_step"), **context}
            if peer:
                r["ratio"] = r["rate"] / peer["trl_rate"]
            else:
                r["trl"] = "not run (no --trl / --trl-ppo): our rate alone, no ratio"
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
