"""Everything a stage keeps on disk: weights (`model.safetensors` + `config.json`, canonical keys, strict
loading), resumable step checkpoints, the stage's exported model, and the stage folder's contract (the guard
against reusing a folder by accident and the atomic `done.json` written last).

Nothing here unpickles: weights are safetensors, configs and states JSON, and the rest (optimizer and RNG
states, `runstate`) is loaded with `torch.load(weights_only=True)` (invariant 10). Every file and folder is written to a
temporary name and renamed (invariant 9).

Under FSDP every parameter (and Adam moment) is a DTensor holding 1/world_size of it. Checkpoints and the
exported model hold full tensors in the same files as without FSDP: every rank takes part in gathering
each tensor (a collective, in the same order everywhere) and rank 0 writes. So a checkpoint is the same
whatever wrote it (1 process, DDP or FSDP, any world size) and the exported model loads anywhere. Rank 0
holds one full copy in CPU memory: enough for the models this project trains; torch.distributed.checkpoint
(sharded files) is the way past that.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .distributed import barrier, is_sharded, launch_rank, rank_and_world, unwrap
from .errors import UserError
from .model import GPT, ModelConfig, ScalarModel, Seq2Seq, build_model
from .runstate import full_copy, load_optimizer_state, optimizer_state, rng_state, set_rng_state, shard_like
from .tokenizer import FILES as TOKENIZER_FILES

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile and DDP wrappers


def canonical_key(key: str) -> str:
    """`module._orig_mod.transformer.h.0...` -> `transformer.h.0...`."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
        key = key.replace("._orig_mod.", ".")
    return key


def model_kind(model: nn.Module) -> str:
    model = unwrap(model)
    for cls, kind in ((GPT, "gpt"), (ScalarModel, "scalar"), (Seq2Seq, "seq2seq")):
        if isinstance(model, cls):
            return kind
    raise TypeError(f"not an instructgpt model: {type(model).__name__}")


def state_dict_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """Canonical keys; a tied unembedding is stored once (under the embedding's name)."""
    model = unwrap(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, tensor in model.state_dict().items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel() > 0:
            continue  # a tied parameter: loading re-ties it
        seen.add(ptr)
        out[canonical_key(key)] = tensor.detach().contiguous().cpu()
    return out


def publish_mode(path: str | Path, folder: bool = False) -> None:
    """The mode open() would have given (mkstemp and safetensors make 0600 files, whatever the umask), so that
    whoever may read OUT can read the weights, not only their config."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


def atomic_write(path: Path, write, sync: bool = True) -> None:
    """`write(tmp)` into a temporary file beside `path`, flushed to disk, then renamed over `path`: a crash
    leaves the old file or the new one. Temporary names are `.NAME.tmp-*`, which `Checkpointer.sweep` removes.
    sync=False leaves the flush to the caller (a checkpoint fsyncs its whole temporary folder once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        publish_mode(tmp)
        if sync:
            _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if sync:
        _fsync(path.parent)


def save_model(model: nn.Module, folder: str | Path, extra: dict | None = None,
               tensors: dict[str, Tensor] | None = None, sync: bool = True) -> None:
    """Write `folder/model.safetensors` and `folder/config.json` (each file atomically). `tensors`: the
    weights already gathered from a sharded model (`model_tensors`); by default the model's own.

    The old config.json goes first and the new one comes last: a crash in between leaves weights without a
    config (refused on loading), never new weights beside an old config that may describe another shape."""
    folder = Path(folder)
    model = unwrap(model)
    config = {"kind": model_kind(model), "model": model.config.to_dict(), **(extra or {})}
    if tensors is None:
        tensors = state_dict_for_saving(model)
    (folder / CONFIG).unlink(missing_ok=True)
    atomic_write(folder / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}), sync)
    atomic_write(folder / CONFIG, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"), sync)


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / CONFIG
    if not path.is_file():
        raise UserError(f"{folder}: no {CONFIG} (expected a checkpoint folder with {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(path.read_text())
        ModelConfig.from_dict(config["model"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a valid instructgpt model config ({e})") from None
    return config


def load_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strict loading with a message naming every missing and unexpected key; a sharded (FSDP) model keeps
    only its shard of each tensor."""
    model = unwrap(model)
    if is_sharded(model):
        _load_sharded(model, tensors, source)
        return
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    expected = set(state_dict_for_saving(model))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected key(s): {', '.join(unexpected)}")
        raise UserError(f"{source}: weights do not match the model: {'; '.join(parts)}")
    own = model.state_dict()
    for key, value in tensors.items():
        if own[key].shape != value.shape:
            raise UserError(f"{source}: {key} has shape {tuple(value.shape)}, "
                            f"the model expects {tuple(own[key].shape)}")
    # strict=False only because a tied unembedding is stored once; every key was checked above.
    model.load_state_dict(tensors, strict=False)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read safetensors weights ({e})") from None


def check_shapes(cfg: ModelConfig, scalar: bool, path: Path) -> None:
    """The weights' header (no tensor read) against the model that config.json describes, built on the meta
    device (no memory): a corrupted or crafted config (n_embd = 10**6) fails here, not out of memory later.
    A tied pair of parameters is stored under one of its names."""
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name}")
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {canonical_key(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: cannot read safetensors weights ({e})") from None
    with torch.device("meta"):
        model = build_model(cfg, scalar=scalar)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    names: dict[int, set[str]] = {}  # parameter -> every name it has (several when tied)
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), set()).add(name)
    aliases = {name: group for group in names.values() for name in group}
    missing = sorted(k for k in expected if not aliases.get(k, {k}) & shapes.keys())
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = [f"{what}: {', '.join(keys)}" for what, keys in (("missing key(s)", missing),
                                                                ("unexpected key(s)", unexpected)) if keys]
        raise UserError(f"{path}: weights do not match the model: {'; '.join(parts)}")
    for key, shape in shapes.items():
        if shape != expected[key]:
            raise UserError(f"{path}: {key} has shape {shape}, the model expects {expected[key]} "
                            "(its config.json describes another model than these weights)")


def load_model(folder: str | Path, kind: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Build the model `folder/config.json` describes and load its weights strictly.

    `kind` ("gpt", "scalar", "seq2seq") checks what the caller expects; a "scalar" request on a "gpt"
    checkpoint starts a reward model from a language model: the unembedding is dropped and the scalar
    head is freshly initialised (the paper's RM starts from the SFT model)."""
    folder = Path(folder)
    config = read_config(folder)
    stored = config["kind"]
    cfg = ModelConfig.from_dict(config["model"])
    if kind is not None and kind != stored and not (kind == "scalar" and stored == "gpt"):
        raise UserError(f"{folder}: holds a {stored!r} model, expected {kind!r}")
    check_shapes(cfg, stored == "scalar", folder / WEIGHTS)
    tensors = load_tensors(folder / WEIGHTS)
    model = build_model(cfg, scalar="scalar" in (kind, stored))
    if kind != stored and kind is not None:  # a reward model from a language model
        tensors = {k: v for k, v in tensors.items() if not k.startswith("lm_head.")}
        tensors.update({k: v for k, v in model.state_dict().items() if k.startswith("score_head.")})
    load_state_dict(model, tensors, str(folder / WEIGHTS))
    return model.to(device)


def _load_sharded(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    tensors = {canonical_key(k): v for k, v in tensors.items()}
    params = dict(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}  # parameter -> the key it is stored under (the first of its tied names)
    own = model.state_dict()
    for key in own:
        if key in params:
            first.setdefault(id(params[key]), key)
    expected = {k for k in own if k not in params or first[id(params[k])] == k}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise UserError(f"{source}: weights do not match the model: missing key(s): {', '.join(missing) or '-'}; "
                        f"unexpected key(s): {', '.join(unexpected) or '-'}")
    state = {}
    for key, like in own.items():
        full = tensors[first[id(params[key])] if key in params else key]
        if tuple(full.shape) != tuple(like.shape):
            raise UserError(f"{source}: {key} has shape {tuple(full.shape)}, the model expects {tuple(like.shape)}")
        state[key] = shard_like(full.to(like.dtype), like)
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# Gathered weights (the generators' and optimizer's states: `runstate`)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def model_tensors(model: nn.Module) -> dict[str, Tensor] | None:
    """Full weights with canonical keys, a tied parameter once (as `save_model` stores them), on
    rank 0; None on the other ranks. A collective when the model is sharded: call on every rank."""
    model = unwrap(model)
    if not is_sharded(model):
        return state_dict_for_saving(model) if rank_and_world()[0] == 0 else None
    params = dict(model.named_parameters(remove_duplicate=False))
    out, seen = {}, set()
    for key, tensor in model.state_dict().items():
        param = params.get(key)
        if param is not None:
            if id(param) in seen:
                continue  # a tied parameter: loading re-ties it
            seen.add(id(param))
        out[canonical_key(key)] = full_copy(tensor)
    return out if rank_and_world()[0] == 0 else None


# ----------------------------------------------------------------------------------------------------
# Step checkpoints and the exported model

TRAINED = "trained.safetensors"  # in best/ of a run whose steps keep the trained tensors only


@dataclass(frozen=True)
class Weights:
    """What a Checkpointer keeps of a model. By default every weight, everywhere (full fine-tuning). A LoRA run
    (`finetune.checkpoint_weights`) keeps in its step checkpoints only the tensors that train (the adapters, a
    reward model's head), with their optimizer state, since the rest is the stage's --init; what it publishes
    (OUT/ and best/) are plain merged weights that every reader of a model folder loads, and best/ also keeps
    the trained tensors (TRAINED), from which `Checkpointer.load_best` rebuilds the chosen model."""

    gather: Callable[[nn.Module], dict[str, Tensor] | None] = model_tensors  # a step's tensors; a collective
    load: Callable[[nn.Module, dict[str, Tensor], str], None] = load_state_dict  # (model, tensors, source), strict
    publish: Callable[[nn.Module], dict[str, Tensor] | None] = model_tensors  # OUT/ and best/; a collective
    trained_only: bool = False  # gather holds part of the model (the rest is --init)


class Checkpointer:
    """Resumable checkpoints in OUT/checkpoints/step_NNNNNNN/ and the stage's exported model in OUT/.

    A step folder holds, for each model, `{name}/model.safetensors` + `{name}/config.json`, and `state/`:
    `optim_{name}.pt` (optimizer state dicts), `rng_rank{r}.pt` (every generator of each rank), and
    `state.json` (the stage's own state: step, data position, ...). It is built in a hidden temporary
    folder beside it, fsynced, then renamed: a step folder exists complete or not at all. `weights` says
    which tensors of a model it keeps where (every one by default; see `Weights`).

    Under torchrun every rank calls save/load; rank 0 writes everything except the other ranks' RNG.
    """

    STEP = re.compile(r"^step_(\d{7,})$")
    COMPLETE = "COMPLETE"  # written last inside the temporary folder, before the rename

    def __init__(self, out: Path, keep_last: int = 2, weights: Weights | None = None):
        self.out = Path(out)
        self.root = self.out / "checkpoints"
        self.keep_last = keep_last
        self.weights = weights or Weights()

    # -- saving -------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        models: dict[str, nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict,
        extra_config: dict | None = None,
    ) -> Path:
        rank, _ = rank_and_world()
        final = self.root / f"step_{step:07d}"
        tmp = self.root / f".tmp-step_{step:07d}"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
            (tmp / "state").mkdir(parents=True)
        barrier()
        torch.save(rng_state(), tmp / "state" / f"rng_rank{rank}.pt")
        barrier()
        weights = {name: self.weights.gather(model) for name, model in models.items()}  # every rank: FSDP gathers
        optim = {name: optimizer_state(optimizer) for name, optimizer in optimizers.items()}
        if self.weights.trained_only:  # a reader of config.json learns that these weights are not a whole model
            extra_config = {**(extra_config or {}), "weights": "trained tensors only: the rest is the stage's --init"}
        if rank == 0:
            try:
                for name, model in models.items():
                    save_model(model, tmp / name, extra_config, weights[name], sync=False)
                for name, state_dict in optim.items():
                    torch.save(state_dict, tmp / "state" / f"optim_{name}.pt")
                write_json_atomic(tmp / "state" / "state.json", {"step": step, **state}, sync=False)
                (tmp / self.COMPLETE).write_text(f"{step}\n")
                _fsync_tree(tmp)
                _replace_folder(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        barrier()
        return final

    def sweep(self) -> None:
        """Clear what a killed run left in OUT (under the folder's lock, before anything else): unfinished saves
        (`.tmp-*`), half-pruned steps (`.old-*`), temporary files of atomic writes (`.NAME.tmp-*`); a step (or
        best/) that a re-save had moved aside (`.prev-*`) and not replaced yet is put back."""
        for parent in (self.root, self.out):
            if not parent.is_dir():
                continue
            for path in sorted(parent.iterdir()):
                name = path.name
                if name.startswith(".prev-") and path.is_dir():
                    final = path.with_name(name.removeprefix(".prev-"))
                    if not final.exists() and ((path / self.COMPLETE).is_file() or (path / "best.json").is_file()):
                        os.rename(path, final)
                    else:
                        shutil.rmtree(path)
                elif name.startswith((".tmp-", ".old-")) and path.is_dir():
                    shutil.rmtree(path)
                elif name.startswith(".") and ".tmp" in name and path.is_file():
                    path.unlink()

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for path in self.complete()[: -self.keep_last]:
            trash = path.with_name(f".old-{path.name}")
            os.rename(path, trash)  # a half-deleted folder must never look like a checkpoint
            shutil.rmtree(trash, ignore_errors=True)

    def save_best(self, models_or_model: dict[str, nn.Module] | nn.Module, record: dict) -> Path:
        """Replace OUT/best/ with these models (the stage decides what "best" means) and `record` (e.g.
        {"val_loss": 1.9, "step": 500}) as best.json; atomic like a step. With trained-only weights, best/ also
        keeps the trained tensors (TRAINED), for `load_best`."""
        best = self.out / "best"
        weights = self._gather(models_or_model, self.weights.publish)
        trained = self._gather(models_or_model, self.weights.gather) if self.weights.trained_only else {}
        if rank_and_world()[0] == 0:
            tmp = self.out / ".tmp-best"
            shutil.rmtree(tmp, ignore_errors=True)
            self._export_into(tmp, models_or_model, weights, None, sync=False)
            for name, tensors in trained.items():
                atomic_write(tmp / (name or "") / TRAINED,
                             lambda t, tensors=tensors: save_file(tensors, t, metadata={"format": "pt"}), sync=False)
            write_json_atomic(tmp / "best.json", record, sync=False)
            _fsync_tree(tmp)
            _replace_folder(tmp, best)
        barrier()
        return best

    def best_model_path(self) -> Path | None:
        """OUT/best/ when save_best wrote it (load it with load_model), else None."""
        best = self.out / "best"
        return best if (best / "best.json").is_file() else None

    def load_best(self, models_or_model: dict[str, nn.Module] | nn.Module) -> dict:
        """Load what best/ keeps into the models as `load` loads a step (the trained tensors of a run with
        trained-only weights: with its --init, the chosen model); returns best.json. Every rank calls."""
        best = self.best_model_path()
        if best is None:
            raise ValueError(f"load_best: {self.out} has no best/ (save_best writes it)")
        models = {None: models_or_model} if isinstance(models_or_model, nn.Module) else models_or_model
        for name, model in models.items():
            path = best / (name or "") / (TRAINED if self.weights.trained_only else WEIGHTS)
            self.weights.load(model, load_tensors(path), str(path))
        return json.loads((best / "best.json").read_text())

    def export(self, models_or_model: dict[str, nn.Module] | nn.Module, extra: dict | None = None) -> Path:
        """The stage's public result: OUT/model.safetensors + OUT/config.json for one model, or
        OUT/{name}/... for several. Each file is written atomically."""
        weights = self._gather(models_or_model, self.weights.publish)
        if rank_and_world()[0] == 0:
            self._export_into(self.out, models_or_model, weights, extra)
        barrier()
        return self.out

    @staticmethod
    def _gather(models_or_model, tensors_of: Callable[[nn.Module], dict | None]) -> dict:
        """{name: tensors_of(model)} (name None for a single model); every rank must call it (FSDP gathers)."""
        if isinstance(models_or_model, nn.Module):
            return {None: tensors_of(models_or_model)}
        return {name: tensors_of(model) for name, model in models_or_model.items()}

    @staticmethod
    def _export_into(folder: Path, models_or_model, weights: dict, extra: dict | None, sync: bool = True) -> None:
        if isinstance(models_or_model, nn.Module):
            save_model(models_or_model, folder, extra, weights[None], sync)
        else:
            for name, model in models_or_model.items():
                save_model(model, folder / name, extra, weights[name], sync)

    # -- finding and loading ------------------------------------------------------------------------

    def complete(self) -> list[Path]:
        """Complete step folders, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            m = self.STEP.match(path.name)
            if m and path.is_dir() and (path / self.COMPLETE).is_file():
                found.append((int(m.group(1)), path))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The highest complete step folder; temporary and half-deleted folders are ignored."""
        found = self.complete()
        return found[-1] if found else None

    def state_of(self, path: Path) -> dict:
        """The stage's state.json of a step folder, without loading anything else."""
        return json.loads((Path(path) / "state" / "state.json").read_text())

    def load(self, path: Path, models: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer]) -> dict:
        """Load weights (strictly), optimizer states and RNG states from a step folder; return its state."""
        path = Path(path)
        if not (path / self.COMPLETE).is_file():
            raise UserError(f"{path} is not a complete checkpoint (no {self.COMPLETE} marker)")
        for name, model in models.items():
            self.weights.load(model, load_tensors(path / name / WEIGHTS), str(path / name / WEIGHTS))
        for name, optimizer in optimizers.items():
            file = path / "state" / f"optim_{name}.pt"
            if not file.is_file():
                raise UserError(f"{path}: no optimizer state for {name!r} ({file.name})")
            load_optimizer_state(optimizer, torch.load(file, map_location="cpu", weights_only=True))
        rank, _ = rank_and_world()
        rng_file = path / "state" / f"rng_rank{rank}.pt"
        if not rng_file.is_file():
            raise UserError(f"{path}: no RNG state for rank {rank} (saved with a different number of ranks?)")
        set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
        return self.state_of(path)


def _replace_folder(tmp: Path, final: Path) -> None:
    """Publish the complete folder `tmp` as `final`. A `final` that exists (a step saved again after a resume,
    best/) is moved aside to `.prev-NAME` and deleted once the new one is in place: a crash in between leaves
    `.prev-NAME`, which `Checkpointer.sweep` puts back."""
    prev = final.with_name(f".prev-{final.name}")
    if final.exists():
        shutil.rmtree(prev, ignore_errors=True)
        os.rename(final, prev)
    os.rename(tmp, final)
    _fsync(final.parent)
    shutil.rmtree(prev, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------
# The stage folder: one guard against reusing it by accident, one completion marker

DONE = "done.json"  # written last, atomically: the stage completed


def write_json_atomic(path: Path, obj: dict, sync: bool = True) -> None:
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"), sync)


def check_out(out: Path, resume: bool, what: str) -> None:
    """Refuse an `--out` that would overwrite work by accident: a file, a finished run (its done.json), or
    the checkpoints of an unfinished one, unless `--resume` says to continue (or keep) it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if resume:
        return
    if (out / DONE).is_file():
        raise UserError(f"--out {out} holds a finished {what} run ({DONE}); pass --resume to keep it "
                        "(or to train further with more steps), or choose another --out")
    if Checkpointer(out).latest() is not None:
        raise UserError(f"--out {out} holds checkpoints of an unfinished {what} run; pass --resume to continue "
                        "it, or choose another --out")


LOCK = ".lock"  # flock-ed by the process writing the folder


@contextlib.contextmanager
def writing(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT/.lock while a stage writes OUT (the main rank): a second process on the same
    --out stops at once instead of mixing its files with the first one's. Under the lock, what a killed run left
    is swept (`Checkpointer.sweep`). On an error, folders it created holding nothing but the lock are removed."""
    out = Path(out)
    if launch_rank() != 0:
        yield
        return
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = [p for p in (out, *out.parents) if not p.exists()]  # the deepest first
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"another instructgpt process is writing {out} (it holds {out / LOCK}); wait for it to "
                        "finish, or choose another --out") from None
    try:
        Checkpointer(out).sweep()
        yield
    except BaseException:
        if created and [p.name for p in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            for folder in created:
                folder.rmdir()
        raise
    finally:
        os.close(fd)  # releases the lock


def read_done(out: Path) -> dict | None:
    """The summary a finished stage left in OUT/done.json, or None."""
    return json.loads((Path(out) / DONE).read_text()) if (Path(out) / DONE).is_file() else None


def write_done(out: Path, summary: dict, tokenizer_from: Path | None = None) -> None:
    """Finish a stage folder (main rank only): copy the tokenizer files beside the exported model, then write
    done.json, all atomically; done.json comes last, so it exists only when everything else does."""
    out = Path(out)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (src := Path(tokenizer_from) / name).is_file():
                atomic_write(out / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
            else:  # a stale one of an earlier run into OUT
                (out / name).unlink(missing_ok=True)
    write_json_atomic(out / DONE, summary)
