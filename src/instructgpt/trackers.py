"""Send each metrics row to an experiment tracker: `--report-to tensorboard|wandb|trackio`.

Every stage already writes OUT/metrics.jsonl; a tracker gets the same rows, with the same metric
names, so what a user watches live is what the files hold. Each backend is an optional extra,
imported only when asked for: a user without wandb installed never imports it.
"""

from __future__ import annotations

import importlib
import math
import os
from pathlib import Path
from types import ModuleType
from typing import Literal, Protocol

from .errors import UserError

ReportTo = Literal["none", "tensorboard", "wandb", "trackio"]
CHOICES = ("none", "tensorboard", "wandb", "trackio")


class Tracker(Protocol):
    def log(self, row: dict) -> None:
        """Send the numeric values of a row that carries its own "step"."""

    def close(self) -> None:
        """Flush and end the run."""


def open_tracker(report_to: str, out: Path, stage: str, config: dict | None = None) -> Tracker | None:
    """The tracker for `--report-to`, or None for "none".

    out: the stage's output folder (tensorboard writes out/tensorboard, wandb its files under out).
    stage: names the run and, for tensorboard, prefixes the metric names ("sft/loss").
    config: the run's settings, shown beside the curves by wandb and trackio."""
    out = Path(out)
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        _require("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        return _TensorBoard(SummaryWriter(log_dir=str(out / "tensorboard")), stage)
    if report_to == "wandb":
        wandb = _require("wandb")
        out.mkdir(parents=True, exist_ok=True)
        project = os.environ.get("WANDB_PROJECT", "instructgpt")
        wandb.init(project=project, name=_run_name(stage, out), dir=str(out), config=config, job_type=stage)
        return _ModuleTracker(wandb)
    if report_to == "trackio":
        trackio = _require("trackio")
        project = os.environ.get("TRACKIO_PROJECT", "instructgpt")
        trackio.init(project=project, name=_run_name(stage, out), config=config)
        return _ModuleTracker(trackio)
    raise UserError(f"unknown --report-to {report_to!r}: choose one of {', '.join(CHOICES)}")


def scalars(row: dict) -> dict[str, int | float]:
    """The values of a row a tracker can plot: finite ints and floats, without "step".

    Rows may also hold None, strings ("nan" is how metrics.jsonl keeps a non-finite float), lists
    and bools; those are left out rather than sent as something they are not."""
    return {
        k: v
        for k, v in row.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and (isinstance(v, int) or math.isfinite(v))
    }


class _TensorBoard:
    """One scalar per metric, named "<stage>/<metric>" so that stages written to one log dir stay apart."""

    def __init__(self, writer, stage: str):
        self.writer = writer
        self.stage = stage

    def log(self, row: dict) -> None:
        for name, value in scalars(row).items():
            self.writer.add_scalar(f"{self.stage}/{name}", value, int(row["step"]))

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class _ModuleTracker:
    """wandb and trackio share one API: module-level log(values, step=step) and finish()."""

    def __init__(self, module: ModuleType):
        self.module = module

    def log(self, row: dict) -> None:
        values = scalars(row)
        if values:
            self.module.log(values, step=int(row["step"]))

    def close(self) -> None:
        self.module.finish()


def _require(name: str) -> ModuleType:
    """Import an optional backend, or tell the user how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise UserError(f"--report-to {name} needs the {name} package: pip install 'instructgpt[{name}]'") from e


def _run_name(stage: str, out: Path) -> str:
    """The stage and its output folder, e.g. "sft-sft_small". A pipeline names each stage's folder after
    the stage (RUN/sft), so the run folder stands in for it then: "sft-RUN"."""
    folder = out.resolve()
    if folder.name == stage:
        folder = folder.parent
    return f"{stage}-{folder.name}" if folder.name else stage
