"""The RLHF benchmark's group-RL rows run the stage's own rollout, scoring and update, and TRL's side is read from
its JSON line (or its failure named): a benchmark that rots would report nothing, or something else."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import one_thread_pool

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rlhf_cpu  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_thread_pool()


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_rows_time_whole_steps_of_the_stage(estimator, monkeypatch):
    steps = []
    real_update = rlhf_cpu.ppo_update

    def update(policy, value, opt_p, opt_v, ro, exp, cfg, *a, **k):
        steps.append((cfg.estimator, cfg.group_size, ro.ids.size(0), exp["advantages"].abs().sum().item()))
        return real_update(policy, value, opt_p, opt_v, ro, exp, cfg, *a, **k)

    monkeypatch.setattr(rlhf_cpu, "ppo_update", update)
    row = rlhf_cpu.bench_group(rlhf_cpu.runtime(1), 1, np.random.default_rng(0), estimator)
    assert len(steps) == 3  # two warm-up steps and one timed
    assert all(s[:3] == (estimator, 4, 16) and s[3] > 0 for s in steps)  # the rewards differ within groups
    assert row["stage"] == estimator and row["rate"] == pytest.approx(16 / row["seconds_per_step"])
    assert row["seconds_generate"] > 0 and row["seconds_update"] > 0


def test_trl_side_is_its_last_json_line_or_a_named_failure(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text('import json, sys\nprint("log")\nprint(json.dumps({"workload": sys.argv[-1], "per_second": 12.5, '
                  '"trl_version": "1.16.0", "steps": 80}))\n')
    fake_python = tmp_path / "python"
    fake_python.write_text(f"#!/bin/sh\nexec {sys.executable} {ok} \"$@\"\n")
    fake_python.chmod(0o755)
    assert rlhf_cpu.run_trl(fake_python, "rm", None, 1) == {"trl_rate": 12.5, "trl_version": "1.16.0",
                                                             "trl_steps": 80}
    ok.write_text('import json\nprint(json.dumps({"per_second": None, "error": "ValueError: boom"}))\n')
    with pytest.raises(SystemExit, match="TRL's grpo workload failed.*boom"):
        rlhf_cpu.run_trl(fake_python, "grpo", 5, 1)
