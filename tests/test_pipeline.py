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


def test_every_stage_writes_the_arguments_it_ran_with(run):
    sft = json.loads((run / "sft" / "args.json").read_text())
    assert sft["init"] == str(run / "pretrain") and sft["train"]["lr"] == 1e-3 and sft["epochs"] == 1.0
    ppo = json.loads((run / "ppo_ptx" / "args.json").read_text())
    assert ppo["init"] == str(run / "sft") and ppo["reward"] == str(run / "rm") and ppo["ppo"]["ptx_coef"] == 1.0


def test_a_recipe_runs_its_stages_on_the_users_files_each_from_the_one_before(run, tmp_path, capsys):
    """`pipeline --recipe`: sft from a given checkpoint, then rm, ppo and dpo each starting from the stage
    before it (rm and dpo from sft, ppo scored by rm), on files outside any world folder's layout."""
    demos, rankings, prompts = (tmp_path / n for n in ("demos.jsonl", "rankings.jsonl", "prompts.jsonl"))
    demos.write_text((run / "world" / "sft_train.jsonl").read_text())
    rankings.write_text((run / "data" / "rankings.jsonl").read_text())
    prompts.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?"}) + "\n" for i in range(8)))
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(f"""out: {tmp_path / 'mine'}
sft: {{init: {run / 'pretrain'}, data: [{demos}], max-steps: 2, batch-size: 8}}
rm: {{data: [{rankings}], max-steps: 2, batch-size: 4}}
ppo: {{prompts: {prompts}, max-steps: 1, batch-size: 8, max-new-tokens: 6, minibatches: 1, ppo-epochs: 1}}
dpo: {{data: [{rankings}], max-steps: 2, batch-size: 4, beta: 0.2}}
""")
    main(["pipeline", "--recipe", str(recipe), "--device", "cpu"])
    mine = tmp_path / "mine"
    for stage in ("sft", "rm", "ppo", "dpo"):
        assert (mine / stage / "done.json").is_file(), stage
    args = {s: json.loads((mine / s / "args.json").read_text()) for s in ("sft", "rm", "ppo", "dpo")}
    assert args["sft"]["init"] == str(run / "pretrain") and args["sft"]["train"]["max_steps"] == 2
    assert args["rm"]["init"] == str(mine / "sft") and args["dpo"]["init"] == str(mine / "sft")
    assert args["ppo"]["init"] == str(mine / "sft") and args["ppo"]["reward"] == str(mine / "rm")
    assert args["dpo"]["beta"] == 0.2 and args["sft"]["train"]["seed"] == 0
    capsys.readouterr()
    main(["pipeline", "--recipe", str(recipe)])  # a second run keeps every finished stage
    assert capsys.readouterr().out.count("done, kept") == 4


def test_a_misspelled_key_in_a_recipe_names_the_key_the_file_and_the_stage(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(f"out: {tmp_path / 'r'}\nsft: {{init: x, data: [y.jsonl], lrr: 0.1}}\n")
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--recipe", str(recipe)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "typo.yaml [sft]" in err and "'lrr'" in err and "'lr'" in err
    recipe.write_text("sfft: {init: x}\n")
    with pytest.raises(SystemExit):
        main(["pipeline", "--recipe", str(recipe)])
    assert "unknown stage(s) sfft" in capsys.readouterr().err
