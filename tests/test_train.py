"""The training library: schedule, optimizer groups, token-weighted accumulation, atomic checkpoints."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from instructgpt import distributed, train
from instructgpt.checkpoint import Checkpointer
from instructgpt.errors import UserError
from instructgpt.losses import token_cross_entropy
from instructgpt.model import GPT, ModelConfig, count_params
from instructgpt.train import (
    EmptyTargetsError,
    MetricsLog,
    TrainConfig,
    lr_at,
    make_optimizer,
    setup,
    train_step,
)

V = 32


def tiny_model(seed: int = 0, dropout: float = 0.0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=16, dropout=dropout))


def loss_sum(model, batch):
    x, y = batch
    return token_cross_entropy(model(x), y)


def n_targets(batch) -> int:
    return int((batch[1] != -100).sum())


def test_lr_schedule() -> None:
    cfg = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5.5e-4)  # half-way down the cosine
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert TrainConfig(lr=2e-3).final_lr == pytest.approx(2e-4)


def test_optimizer_groups_decay_only_matrices() -> None:
    model = tiny_model()
    cfg = TrainConfig(weight_decay=0.1)
    opt = make_optimizer(model, cfg, setup(cfg))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # the tied embedding / unembedding appears once
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == count_params(model)
    assert all(p.dim() == 2 for p in decay["params"])
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.transformer.wte.weight) in no_decay_ids and id(model.transformer.wpe.weight) in no_decay_ids
    assert id(model.transformer.h[0].attn.qkv_proj.weight) not in no_decay_ids


def test_token_cross_entropy_is_a_sum_in_fp32() -> None:
    logits = torch.randn(2, 5, V)
    targets = torch.randint(0, V, (2, 5))
    targets[0, :3] = -100
    got = token_cross_entropy(logits, targets)
    want = torch.nn.functional.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="mean") * 7
    assert torch.allclose(got, want, atol=1e-5)
    assert token_cross_entropy(logits.bfloat16(), targets).dtype == torch.float32


def run_step(micro_batches, optimizer_cls=torch.optim.SGD):
    model = tiny_model()
    # SGD moves each weight by lr * grad, so the weights compare the gradients themselves; Adam's first
    # step is about lr * sign(grad), which hides a wrong scale but not a wrong direction.
    lr = 0.1 if optimizer_cls is torch.optim.SGD else 1e-3
    cfg = TrainConfig(lr=lr, warmup_steps=0, max_steps=10, grad_clip=0.0, seed=0)
    rt = setup(cfg)
    torch.manual_seed(0)  # setup seeds with cfg.seed; the model was built before, identically each time
    opt = optimizer_cls(model.parameters(), lr=cfg.lr)
    stats = train_step(model, opt, micro_batches, loss_sum, n_targets, cfg, rt, step=5)
    return model, stats


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.AdamW])
@pytest.mark.parametrize("uneven", [False, True])
def test_grad_accumulation_equals_one_big_batch(optimizer_cls, uneven: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (8, 16), generator=g)
    y = torch.randint(0, V, (8, 16), generator=g)
    if uneven:  # micro-batches with 32, 17, 3 and 25 target tokens: a mean of means would be wrong
        for rows, keep in ((slice(2, 4), 17), (slice(4, 6), 3), (slice(6, 8), 25)):
            block = y[rows].reshape(-1).clone()
            block[keep:] = -100
            y[rows] = block.view(2, 16)
    big_model, big = run_step([(x, y)], optimizer_cls)
    small_model, small = run_step([(x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)], optimizer_cls)
    assert big["tokens"] == small["tokens"] == int((y != -100).sum())
    assert small["loss"] == pytest.approx(big["loss"], abs=1e-6)
    assert small["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    for (name, a), b in zip(big_model.named_parameters(), small_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name
    # and the loss is the token-weighted mean, not the mean of the micro-batch means
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(tiny_model()(x).view(-1, V), y.view(-1), ignore_index=-100)
    assert big["loss"] == pytest.approx(float(want), abs=1e-5)


def test_empty_loss_mask_fails_loudly() -> None:
    x = torch.randint(0, V, (2, 16))
    y = torch.full((2, 16), -100)
    with pytest.raises(EmptyTargetsError, match="no target tokens"):
        run_step([(x, y), (x, y)])


def test_tiny_model_overfits_one_batch() -> None:
    model = tiny_model()
    cfg = TrainConfig(lr=3e-3, warmup_steps=5, max_steps=150, weight_decay=0.0, seed=0)
    rt = setup(cfg)
    opt = make_optimizer(model, cfg, rt)
    g = torch.Generator().manual_seed(1)
    batch = (torch.randint(0, V, (4, 16), generator=g), torch.randint(0, V, (4, 16), generator=g))
    first = train_step(model, opt, [batch], loss_sum, n_targets, cfg, rt, 0)["loss"]
    for step in range(1, cfg.max_steps):
        stats = train_step(model, opt, [batch], loss_sum, n_targets, cfg, rt, step, sync=step == cfg.max_steps - 1)
    assert first > math.log(V) - 0.5
    assert stats["loss"] < 0.05, stats


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def trained(steps: int, dropout: float = 0.1):
    model = tiny_model(dropout=dropout)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, max_steps=20, seed=0)
    rt = setup(cfg)
    opt = make_optimizer(model, cfg, rt)
    batch = (torch.randint(0, V, (2, 16)), torch.randint(0, V, (2, 16)))
    for s in range(steps):
        train_step(model, opt, [batch], loss_sum, n_targets, cfg, rt, s)
    return model, opt, cfg, rt, batch


def test_checkpoint_round_trip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model, opt, cfg, rt, batch = trained(3)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    rng = np.random.default_rng(5)
    rng.integers(0, 10, 3)
    path = ckpt.save(3, {"model": model}, {"model": opt}, {"data_rng": rng.bit_generator.state}, {"note": 1})
    assert path == tmp_path / "checkpoints" / "step_0000003" and ckpt.latest() == path
    want_next = (random.random(), np.random.rand(), torch.rand(3), rng.integers(0, 10**9))
    ckpt.load(path, {}, {})  # restores the RNG states the draws above consumed
    # continue the original for two steps (dropout consumes torch's generator)
    for s in (3, 4):
        train_step(model, opt, [batch], loss_sum, n_targets, cfg, rt, s)

    torch.manual_seed(123), random.seed(1), np.random.seed(1)  # scramble every global generator
    model2 = tiny_model(seed=9, dropout=0.1)
    opt2 = make_optimizer(model2, cfg, rt)
    state = ckpt.load(path, {"model": model2}, {"model": opt2})
    rng2 = np.random.default_rng(0)
    rng2.bit_generator.state = state["data_rng"]
    assert state["step"] == 3
    got_next = (random.random(), np.random.rand(), torch.rand(3), rng2.integers(0, 10**9))
    assert got_next[0] == want_next[0] and got_next[1] == want_next[1] and got_next[3] == want_next[3]
    assert torch.equal(got_next[2], want_next[2])
    state = ckpt.load(path, {"model": model2}, {"model": opt2})  # back to the saved RNG
    for s in (3, 4):
        train_step(model2, opt2, [batch], loss_sum, n_targets, cfg, rt, s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    # every non-weight file loads without unpickling arbitrary objects
    for file in (path / "state").glob("*.pt"):
        torch.load(file, weights_only=True)
    assert json.loads((path / "model" / "config.json").read_text())["note"] == 1


def test_crash_during_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    model, opt, *_ = trained(2)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    good = ckpt.save(2, {"model": model}, {"model": opt}, {"x": 1})
    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if "optim" in str(f):
            real_save(obj, f, *a, **k)
            raise OSError("disk full (simulated crash mid-checkpoint)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train.torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save(4, {"model": model}, {"model": opt}, {"x": 2})
    monkeypatch.undo()
    # a crash that even skipped the clean-up leaves a temporary folder: never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp-step_0000006" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000008").mkdir()  # no COMPLETE marker: a torn folder
    assert ckpt.latest() == good
    model2, opt2, *_ = trained(0)
    assert ckpt.load(ckpt.latest(), {"model": model2}, {"model": opt2})["x"] == 1
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    model, opt, *_ = trained(1)
    ckpt = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"model": model}, {"model": opt}, {})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000003", "step_0000004"]
    ckpt.save(4, {"model": model}, {"model": opt}, {"again": True})  # the same step twice replaces it
    assert ckpt.load(ckpt.latest(), {"model": model}, {"model": opt})["again"] is True
    ckpt.export(model, extra={"stage": "test"})
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_best_checkpoint_and_helpers(tmp_path: Path) -> None:
    model, *_ = trained(1)
    ckpt = Checkpointer(tmp_path)
    assert ckpt.best_model_path() is None
    ckpt.save_best(model, {"val_loss": 2.5, "step": 1})
    ckpt.save_best(model, {"val_loss": 2.0, "step": 2})
    best = ckpt.best_model_path()
    assert best == tmp_path / "best" and json.loads((best / "best.json").read_text())["step"] == 2
    assert (best / "model.safetensors").is_file() and not (tmp_path / ".tmp-best").exists()
    assert distributed.resolve_device("auto").type in ("cpu", "cuda")
    assert distributed.resolve_device("cpu").type == "cpu"
    with pytest.raises(UserError, match="--device"):
        distributed.resolve_device("tpu")
    with train.Progress(10, "test", start=2) as bar:  # not a terminal: silent, but accepts every form
        bar.update(3, {"loss": 1.0, "grad_norm": torch.tensor(0.5), "lr": 1e-3})
        bar.update(4, 0.9, tokens_per_s=100.0)
    with pytest.raises(UserError, match="--batch-size"):
        setup(TrainConfig(batch_size=0))


def test_metrics_log_drops_steps_after_the_resumed_one(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in (10, 20, 30):
        log.log(step, loss=torch.tensor(1.5))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 40, "lo')  # torn by a kill
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=20)
    log.write({"step": 30, "loss": 0.5})
    assert [(r["step"], r["loss"]) for r in log.read()] == [(10, 1.5), (20, 1.5), (30, 0.5)]


def test_nothing_is_unpickled() -> None:
    src = Path(train.__file__).parent
    for file in src.rglob("*.py"):
        text = file.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{file}: {call}"
        assert not re.search(r"^\s*(import pickle|from pickle|import dill)", text, re.M), file


# ----------------------------------------------------------------------------------------------------
# Non-finite steps are never taken (audit F5, F30)


def nan_loss_sum(model, batch):
    return loss_sum(model, batch) * float("nan")


def adam_state(opt) -> list:
    return [(s["step"].clone(), s["exp_avg"].clone(), s["exp_avg_sq"].clone()) for s in opt.state.values()]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for u, v in zip(a, b) for x, y in zip(u, v))


def test_a_non_finite_step_raises_before_the_optimizer_moves() -> None:
    """sync=True: the step stops with DivergedError (a UserError: the CLI prints it and exits 2), naming the
    step, and neither the weights nor Adam's moments or step count have moved."""
    model, opt, cfg, rt, batch = trained(2, dropout=0.0)
    weights, moments = [p.clone() for p in model.parameters()], adam_state(opt)
    with pytest.raises(train.DivergedError, match="step 3: loss nan") as e:
        train_step(model, opt, [batch], nan_loss_sum, n_targets, cfg, rt, 2)
    assert isinstance(e.value, UserError)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters())) and same(moments, adam_state(opt))
    assert all(p.grad is None for p in model.parameters())  # a caller that goes on starts from clean gradients


@pytest.mark.parametrize("fused", [True, False])
def test_an_unsynced_non_finite_step_is_skipped_and_reported_at_the_next_check(fused: bool) -> None:
    """sync=False: the step is skipped on the device (fused AdamW's found_inf; other optimizers on the host)
    and the guard names it at the next check. Its slow twin: the same run that never took that step."""
    model, opt, cfg, rt, batch = trained(2, dropout=0.0)
    if not fused:
        opt.defaults["fused"] = None  # the host-side path, as any optimizer without found_inf takes
    twin, twin_opt, *_ = trained(2, dropout=0.0)
    guard = train.FiniteGuard(rt.device)
    guard.check()  # nothing recorded yet
    train_step(model, opt, [batch], nan_loss_sum, n_targets, cfg, rt, 2, sync=False, guard=guard)
    for s in (3, 4):  # the run goes on, unsynced, as pretraining between logs does
        train_step(model, opt, [batch], loss_sum, n_targets, cfg, rt, s, sync=False, guard=guard)
        train_step(twin, twin_opt, [batch], loss_sum, n_targets, cfg, rt, s)
    assert all(torch.equal(a, b) for a, b in zip(twin.parameters(), model.parameters()))
    assert same(adam_state(twin_opt), adam_state(opt))
    with pytest.raises(train.DivergedError, match="step 3: loss nan"):
        guard.check()


def test_clip_and_check_stops_on_a_non_finite_gradient_of_a_finite_loss() -> None:
    model = tiny_model()
    x = torch.randint(0, V, (2, 16))
    loss_sum(model, (x, x)).backward()
    norms = train.clip_and_check({"policy": model}, 1.0)
    assert norms["policy"] > 0 and math.isfinite(norms["policy"])
    model.lm_head.weight.grad[0, 0] = float("inf")  # a finite loss, an overflowed gradient (bf16)
    with pytest.raises(train.DivergedError, match="gradient norm is not finite \\(policy inf"):
        train.clip_and_check({"policy": model}, 0.0)
    with pytest.raises(UserError, match="--lr must be positive and finite"):
        TrainConfig(lr=float("inf")).validate()


# ----------------------------------------------------------------------------------------------------
# Resuming only what the checkpoint's run was (audit F22)


def test_a_resume_with_other_settings_names_them() -> None:
    from dataclasses import dataclass, field

    @dataclass
    class Args:
        data: list[Path]
        out: Path
        epochs: float = 1.0
        train: TrainConfig = field(default_factory=lambda: TrainConfig(batch_size=8, grad_accum=1))

    rt = distributed.Runtime(device=torch.device("cpu"), dtype=torch.float32, autocast=None)
    data = Path(__file__)
    before = train.run_fingerprint(Args([data], Path("a")), rt, 100)
    assert before["--data"][0]["bytes"] == data.stat().st_size and len(before["--data"][0]["sha256"]) == 64
    same_run = [Args([data], Path("elsewhere")),  # where it writes is not part of the run
                Args([data], Path("a"), train=TrainConfig(batch_size=4, grad_accum=2, device="cpu", log_interval=1))]
    for args in same_run:
        train.check_resume({"step": 40, "fingerprint": before}, train.run_fingerprint(args, rt, 100), Path("ckpt"))
    rt2 = distributed.Runtime(device=torch.device("cpu"), dtype=torch.float32, autocast=None, world_size=2)
    cases = [
        (Args([data], Path("a"), train=TrainConfig(batch_size=4)), rt, r"examples per step \(--batch-size.*8 then, 4"),
        (Args([data], Path("a")), rt2, "examples per step"),  # two processes: twice the examples per step
        (Args([Path(train.__file__)], Path("a")), rt, r"--data \(other files"),
        (Args([data], Path("a"), train=TrainConfig(batch_size=8, lr=1e-3, seed=2)), rt, "--lr .*; --seed"),
        (Args([data], Path("a"), epochs=2.0), rt, "--epochs"),
    ]
    for args, runtime, message in cases:
        with pytest.raises(UserError, match=message):
            train.check_resume({"step": 40, "fingerprint": before}, train.run_fingerprint(args, runtime, 100),
                               Path("ckpt"))
    # the run's length may change from the checkpoint of its last step only: training further
    longer = train.run_fingerprint(Args([data], Path("a"), epochs=2.0), rt, 200)
    train.check_resume({"step": 100, "fingerprint": before}, longer, Path("ckpt"))
    with pytest.raises(UserError, match="--max-steps \\(100 then, 200 now\\)"):
        train.check_resume({"step": 40, "fingerprint": before}, longer, Path("ckpt"))
    train.check_resume({"step": 40}, longer, Path("ckpt"))  # written before fingerprints: taken as it is


def test_dist_timeout_reaches_the_process_group(monkeypatch) -> None:
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kw: seen.update(kw))
    monkeypatch.setattr(distributed.atexit, "register", lambda fn: None)
    setup(TrainConfig(device="cpu", dist_timeout=7.5))
    assert seen["timeout"].total_seconds() == 450 and seen["backend"] == "gloo"
    with pytest.raises(UserError, match="--dist-timeout"):
        TrainConfig(dist_timeout=0).validate()


# ----------------------------------------------------------------------------------------------------
# Crash leftovers, re-saves, logs


def test_a_crash_between_the_renames_of_a_resave_loses_nothing(tmp_path: Path, monkeypatch) -> None:
    """Saving a step (or best/) that exists moves the old copy aside until the new one is in place (audit F18);
    a crash in between leaves `.prev-*`, which the sweep at the next start puts back."""
    model, opt, *_ = trained(1)
    ckpt = Checkpointer(tmp_path, keep_last=1)
    ckpt.save(4, {"model": model}, {"model": opt}, {"copy": "old"})
    ckpt.save_best(model, {"step": 4})
    real_rename = train_os_rename = __import__("os").rename

    def crash_on_publish(src, dst, *a, **k):
        if Path(src).name.startswith(".tmp-"):
            raise KeyboardInterrupt  # killed between moving the old copy aside and publishing the new one
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr("instructgpt.checkpoint.os.rename", crash_on_publish)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(4, {"model": model}, {"model": opt}, {"copy": "new"})
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_best(model, {"step": 5})
    monkeypatch.setattr("instructgpt.checkpoint.os.rename", train_os_rename)
    assert ckpt.latest() is None and ckpt.best_model_path() is None  # each copy is only under its .prev- name
    # what else a kill leaves: a temporary step, a half-pruned one, the temporary file of an atomic write
    (tmp_path / "checkpoints" / ".tmp-step_0000009" / "model").mkdir(parents=True)
    (tmp_path / "checkpoints" / ".old-step_0000001").mkdir()
    (tmp_path / ".model.safetensors.tmp-x1y2").write_bytes(b"half")
    ckpt.sweep()
    assert ckpt.state_of(ckpt.latest())["copy"] == "old"
    assert json.loads((ckpt.best_model_path() / "best.json").read_text()) == {"step": 4}
    assert sorted(p.name for p in tmp_path.rglob(".*")) == []


def test_metrics_readers_skip_a_torn_last_line_only(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: skipped a torn last line"):
        assert train.read_metrics(path) == [{"step": 1, "loss": 2.0}]
    path.write_text('{"step": 1, "lo\n{"step": 2, "loss": 2.0}\n')
    with pytest.raises(UserError, match="metrics.jsonl:1: not a JSON row"):
        train.read_metrics(path)
