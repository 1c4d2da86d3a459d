"""CPU pretraining against nanoGPT's "baby Shakespeare", both run here, one after the other, on the same workload.

nanoGPT's side is its own `train.py` (a checkout given with --nanogpt DIR; nothing of it is copied here) run as
`config/train_shakespeare_char.py --device=cpu --compile=False --dtype=float32 --eval_iters=20 --block_size=64
--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=N --lr_decay_iters=N --dropout=0.0`, evaluating
every 250 steps. Ours is `pretrain_command` with the same recipe: character-level tinyshakespeare, first 90% train /
last 10% val (both built here with numpy as nanoGPT's `data/shakespeare_char/prepare.py` does, from the same text
file, rather than `instructgpt prepare`, whose hash split by paragraph would make a different validation set),
4 layers x 4 heads x 128, block 64, batch 12, lr 1e-3 -> 1e-4 (cosine), warm-up 100, beta2 0.99, weight decay 0.1,
clip 1.0, N steps, val loss every 250 steps over 20 batches.

Differences left: our vocabulary has our 6 special tokens too (71 symbols, not 65; the embedding padded to 128
rows), our model has biases (GPT-2's; nanoGPT's default is none), embeddings are not weight-decayed, our val loss
is over the same 20 batches at every evaluation (nanoGPT draws 20 new ones, and 20 train batches too), and
nanoGPT trains one step more (its loop runs steps 0..N).

Each side runs in a fresh process (spawned for ours, `subprocess` for nanoGPT) with the same OpenMP thread count
(OMP_NUM_THREADS, and CPU affinity with --threads), so interpreter start-up and imports count on both sides.
Prints one JSON line per side and run: tokens/s and ms/step over the training steps (the first 50 steps, the
evaluations and checkpoints excluded: ours from its metrics.jsonl, nanoGPT's from its per-step "iter N: ... time
X ms" lines), val loss at each evaluation, the val loss of the last model over the whole val split (the same
characters for both: `full_val_loss`), wall and CPU seconds of the whole process, and the load average (the CPUs
are shared); then one summary line per run and variant: ours / nanoGPT tokens/s, wall and CPU time, and the val
losses side by side; with --repeats, one more line per variant over the repeats. Without --nanogpt only our side
runs, and the summary says so.

    python benchmarks/pretrain_cpu.py --nanogpt /path/to/nanoGPT                   # 2000 steps, eager
    python benchmarks/pretrain_cpu.py --nanogpt DIR --max-steps 500 --repeats 2 --variants eager,eager-bf16
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib.util
import json
import multiprocessing
import os
import pickle
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from instructgpt.checkpoint import load_model
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import call
from instructgpt.tokenizer import Tokenizer

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
VARIANTS = {
    "eager": dict(compile=False, dtype="float32"),
    "compile": dict(compile=True, dtype="float32"),
    "eager-bf16": dict(compile=False, dtype="bfloat16"),
    "compile-bf16": dict(compile=True, dtype="bfloat16"),
}
B, T, EVAL_INTERVAL, EVAL_ITERS, WARMUP = 12, 64, 250, 20, 100
SKIP = 50  # first steps left out of the rate on both sides (warm-up; compilation for ours)
NANOGPT_FILES = ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py")


# ----------------------------------------------------------------------------------------------------
# Data: the same split for both, each in its own format


def char_shards(text_file: Path, folder: Path) -> Path:
    """Our prepared folder: meta.json, train_000.bin, val_000.bin, tokenizer.json (character tokenizer)."""
    text = text_file.read_text(encoding="utf-8")
    tok = Tokenizer.train_char([text])
    ids = np.array(tok.encode(text), dtype=np.uint16)
    n = int(0.9 * len(ids))
    folder.mkdir(parents=True)
    ids[:n].tofile(folder / "train_000.bin")
    ids[n:].tofile(folder / "val_000.bin")
    tok.save(folder / "tokenizer.json")
    meta = {"dtype": "uint16", "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "tokenizer": "tokenizer.json",
            "tokens": {"train": n, "val": len(ids) - n},
            "shards": {"train": ["train_000.bin"], "val": ["val_000.bin"]}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def nanogpt_shards(text_file: Path, folder: Path) -> Path:
    """nanoGPT's data/shakespeare_char: train.bin, val.bin (uint16 ids of the sorted characters) and meta.pkl,
    written as its prepare.py writes them (which would download the text; this reads ours)."""
    text = text_file.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = int(0.9 * len(text))  # nanoGPT splits the characters; one id per character, so the same cut as ours
    folder.mkdir(parents=True)
    np.array([stoi[c] for c in text[:n]], dtype=np.uint16).tofile(folder / "train.bin")
    np.array([stoi[c] for c in text[n:]], dtype=np.uint16).tofile(folder / "val.bin")
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return folder


@torch.no_grad()
def full_val_loss(loss_sum, ids: np.ndarray, rows: int = 64) -> float:
    """Mean next-token loss over the whole val split cut into consecutive windows of T tokens (and their next
    tokens): the same characters for both sides, where each side's own figure is 20 sampled batches (about 15k of
    the 111k val tokens: a few hundredths of a nat either way). loss_sum(x, y) sums the loss of (b, T) windows."""
    n = (len(ids) - 1) // T
    x = torch.from_numpy(ids[: n * T].astype(np.int64)).view(n, T)
    y = torch.from_numpy(ids[1 : n * T + 1].astype(np.int64)).view(n, T)
    return sum(float(loss_sum(x[i : i + rows], y[i : i + rows])) for i in range(0, n, rows)) / (n * T)


def children_cpu_s() -> float:
    """User + system CPU seconds of the finished children: steadier than wall time on a shared machine (a side that
    waits for the CPU is not charged), though OpenMP threads spinning at barriers count as busy."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------------------------------
# Our side (in a spawned process)


def train_ours(data: Path, out: Path, variant: str, max_steps: int, log_interval: int, seed: int) -> dict:
    """Runs in the child: the stage, its printing sent to OUT/log.txt; rates and val losses from metrics.jsonl."""
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    with open(out / "log.txt", "w") as log, contextlib.redirect_stdout(log):
        call(
            pretrain_command, data=data, out=out / "run", n_layer=4, n_head=4, n_embd=128, block_size=T,
            dropout=0.0, batch_size=B, lr=1e-3, min_lr=1e-4, warmup_steps=WARMUP, max_steps=max_steps,
            weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=EVAL_INTERVAL, eval_iters=EVAL_ITERS,
            log_interval=log_interval, checkpoint_interval=max_steps, samples=0, seed=seed, device="cpu",
            **VARIANTS[variant],
        )
    stage_s = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > SKIP]
    steps = [r["step"] - prev["step"] for prev, r in zip([{"step": SKIP}, *timed], timed)]
    seconds = sum(n * B * T / r["tokens_per_s"] for n, r in zip(steps, timed))
    return {"ms_per_step": 1000 * seconds / sum(steps), "stage_s": stage_s, "threads": torch.get_num_threads(),
            "val_loss": {r["step"]: r["val_loss"] for r in records if "val_loss" in r}}


def run_ours(data: Path, out: Path, variant: str, max_steps: int, log_interval: int, seed: int) -> dict:
    load, cpu, t0 = os.getloadavg()[0], children_cpu_s(), time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        r = pool.submit(train_ours, data, out, variant, max_steps, log_interval, seed).result()
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu
    model = load_model(out / "run").eval()  # here, as nanoGPT's: outside both sides' time
    full = full_val_loss(lambda x, y: F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum"),
                         np.fromfile(data / "val_000.bin", dtype=np.uint16))
    return side_record("ours", variant, max_steps, r["ms_per_step"], r["val_loss"], wall, cpu, load,
                       val_loss_full=round(full, 4), threads=r["threads"], stage_s=round(r["stage_s"], 1), seed=seed)


# ----------------------------------------------------------------------------------------------------
# nanoGPT's side (its train.py in a subprocess)


def check_nanogpt(folder: Path) -> None:
    missing = [name for name in NANOGPT_FILES if not (folder / name).is_file()]
    if missing:
        raise SystemExit(f"--nanogpt {folder}: not a nanoGPT checkout (no {', '.join(missing)})")


def nanogpt_command(data: Path, out: Path, max_steps: int) -> list[str]:
    """nanoGPT's train.py with our recipe. It reads data/<dataset>/ under its working directory: an absolute
    dataset path makes that our folder (os.path.join drops 'data'). Per-step log lines give every step's time.
    Its config saves OUT/ckpt.pt at each evaluation that improves the val loss; saving at every one instead makes
    sure the last step's model is there for `full_val_loss` (the evaluations are left out of ms/step anyway)."""
    flags = dict(device="cpu", compile=False, dtype="float32", eval_iters=EVAL_ITERS, eval_interval=EVAL_INTERVAL,
                 log_interval=1, block_size=T, batch_size=B, n_layer=4, n_head=4, n_embd=128, max_iters=max_steps,
                 lr_decay_iters=max_steps, dropout=0.0, always_save_checkpoint=True, dataset=data, out_dir=out)
    return [sys.executable, "train.py", "config/train_shakespeare_char.py", *(f"--{k}={v}" for k, v in flags.items())]


ITER = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.M)
EVAL = re.compile(r"^step (\d+): train loss [-\d.naif]+, val loss ([-\d.naif]+)", re.M)


def parse_nanogpt_log(log: str) -> tuple[float, dict[int, float]]:
    """(ms per training step, {step: val loss}) from train.py's output. A step's time in nanoGPT runs from the end
    of the previous step, so an evaluation step's time holds the evaluation (and the checkpoint): those are left
    out, as are the first SKIP steps."""
    times = [float(ms) for it, ms in ITER.findall(log) if int(it) >= SKIP and int(it) % EVAL_INTERVAL != 0]
    if not times:
        raise RuntimeError(f"nanoGPT printed no timed step:\n{log[-2000:]}")
    return sum(times) / len(times), {int(step): float(loss) for step, loss in EVAL.findall(log)}


def run_nanogpt(nanogpt: Path, data: Path, out: Path, max_steps: int, threads: int) -> dict:
    load, cpu, t0 = os.getloadavg()[0], children_cpu_s(), time.perf_counter()
    proc = subprocess.run(nanogpt_command(data, out, max_steps), cwd=nanogpt, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    ms, val = parse_nanogpt_log(proc.stdout)
    full, step = nanogpt_full_val_loss(nanogpt, out / "ckpt.pt", data / "val.bin")
    return side_record("nanogpt", "eager", max_steps, ms, val, wall, cpu, load, val_loss_full=round(full, 4),
                       val_loss_full_step=step, threads=threads)


def nanogpt_full_val_loss(nanogpt: Path, ckpt_file: Path, val_file: Path) -> tuple[float, int]:
    """`full_val_loss` of the model in nanoGPT's last checkpoint, built with the checkout's model.py; and its step."""
    spec = importlib.util.spec_from_file_location("nanogpt_model", nanogpt / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ckpt = torch.load(ckpt_file, map_location="cpu", weights_only=True)  # tensors and plain values only
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # it prints its parameter count
        model = module.GPT(module.GPTConfig(**ckpt["model_args"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    loss = full_val_loss(lambda x, y: model(x, y)[1] * y.numel(), np.fromfile(val_file, dtype=np.uint16))
    return loss, int(ckpt["iter_num"])


# ----------------------------------------------------------------------------------------------------
# Records


def side_record(side: str, variant: str, steps: int, ms_per_step: float, val: dict[int, float], wall: float,
                cpu: float, load: float, **extra) -> dict:
    last = max(val)
    return {"benchmark": "pretrain_cpu", "side": side, "variant": variant, "steps": steps,
            "tokens_per_s": round(B * T / ms_per_step * 1000), "ms_per_step": round(ms_per_step, 2),
            "val_loss": round(val[last], 4), "val_step": last, "val_losses": {k: round(v, 4) for k, v in val.items()},
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "load_at_start": round(load, 2), "load_at_end": round(os.getloadavg()[0], 2), **extra}


def summary(ours: dict, theirs: dict | None, repeat: int) -> dict:
    row = {"benchmark": "pretrain_cpu", "summary": True, "repeat": repeat, "variant": ours["variant"],
           "threads": ours["threads"], "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}
    if theirs is None:
        return {**row, "nanogpt": "not run (no --nanogpt DIR): our figures alone, no ratio"}
    steps = sorted(set(ours["val_losses"]) & set(theirs["val_losses"]))
    return {**row, "speed_ours_over_nanogpt": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 3),
            "wall_ours_over_nanogpt": round(ours["wall_s"] / theirs["wall_s"], 3),
            "cpu_ours_over_nanogpt": round(ours["cpu_s"] / theirs["cpu_s"], 3),
            "val_loss_ours_nanogpt": {s: [ours["val_losses"][s], theirs["val_losses"][s]] for s in steps},
            "full_val_loss_ours_nanogpt": [ours["val_loss_full"], theirs["val_loss_full"]],
            "load": [ours["load_at_start"], theirs["load_at_start"]]}


def overall(runs: list[tuple[list[dict], dict]], variant: str) -> dict:
    """Over the repeats: the median and range of the per-repeat speed ratios, and best against best (the load only
    ever slows a run down, so each side's fastest repeat is its least disturbed one)."""
    ours = [next(r for r in rows if r["variant"] == variant) for rows, _ in runs]
    theirs = [t for _, t in runs]
    ratios = sorted(o["tokens_per_s"] / t["tokens_per_s"] for o, t in zip(ours, theirs))
    best = max(o["tokens_per_s"] for o in ours) / max(t["tokens_per_s"] for t in theirs)
    return {"benchmark": "pretrain_cpu", "overall": True, "variant": variant, "repeats": len(runs),
            "speed_ours_over_nanogpt_median": round(statistics.median(ratios), 3),
            "speed_ours_over_nanogpt_range": [round(ratios[0], 3), round(ratios[-1], 3)],
            "speed_best_over_best": round(best, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", type=Path, help="a nanoGPT checkout (its train.py runs beside ours); without it, "
                   "only our side runs")
    p.add_argument("--variants", default="eager", help=f"ours, comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=2000, help="steps on both sides (nanoGPT's max_iters)")
    p.add_argument("--repeats", type=int, default=1, help="runs of both sides; every other one starts with nanoGPT")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="CPU cores (affinity) and "
                   "OpenMP threads of both sides")
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--seed", type=int, default=1337, help="ours (nanoGPT's train.py always seeds 1337)")
    args = p.parse_args()
    variants = args.variants.split(",")
    if unknown := [v for v in variants if v not in VARIANTS]:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.max_steps % EVAL_INTERVAL or args.max_steps % args.log_interval:
        # both sides evaluate (and nanoGPT saves the model) at the last step; it is timed to the end
        p.error(f"--max-steps must be a multiple of {EVAL_INTERVAL} (the evaluation interval) and of --log-interval")
    if args.nanogpt is not None:
        check_nanogpt(args.nanogpt)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])  # inherited by both sides
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="pretrain_cpu_"))
    try:
        ours_data = char_shards(args.text, tmp / "data")
        their_data = nanogpt_shards(args.text, tmp / "nanogpt_data") if args.nanogpt else None
        runs = []  # (our rows, nanoGPT's row) of each repeat
        for repeat in range(args.repeats):
            theirs, rows = None, []
            sides = ["nanogpt", *variants] if repeat % 2 else [*variants, "nanogpt"]
            for side in sides:
                out = tmp / f"{side}-{repeat}"
                if side != "nanogpt":
                    rows.append(run_ours(ours_data, out, side, args.max_steps, args.log_interval, args.seed))
                    print(json.dumps(rows[-1]), flush=True)
                elif their_data is not None:
                    theirs = run_nanogpt(args.nanogpt, their_data, out, args.max_steps, args.threads)
                    print(json.dumps(theirs), flush=True)
            for ours in rows:
                print(json.dumps(summary(ours, theirs, repeat)), flush=True)
            runs.append((rows, theirs))
        if args.repeats > 1 and args.nanogpt:
            for variant in variants:
                print(json.dumps(overall(runs, variant)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
