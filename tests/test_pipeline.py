"""The main job end to end at smoke size: every stage runs, every file of the run layout exists, and
results.json has the documented schema. A second invocation skips every finished stage."""

import json

import pytest

from instructgpt.cli import main

MODEL_KEYS = {"win_rate_vs_sft", "win_rate_ci95", "labeler_score", "pretrain_val_loss", "hallucination_rate",
              "refusal_rate", "over_refusal_rate", "constraint_rate", "per_family", "few_shot_accuracy"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    main(["pipeline", "--preset", "smoke", "--out", str(out)])
    return out


def test_every_file_of_the_run_layout_exists(run):
    expected = ["pipeline.json", "tokenizer/tokenizer.json", "data/meta.json", "data/rankings.jsonl",
                "eval/results.json", "report.html", "report.md", "plots/win_rate.png", "plots/losses.png",
                "plots/ppo.png", "plots/families.png", "world/corpus.txt", "world/prompts_eval.jsonl"]
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo"):
        expected += [f"{stage}/{f}" for f in ("model.safetensors", "config.json", "tokenizer.json",
                                              "metrics.jsonl", "done.json")]
    missing = [f for f in expected if not (run / f).is_file()]
    assert not missing


def test_results_schema(run):
    r = json.loads((run / "eval" / "results.json").read_text())
    assert r["preset"] == "smoke" and r["seed"] == 0
    assert set(r["models"]) == {"pretrained", "sft", "ppo", "ppo_ptx", "dpo"}
    assert 0.0 <= r["rm"]["accuracy"] <= 1.0
    assert set(r["stage_seconds"]) >= {"world", "prepare", "pretrain", "sft", "collect", "rm", "ppo", "eval"}
    for name, m in r["models"].items():
        assert MODEL_KEYS <= set(m), name
        lo, hi = m["win_rate_ci95"]
        assert 0.0 <= lo <= m["win_rate_vs_sft"] <= hi <= 1.0
        assert m["pretrain_val_loss"] > 0
        assert 0.0 <= m["few_shot_accuracy"] <= 1.0
        for fam in m["per_family"].values():
            assert 0.0 <= fam["labeler_score"] <= 1.0 and fam["n"] > 0
    assert r["models"]["sft"]["win_rate_vs_sft"] == 0.5
    assert 0.0 < r["few_shot_chance"] < 0.2
    # PPO-ptx trains on pretraining text too, so its rollouts' metrics carry the ptx loss.
    rows = [json.loads(line) for line in (run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/ptx" in row for row in rows)


def test_report_embeds_its_plots(run):
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    md = (run / "report.md").read_text()
    assert "Win rate against SFT" in md and "Alignment tax" in md


def test_a_second_run_skips_finished_stages(run, capsys):
    main(["pipeline", "--preset", "smoke", "--out", str(run)])
    out = capsys.readouterr().out
    assert out.count("done, skipped") == 11


def test_a_run_folder_of_another_preset_is_refused(run):
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--preset", "tiny", "--out", str(run)])
    assert e.value.code == 2


def test_a_run_folder_with_other_demonstration_habits_is_refused(run, capsys):
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--preset", "smoke", "--out", str(run), "--no-demo-habits"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "seed 0 and with demonstration habits" in err and "choose another --out" in err


def test_no_demo_habits_gives_the_labelers_own_demonstrations(tmp_path):
    out = tmp_path / "plain"
    main(["pipeline", "--preset", "smoke", "--out", str(out), "--no-demo-habits", "--stages", "world"])
    records = [json.loads(line) for line in (out / "world" / "sft_train.jsonl").read_text().splitlines()]
    assert records and all(r["habit"] is None for r in records)
    assert json.loads((out / "world" / "world.json").read_text())["stats"]["demo_habits"] is None
    assert json.loads((out / "pipeline.json").read_text())["demo_habits"] is False
