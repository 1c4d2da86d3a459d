"""CPU pretraining against nanoGPT's "baby Shakespeare" (see ../shared/BENCHMARKS.md).

Same task as nanoGPT's `config/train_shakespeare_char.py` run with `--device=cpu --compile=False
--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
--lr_decay_iters=2000 --dropout=0.0`: character-level tinyshakespeare, first 90% train / last 10% val
(built here with numpy, as nanoGPT's prepare.py does, rather than `instructgpt prepare`, whose hash split
by paragraph would make a different validation set), 4 layers x 4 heads x 128, block 64, batch 12, lr 1e-3
-> 1e-4 (cosine), warm-up 100, beta2 0.99, weight decay 0.1, clip 1.0, 2000 steps, eval every 250 x 20.

Differences from nanoGPT, none of which favours us: the vocabulary has our 6 special tokens too (71, not 65),
and embeddings are not weight-decayed.

Prints one JSON line per variant: tokens/s and ms/step over the training steps (evaluation, checkpoints and
the first log interval, which holds compilation, excluded), val loss at the last step, wall seconds of
the whole stage (set-up, evaluation, checkpoints and export included, as nanoGPT's 97 s are).

    python benchmarks/pretrain_cpu.py                           # eager and compiled, 2000 steps
    python benchmarks/pretrain_cpu.py --variants eager --max-steps 300
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

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


def char_shards(text_file: Path, folder: Path) -> Path:
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


def run(data: Path, out: Path, variant: str, max_steps: int, log_interval: int, seed: int = 1337) -> dict:
    t0 = time.perf_counter()
    call(
        pretrain_command, data=data, out=out, n_layer=4, n_head=4, n_embd=128, block_size=64, dropout=0.0,
        batch_size=12, lr=1e-3, min_lr=1e-4, warmup_steps=100, max_steps=max_steps, weight_decay=0.1, beta2=0.99,
        grad_clip=1.0, eval_interval=250, eval_iters=20, log_interval=log_interval, checkpoint_interval=max_steps,
        samples=0, seed=seed, device="cpu", **VARIANTS[variant],
    )
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "tokens_per_s" in r][1:]  # the first interval holds warm-up / compilation
    tokens = sum(log_interval * 12 * 64 for _ in timed)
    seconds = sum(log_interval * 12 * 64 / r["tokens_per_s"] for r in timed)
    val = [r for r in records if "val_loss" in r]
    return {
        "benchmark": "pretrain_cpu", "variant": variant, "steps": max_steps, "seed": seed,
        "tokens_per_s": round(tokens / seconds), "ms_per_step": round(1000 * seconds / (len(timed) * log_interval), 2),
        "val_loss": round(val[-1]["val_loss"], 4), "val_step": val[-1]["step"], "wall_s": round(wall, 1),
        "nanogpt": {"ms_per_step": "40-45", "tokens_per_s": 18000, "val_loss_2000": 1.874, "wall_s": 97},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="eager,compile", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--max-steps", type=int, default=2000)
    p.add_argument("--log-interval", type=int, default=50)
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--seeds", default="1337", help="comma-separated: one run per seed and variant")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="pretrain_cpu_"))
    try:
        data = char_shards(args.text, tmp / "data")
        for seed in map(int, args.seeds.split(",")):
            for variant in args.variants.split(","):
                out = tmp / f"{variant}-{seed}"
                print(json.dumps(run(data, out, variant, args.max_steps, args.log_interval, seed)), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
