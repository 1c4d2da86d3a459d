"""What a resumed run must share with the run it continues: its fingerprint (the data, by digest, and every
setting that sets its course, flag by flag), stored in each checkpoint's state.json and compared on --resume.

    fingerprint = run_fingerprint(args, runtime, total_steps)      # the stage, at set-up
    check_resume(ckpt.state_of(latest), fingerprint, latest)        # before loading a checkpoint
    ckpt.save(step, ..., {"step": step, ..., "fingerprint": fingerprint})

Settings that change how a run computes but not what it learns (--device, --dtype, --compile, --fsdp,
--activation-checkpointing, --report-to) are left out: a run may resume on other hardware.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from .checkpoint import CONFIG, WEIGHTS
from .distributed import Runtime
from .errors import UserError

RUN_LENGTH = ("--max-steps", "--epochs")  # may change when the run resumed had reached its end: training further
# arguments that change where and how a run writes, not what it computes
BOOKKEEPING = ("out", "train", "samples", "eval_iters", "sample_interval")


def run_fingerprint(args: Any, runtime: Runtime, total_steps: int, per_step: int | None = None,
                    extra: dict | None = None) -> dict:
    """What sets a run's course, by flag, for each checkpoint's state.json: the examples of a step (`per_step`, by
    default --batch-size x --grad-accum x processes, however split), the schedule (`total_steps`), the optimizer,
    the seed, the LoRA settings of a LoRA run; every argument of the stage's `args` but BOOKKEEPING (files and
    folders by their `data_digest`, a nested dataclass field by field); `extra`, what the stage derives. As JSON
    stores it (compares equal)."""
    cfg = args.train
    per_step = per_step or cfg.batch_size * cfg.grad_accum * runtime.world_size  # `train.examples_per_step`
    out = {"examples per step (--batch-size x --grad-accum x processes)": per_step,
           "--max-steps": total_steps, "--lr": cfg.lr, "--min-lr": cfg.min_lr, "--warmup-steps": cfg.warmup_steps,
           "--weight-decay": cfg.weight_decay, "--beta1": cfg.beta1, "--beta2": cfg.beta2, "--grad-clip": cfg.grad_clip,
           "--seed": cfg.seed}
    lora = cfg.lora()
    if lora is not None:  # a full fine-tuning run's fingerprint has no LoRA keys: it stays what it always was
        out.update({"--lora-rank": lora.rank, "--lora-alpha": lora.alpha, "--lora-dropout": lora.dropout,
                    "--lora-targets": list(lora.targets)})
    for f in (f for f in fields(args) if f.name not in BOOKKEEPING):
        value = getattr(args, f.name)
        if is_dataclass(value):
            out.update({f"--{k.replace('_', '-')}": v for k, v in asdict(value).items()})
            continue
        if isinstance(value, Path) or (isinstance(value, list) and value and isinstance(value[0], Path)):
            value = data_digest(value) if isinstance(value, Path) else [data_digest(p) for p in value]
        out[f"--{f.name.replace('_', '-')}"] = value
    return json.loads(json.dumps({**out, **(extra or {})}, default=str))


def file_digest(path: Path) -> dict:
    """Size and SHA-256 of a file (read once, at about 1 GB/s)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return {"bytes": Path(path).stat().st_size, "sha256": h.hexdigest()}


def data_digest(path: Path | None) -> dict | None:
    """What a resumed run compares to be sure it reads what the interrupted one read: the digest of a file; of
    a folder, the digests of the files a stage reads there (a prepared folder's meta.json, shards and
    tokenizer; a model folder's weights, config and tokenizer). None for None or a path that is not there."""
    if path is None or not (path := Path(path)).exists():
        return None
    if not path.is_dir():
        return file_digest(path)
    names = [WEIGHTS, CONFIG, "tokenizer.json"]
    if (path / "meta.json").is_file():
        shards = json.loads((path / "meta.json").read_text()).get("shards", {})
        names = ["meta.json", "tokenizer.json", *(n for split in sorted(shards) for n in shards[split])]
    return {name: file_digest(path / name) for name in names if (path / name).is_file()}


def check_resume(saved: dict, fingerprint: dict, checkpoint: Path) -> None:
    """Refuse to continue the run of `checkpoint` (its state.json: `saved`) with other data or settings: a
    UserError naming each. Only the run's length may change, from the checkpoint of its last step (training
    further). A checkpoint without a fingerprint (an older version's) is taken as it is."""
    before = saved.get("fingerprint")
    if before is None:
        return
    free = RUN_LENGTH if saved.get("step", 0) >= (before.get("--max-steps") or math.inf) else ()
    keys = sorted(before.keys() | fingerprint.keys())
    differ = [k for k in keys if k not in free and before.get(k) != fingerprint.get(k)]
    if not differ:
        return

    def files(v: Any) -> bool:  # a data_digest, or a list of them
        return isinstance(v, dict) or (isinstance(v, list) and any(x is None or isinstance(x, dict) for x in v))

    def show(k: str) -> str:
        a, b = before.get(k), fingerprint.get(k)
        if files(a) or files(b):
            return f"{k} (other files, or their contents changed)"
        return f"{k} ({a} then, {b} now)"

    raise UserError(f"--resume: {checkpoint} was written with other data or settings: {'; '.join(map(show, differ))}. "
                    "Resume with the same ones, or start a new run in another --out")

