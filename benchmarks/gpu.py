"""GPU benchmarks on one H200 (see ../shared/BENCHMARKS.md): first correctness, then speed.

    python benchmarks/gpu.py               # every section on cuda, about 5-6 minutes on an H200
    python benchmarks/gpu.py --dry-run     # every section on the CPU at toy sizes (a few minutes)
    python benchmarks/gpu.py --sections generation ppo

Sections, in the order they run (each prints JSON lines; a failing section prints an "error" line and
the others still run; a final table sums up):

1. numerics   - the same 124M model and batches trained a few steps in fp32 (TF32 off) and under bf16
                autocast: the losses must agree within --loss-tol. Checked before anything is timed.
2. pretrain   - GPT-2 124M (preset gpt2-124m), bf16 autocast, batch 32 x 1024 tokens, 4 micro-steps per
                optimizer step (131,072 tokens), random tokens, through instructgpt.train (setup,
                make_optimizer, prepare_model, train_step) without and with torch.compile. Tokens/s over
                the timed steps and MFU against 989 TFLOP/s dense bf16, with
                train.training_flops_per_token = 6 N + 6 L C (T + 1) (N: every Linear weight, the
                unembedding once; the second term is causal attention, masked half skipped). The compiled
                run also counts dynamo's graphs before and after the timed steps: a recompilation during
                them is an error. nanoGPT: 506k tokens/s compiled, 410k eager; target 650k.
3. generation - our engine and Hugging Face generate() on the same weights (exported with
                instructgpt.hf): first the greedy tokens in fp32 (TF32 off) must agree, then both are
                timed in bf16 at batch 64, 128-token prompts, 128 new tokens, greedy, no early stop.
                Target: 3x HF's new tokens/s.
4. ppo        - one PPO iteration (instructgpt.ppo: rollout, score_rollout, make_experience,
                ppo_update) with a 124M policy, reference, value and reward model, 64 prompts of 128
                tokens, 128 sampled tokens, bf16 autocast; seconds split into generation, scoring and
                update (one warm-up iteration first).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from instructgpt import distributed, ppo, train
from instructgpt.batching import pad
from instructgpt.checkpoint import save_model
from instructgpt.generate import SamplingParams, generate
from instructgpt.model import GPT, PRESETS, ModelConfig, ScalarModel
from instructgpt.pretrain import lm_loss_sum, n_targets


@dataclass
class Sizes:
    model: dict  # ModelConfig fields
    batch: int  # pretraining sequences per micro-step
    seq: int  # pretraining tokens per sequence
    accum: int  # micro-steps per optimizer step
    warmup_steps: int  # untimed optimizer steps (compilation, allocator)
    timed_steps: int
    numerics_batch: int
    numerics_steps: int
    gen_batch: int
    gen_prompt: int
    gen_new: int
    gen_repeats: int
    check_batch: int  # the fp32 agreement check of generation
    check_new: int
    ppo_batch: int
    ppo_epochs: int
    ppo_minibatches: int


H200 = Sizes(model=PRESETS["gpt2-124m"], batch=32, seq=1024, accum=4, warmup_steps=3, timed_steps=10,
             numerics_batch=8, numerics_steps=5, gen_batch=64, gen_prompt=128, gen_new=128, gen_repeats=2,
             check_batch=8, check_new=32, ppo_batch=64, ppo_epochs=4, ppo_minibatches=4)
TOY = Sizes(model=dict(n_layer=2, n_head=2, n_embd=64, block_size=128, vocab_size=512), batch=4, seq=64,
            accum=2, warmup_steps=2, timed_steps=2, numerics_batch=4, numerics_steps=3, gen_batch=4,
            gen_prompt=16, gen_new=16, gen_repeats=1, check_batch=4, check_new=8, ppo_batch=4, ppo_epochs=1,
            ppo_minibatches=2)
PAD = 0


def emit(**row) -> dict:
    print(json.dumps(row), flush=True)
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def no_tf32():
    """Plain fp32 matmuls for the reference side of a check (setup() turns TF32 on)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def train_config(args, sz: Sizes, dtype: str, compile_: bool, batch: int) -> train.TrainConfig:
    return train.TrainConfig(batch_size=batch, grad_accum=sz.accum, lr=6e-4, warmup_steps=10, max_steps=1000,
                             device=args.device, dtype=dtype, compile=compile_, seed=1337)


def random_micro_batches(sz: Sizes, batch: int, V: int, device, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, V, (sz.accum, batch, sz.seq + 1), generator=g).to(device)
    return [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]


def model_config(sz: Sizes) -> ModelConfig:
    return ModelConfig.gpt2(**sz.model)


# ----------------------------------------------------------------------------------------------------
# 1. Numerics: bf16 autocast against fp32


def section_numerics(args, sz: Sizes) -> list[dict]:
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = train_config(args, sz, dtype, False, sz.numerics_batch)
        runtime = train.setup(cfg)  # seeds: both runs start from the same weights
        model = GPT(model_config(sz)).to(runtime.device)
        opt = train.make_optimizer(model, cfg, runtime)
        batches = random_micro_batches(sz, sz.numerics_batch, model.config.vocab_size, runtime.device, 0)
        ctx = no_tf32() if dtype == "float32" else contextlib.nullcontext()
        with ctx:
            losses[dtype] = [train.train_step(model, opt, batches, lm_loss_sum, n_targets, cfg, runtime, s)["loss"]
                             for s in range(sz.numerics_steps)]
    diff = max(abs(a - b) for a, b in zip(losses["float32"], losses["bfloat16"]))
    row = emit(section="numerics", fp32_losses=[round(x, 4) for x in losses["float32"]],
               bf16_losses=[round(x, 4) for x in losses["bfloat16"]], max_abs_diff=round(diff, 5),
               tolerance=args.loss_tol, ok=diff <= args.loss_tol)
    if not row["ok"]:
        raise AssertionError(f"bf16 and fp32 losses differ by {diff:.4f} > {args.loss_tol}")
    return [row]


# ----------------------------------------------------------------------------------------------------
# 2. Pretraining throughput


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def pretrain_run(args, sz: Sizes, compile_: bool) -> dict:
    cfg = train_config(args, sz, "bfloat16", compile_, sz.batch)
    runtime = train.setup(cfg)
    model = GPT(model_config(sz)).to(runtime.device)
    opt = train.make_optimizer(model, cfg, runtime)
    fwd = distributed.prepare_model(model, runtime)
    batches = random_micro_batches(sz, sz.batch, model.config.vocab_size, runtime.device, 1)
    t0 = time.perf_counter()
    for step in range(sz.warmup_steps):
        train.train_step(fwd, opt, batches, lm_loss_sum, n_targets, cfg, runtime, step, sync=False)
    sync(runtime.device)
    warmup_s = time.perf_counter() - t0
    graphs_before = dynamo_graphs()
    t0 = time.perf_counter()
    for step in range(sz.warmup_steps, sz.warmup_steps + sz.timed_steps):
        stats = train.train_step(fwd, opt, batches, lm_loss_sum, n_targets, cfg, runtime, step, sync=False)
    sync(runtime.device)
    seconds = time.perf_counter() - t0
    recompiles = dynamo_graphs() - graphs_before
    tokens = sz.batch * sz.seq * sz.accum * sz.timed_steps
    tps = tokens / seconds
    fpt = train.training_flops_per_token(model, sz.seq)
    mfu = train.mfu(fpt, tps, runtime.device)
    row = emit(section="pretrain", variant="compile" if compile_ else "eager", device=str(runtime.device),
               tokens_per_step=sz.batch * sz.seq * sz.accum, ms_per_step=round(1000 * seconds / sz.timed_steps, 1),
               tokens_per_s=round(tps), mfu=None if mfu is None else round(mfu, 4),
               flops_per_token=fpt, warmup_s=round(warmup_s, 1), loss=round(float(stats["loss"]), 4),
               graphs_during_timed_steps=recompiles, peak_mem_gb=peak_memory_gb(runtime.device))
    if compile_ and recompiles:
        raise AssertionError(f"torch.compile made {recompiles} new graph(s) during the timed steps")
    return row


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    gb = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return round(gb, 1)


def section_pretrain(args, sz: Sizes) -> list[dict]:
    rows = []
    for compile_ in (False, True):
        rows.append(pretrain_run(args, sz, compile_))
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------------
# 3. Generation: our engine against Hugging Face generate()


def hf_twin(model: GPT, tmp: Path):
    """The same weights as a transformers model, through our exporter."""
    import transformers

    from instructgpt.hf_export import export_hf

    transformers.logging.set_verbosity_error()
    save_model(model, tmp / "ours")
    export_hf(tmp / "ours", tmp / "hf", log=lambda _: None)
    return transformers.AutoModelForCausalLM.from_pretrained(tmp / "hf").float().eval()


def run_ours(model, prompts, new: int) -> torch.Tensor:
    params = SamplingParams(max_new_tokens=new, temperature=0)
    return generate(model, prompts, params, eos_id=-1, pad_id=PAD).tokens  # -1: never stops early


def run_hf(model, prompts, new: int) -> torch.Tensor:
    device = next(model.parameters()).device
    idx, mask = (t.to(device) for t in pad(prompts, PAD, "left"))
    with torch.no_grad():
        out = model.generate(input_ids=idx, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, use_cache=True, pad_token_id=PAD, eos_token_id=None)
    return out[:, idx.size(1):]


def timed(fn, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def section_generation(args, sz: Sizes) -> list[dict]:
    device = distributed.resolve_device(args.device)
    torch.manual_seed(0)
    ours = GPT(model_config(sz)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_twin(ours, Path(tmp))
    ours, hf = ours.to(device), hf.to(device)
    V = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)

    # Correctness first, in fp32 without TF32: the same greedy tokens.
    check = torch.randint(1, V, (sz.check_batch, sz.gen_prompt), generator=g).tolist()
    with no_tf32():
        a, b = run_ours(ours, check, sz.check_new).cpu(), run_hf(hf, check, sz.check_new).cpu()
    same_rows = int((a == b).all(1).sum())
    # A random-init model has near-tied logits; allow a row in eight to split late on a near-tie.
    ok = same_rows >= sz.check_batch - sz.check_batch // 8 and torch.equal(a[:, 0], b[:, 0])
    rows = [emit(section="generation", check="greedy tokens, fp32", rows_identical=same_rows,
                 rows=sz.check_batch, new_tokens=sz.check_new, ok=ok)]
    if not ok:
        raise AssertionError(f"our engine and HF disagree on {sz.check_batch - same_rows} of {sz.check_batch} rows")

    # Then speed, in bf16 where the device has it.
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ours, hf = ours.to(dtype), hf.to(dtype)
    prompts = torch.randint(1, V, (sz.gen_batch, sz.gen_prompt), generator=g).tolist()
    engines = {"instructgpt": lambda: run_ours(ours, prompts, sz.gen_new),
               "hf": lambda: run_hf(hf, prompts, sz.gen_new)}
    for fn in engines.values():
        fn()  # warm-up
    best = {name: min(timed(fn, device) for _ in range(sz.gen_repeats)) for name, fn in engines.items()}
    for name, s in best.items():
        rows.append(emit(section="generation", engine=name, dtype=str(dtype).removeprefix("torch."),
                         batch=sz.gen_batch, prompt_tokens=sz.gen_prompt, new_tokens=sz.gen_new,
                         seconds=round(s, 3), new_tokens_per_s=round(sz.gen_batch * sz.gen_new / s)))
    rows.append(emit(section="generation", ratio_vs_hf=round(best["hf"] / best["instructgpt"], 2), target=3.0))
    return rows


# ----------------------------------------------------------------------------------------------------
# 4. One PPO iteration, split into its phases


def section_ppo(args, sz: Sizes) -> list[dict]:
    cfg = train_config(args, sz, "bfloat16", False, sz.ppo_batch)
    runtime = train.setup(cfg)
    device = runtime.device
    mcfg = model_config(sz)
    policy = GPT(mcfg).to(device)
    ref = copy.deepcopy(policy).eval()
    value_model = ScalarModel(mcfg).to(device)
    reward_model = ScalarModel(mcfg).to(device).eval()
    opt_p = train.make_optimizer(policy, cfg, runtime)
    opt_v = train.make_optimizer(value_model, cfg, runtime)
    pcfg = ppo.PPOConfig(ppo_epochs=sz.ppo_epochs, minibatches=sz.ppo_minibatches)
    params = SamplingParams(max_new_tokens=sz.gen_new, temperature=pcfg.temperature)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, mcfg.vocab_size, (sz.ppo_batch, sz.gen_prompt), generator=g).tolist()
    gen = torch.Generator(device=device).manual_seed(0)
    rng = np.random.default_rng(0)
    eos = -1  # every response runs to max_new_tokens: the same work every iteration

    def iteration() -> dict[str, float]:
        times = {}
        sync(device)
        t0 = time.perf_counter()
        ro = ppo.rollout(policy, prompts, params, eos, PAD, gen)
        sync(device)
        times["generation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scored = ppo.score_rollout(ro, policy, ref, value_model, reward_model, runtime, pcfg.temperature)
        exp = ppo.make_experience(ro, scored, pcfg, pcfg.beta)
        sync(device)
        times["scoring"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppo.ppo_update(policy, value_model, opt_p, opt_v, ro, exp, pcfg, runtime, rng, lr=1e-5)
        sync(device)
        times["update"] = time.perf_counter() - t0
        return times

    iteration()  # warm-up
    times = iteration()
    total = sum(times.values())
    rows = [emit(section="ppo", phase=k, seconds=round(v, 3), share=round(v / total, 3)) for k, v in times.items()]
    rows.append(emit(section="ppo", phase="total", seconds=round(total, 3), rollouts=sz.ppo_batch,
                     new_tokens=sz.gen_new, ppo_epochs=sz.ppo_epochs, minibatches=sz.ppo_minibatches,
                     completions_per_s=round(sz.ppo_batch / total, 2)))
    return rows


# ----------------------------------------------------------------------------------------------------

SECTIONS = {"numerics": section_numerics, "pretrain": section_pretrain, "generation": section_generation,
            "ppo": section_ppo}


def table(results: dict[str, list[dict] | str]) -> str:
    lines = ["| section | what | figure |", "| --- | --- | --- |"]
    for name, rows in results.items():
        if isinstance(rows, str):
            lines.append(f"| {name} | FAILED | {rows} |")
            continue
        for r in rows:
            if name == "numerics":
                lines.append(f"| numerics | bf16 vs fp32 loss, max abs diff | {r['max_abs_diff']} "
                             f"(tol {r['tolerance']}) |")
            elif name == "pretrain":
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                lines.append(f"| pretrain | {r['variant']} | {r['tokens_per_s']:,} tokens/s, "
                             f"{r['ms_per_step']} ms/step, MFU {mfu} |")
            elif name == "generation" and "engine" in r:
                lines.append(f"| generation | {r['engine']} ({r['dtype']}) | {r['new_tokens_per_s']:,} new tokens/s |")
            elif name == "generation" and "ratio_vs_hf" in r:
                lines.append(f"| generation | ours / HF | {r['ratio_vs_hf']}x (target {r['target']}x) |")
            elif name == "generation":
                lines.append(f"| generation | greedy agreement (fp32) | {r['rows_identical']}/{r['rows']} rows |")
            elif name == "ppo":
                share = f" ({100 * r['share']:.0f}%)" if "share" in r else f", {r['completions_per_s']} completions/s"
                lines.append(f"| ppo | {r['phase']} | {r['seconds']} s{share} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="every section on the CPU at toy sizes")
    ap.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    ap.add_argument("--device", default=None, help="default: cuda, or cpu with --dry-run")
    ap.add_argument("--loss-tol", type=float, default=0.05, help="largest |bf16 - fp32| loss per step")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.dry_run else "cuda")
    sz = TOY if args.dry_run else H200
    emit(section="setup", device=args.device, dry_run=args.dry_run, torch=torch.__version__,
         gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None)
    results: dict[str, list[dict] | str] = {}
    start = time.perf_counter()
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            results[name] = SECTIONS[name](args, sz)
        except Exception as e:  # noqa: BLE001 - report and go on: GPU time is too scarce to rerun everything
            traceback.print_exc()
            results[name] = f"{type(e).__name__}: {e}"
            emit(section=name, error=results[name])
        emit(section=name, wall_s=round(time.perf_counter() - t0, 1))
    print(table(results))
    emit(section="all", wall_s=round(time.perf_counter() - start, 1),
         failed=[n for n, r in results.items() if isinstance(r, str)])
    if any(isinstance(r, str) for r in results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
