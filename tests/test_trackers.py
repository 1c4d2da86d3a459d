import math
import subprocess
import sys
import types

import pytest
import torch

from instructgpt.errors import UserError
from instructgpt.trackers import open_tracker, scalars
from instructgpt.train import MetricsLog

ROWS = [
    {"step": 1, "loss": 2.5, "lr": 1e-3, "tokens": 512},
    {"step": 2, "loss": 2.0, "lr": 5e-4, "tokens": 1024, "val_loss": 2.25},
    # Nothing here is a finite number: every value must be left out.
    {
        "step": 3,
        "note": "warmup done",
        "flag": True,
        "bad": float("nan"),
        "inf": float("inf"),
        "nan_str": "nan",
        "none": None,
        "hist": [1, 2],
    },
]


def test_none_opens_nothing(tmp_path):
    assert open_tracker("none", tmp_path, "sft") is None
    assert not any(tmp_path.iterdir())


def test_unknown_backend_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="mlflow"):
        open_tracker("mlflow", tmp_path, "sft")


def test_scalars_keep_finite_numbers_only():
    row = {"step": 7, "a": 1, "b": 0.5, "c": False, "d": -math.inf, "e": "1.0", "f": None}
    assert scalars(row) == {"a": 1, "b": 0.5}
    assert scalars(ROWS[2]) == {}


def test_tensorboard_writes_scalars_that_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = open_tracker("tensorboard", tmp_path, "sft")
    for row in ROWS:
        tracker.log(row)
    tracker.close()

    log_dir = tmp_path / "tensorboard"
    assert list(log_dir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert sorted(events.Tags()["scalars"]) == ["sft/loss", "sft/lr", "sft/tokens", "sft/val_loss"]
    loss = events.Scalars("sft/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([2.5, 2.0])
    assert [(e.step, e.value) for e in events.Scalars("sft/tokens")] == [(1, 512), (2, 1024)]
    assert [(e.step, e.value) for e in events.Scalars("sft/val_loss")] == [(2, 2.25)]


def _fake_module(name):
    """A stand-in for wandb or trackio that records its calls."""
    calls = []
    fake = types.ModuleType(name)
    fake.init = lambda **kwargs: calls.append(("init", kwargs))
    fake.log = lambda values, step=None: calls.append(("log", values, step))
    fake.finish = lambda: calls.append(("finish",))
    return fake, calls


def test_wandb_gets_plain_names_and_steps(tmp_path, monkeypatch):
    fake, calls = _fake_module("wandb")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "my-project")
    out = tmp_path / "run1" / "rm"

    tracker = open_tracker("wandb", out, "rm", config={"lr": 1e-5})
    for row in ROWS:
        tracker.log(row)
    tracker.close()

    init = {"project": "my-project", "name": "rm-run1", "dir": str(out), "config": {"lr": 1e-5}, "job_type": "rm"}
    assert calls == [
        ("init", init),
        ("log", {"loss": 2.5, "lr": 1e-3, "tokens": 512}, 1),
        ("log", {"loss": 2.0, "lr": 5e-4, "tokens": 1024, "val_loss": 2.25}, 2),
        ("finish",),
    ]
    assert out.is_dir()


def test_trackio_gets_plain_names_and_steps(tmp_path, monkeypatch):
    fake, calls = _fake_module("trackio")
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.delenv("TRACKIO_PROJECT", raising=False)
    out = tmp_path / "ppo_small"

    tracker = open_tracker("trackio", out, "ppo", config=None)
    tracker.log({"step": 10, "kl": 0.02, "reward": -1, "text": "hi"})
    tracker.close()

    assert calls == [
        ("init", {"project": "instructgpt", "name": "ppo-ppo_small", "config": None}),
        ("log", {"kl": 0.02, "reward": -1}, 10),
        ("finish",),
    ]


@pytest.mark.parametrize("backend", ["tensorboard", "wandb", "trackio"])
def test_missing_package_says_how_to_install(tmp_path, monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # makes `import backend` raise ImportError
    with pytest.raises(UserError, match=rf"--report-to {backend} .*pip install 'instructgpt\[{backend}\]'"):
        open_tracker(backend, tmp_path, "sft")


def test_import_pulls_in_no_backend():
    code = (
        "import sys, instructgpt.trackers; "
        "print([m for m in ('wandb', 'trackio', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_stages_metrics_log_sends_its_rows_to_the_tracker(tmp_path, monkeypatch):
    """What a stage logs with --report-to goes to the tracker with metrics.jsonl's names and steps, from the
    main rank only, and the run is finished when the log is closed (after a resume, too)."""
    calls = []
    fake = types.SimpleNamespace(init=lambda **kw: calls.append(("init", kw)),
                                 log=lambda values, step: calls.append(("log", step, values)),
                                 finish=lambda: calls.append(("finish",)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    log = MetricsLog(tmp_path / "sft" / "metrics.jsonl", report_to="wandb", stage="sft", config={"lr": 0.1})
    log.write({"step": 1, "loss": 2.5, "lr": 0.1})
    log.log(2, loss=torch.tensor(2.0), note="text")
    log.close()
    assert calls[0][0] == "init" and calls[0][1]["config"] == {"lr": 0.1}
    assert calls[1:] == [("log", 1, {"loss": 2.5, "lr": 0.1}), ("log", 2, {"loss": 2.0}), ("finish",)]
    assert [r["step"] for r in log.read()] == [1, 2]
    calls.clear()
    MetricsLog(tmp_path / "other" / "metrics.jsonl", enabled=False, report_to="wandb").log(1, loss=1.0)
    assert calls == []  # ranks other than 0 neither write nor report
