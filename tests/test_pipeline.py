"""The main job end to end at smoke size: every stage runs, every file of the run layout exists, and
results.json has the documented schema. A second invocation skips every finished stage; a finished stage whose
inputs or settings changed runs again, and what read it; a pipeline killed at a random moment, run again, ends
with the files of an uninterrupted run."""

import copy
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from test_collect import kill_when

from instructgpt import evaluate, pipeline
from instructgpt.checkpoint import DONE
from instructgpt.cli import main
from instructgpt.world.world import CAPABILITY_FAMILIES

MODEL_KEYS = {"win_rate_vs_sft", "win_rate_ci95", "labeler_score", "pretrain_val_loss", "hallucination_rate",
              "refusal_rate", "over_refusal_rate", "constraint_rate", "per_family", "few_shot_accuracy", "exact_match",
              "pass_at_k"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    main(["pipeline", "--preset", "smoke", "--out", str(out)])
    return out


def test_every_file_of_the_run_layout_exists(run):
    expected = ["pipeline.json", "tokenizer/tokenizer.json", "data/meta.json", "collect/rankings.jsonl",
                "eval/results.json", "report.html", "report.md", "plots/win_rate.png", "plots/losses.png",
                "plots/ppo.png", "plots/families.png", "plots/grpo.png", "world/corpus.txt", "world/prompts_eval.jsonl",
                "grpo/prompts.jsonl"]
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_ptx", "dpo", "grpo"):
        expected += [f"{stage}/{f}" for f in ("model.safetensors", "config.json", "tokenizer.json",
                                              "metrics.jsonl", "done.json")]
    missing = [f for f in expected if not (run / f).is_file()]
    assert not missing
    assert not (run / "collect" / "rankings.jsonl.chunks").exists()  # the collection's chunks, once published


def test_results_schema(run):
    r = json.loads((run / "eval" / "results.json").read_text())
    manifest = json.loads((run / "pipeline.json").read_text())  # the run's own record; results.json is eval's
    assert manifest["preset"] == "smoke" and manifest["seed"] == 0
    assert set(r["models"]) == {"pretrained", "sft", "ppo", "ppo_ptx", "dpo", "grpo"}
    assert 0.0 <= r["rm"]["accuracy"] <= 1.0
    assert set(manifest["stage_seconds"]) == set(manifest["inputs"]) == set(pipeline.STAGES)
    assert manifest["inputs"]["rm"].keys() == {"sft", "collect", "world", "settings"}
    assert manifest["inputs"]["rm"]["settings"] == {"rm": pipeline.PRESETS["smoke"]["rm"]}
    assert manifest["inputs"]["grpo"].keys() == {"sft", "world", "settings"}
    for name, m in r["models"].items():
        assert MODEL_KEYS <= set(m), name
        lo, hi = m["win_rate_ci95"]
        assert 0.0 <= lo <= m["win_rate_vs_sft"] <= hi <= 1.0
        assert m["pretrain_val_loss"] > 0
        assert 0.0 <= m["few_shot_accuracy"] <= 1.0
        for fam in m["per_family"].values():
            assert 0.0 <= fam["labeler_score"] <= 1.0 and fam["n"] > 0
    assert r["models"]["sft"]["win_rate_vs_sft"] == 0.5
    assert r["capability"]["families"] == list(CAPABILITY_FAMILIES)
    smoke = pipeline.PRESETS["smoke"]["eval"]
    assert [r["capability"]["pass_at_k"][k] for k in ("per_family", "n", "k")] == [
        smoke["pass_prompts"], smoke["pass_n"], smoke["pass_k"]] == [2, 4, 2]
    for name, m in r["models"].items():
        em = m["exact_match"]
        assert list(em["per_family"]) == list(CAPABILITY_FAMILIES), name
        for fig in [*em["per_family"].values(), em["mean"], m["pass_at_k"]["pass@1"], m["pass_at_k"]["pass@2"]]:
            lo, hi = fig["ci95"]
            assert 0.0 <= lo <= fig["rate"] <= hi <= 1.0
        assert m["pass_at_k"]["pass@1"]["rate"] <= m["pass_at_k"]["pass@2"]["rate"]
        assert m["pass_at_k"]["prompts"] == 2 * len(CAPABILITY_FAMILIES) and m["pass_at_k"]["samples"] == 4
    assert 0.0 < r["few_shot_chance"] < 0.2
    # PPO-ptx trains on pretraining text too, so its rollouts' metrics carry the ptx loss.
    rows = [json.loads(line) for line in (run / "ppo_ptx" / "metrics.jsonl").read_text().splitlines()]
    assert all("loss/ptx" in row for row in rows)


def test_report_embeds_its_plots(run):
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5
    md = (run / "report.md").read_text()
    assert "Win rate against SFT" in md and "Alignment tax" in md
    exact = md[md.index("## Capability families: exact match"):md.index("## Capability families: pass@k")]
    assert "| model | arithmetic (n=" in exact and "| mean |" in exact
    assert [line.split(" | ")[0] for line in exact.splitlines() if line.startswith("| ") and "[" in line] == [
        "| pretrained (few-shot)", "| SFT", "| PPO", "| PPO-ptx", "| DPO", "| GRPO"]
    assert "| model | pass@1 | pass@2 |" in md and "![grpo](plots/grpo.png)" in md
    assert "<td>GRPO</td>" in html and "| grpo |" in md  # the GRPO model, and its stage in the time table


def test_grpo_trains_the_sft_model_on_the_capability_prompts_of_the_rl_split_with_the_worlds_checker(run):
    args = json.loads((run / "grpo" / "args.json").read_text())
    assert args["init"] == str(run / "sft") and args["reward"] is None and args["reward_fn"] == ["world"]
    assert args["world"] == str(run / "world") and args["prompts"] == str(run / "grpo" / "prompts.jsonl")
    assert args["ppo"]["estimator"] == "grpo" and args["ppo"]["group_size"] == 4 and args["ppo"]["kl_mode"] == "loss"
    lines = (run / "grpo" / "prompts.jsonl").read_text().splitlines()
    rl = (run / "world" / "prompts_rl.jsonl").read_text().splitlines()
    assert lines == [line for line in rl if json.loads(line)["family"] in CAPABILITY_FAMILIES]
    assert {json.loads(line)["family"] for line in lines} == set(CAPABILITY_FAMILIES)
    held_out = {json.loads(line)["prompt"] for line in (run / "world" / "prompts_eval.jsonl").read_text().splitlines()}
    assert not held_out & {json.loads(line)["prompt"] for line in lines}
    rows = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    curves = {"reward", "kl", "completion_length", "rewards/world", "frac_reward_zero_std"}
    assert all(curves <= set(row) for row in rows)


def test_a_second_run_skips_finished_stages_and_rewrites_nothing(run, capsys):
    before = {f: f.read_bytes() for f in (run / "eval" / "results.json", run / "pipeline.json", run / "report.html")}
    main(["pipeline", "--preset", "smoke", "--out", str(run)])
    out = capsys.readouterr().out
    assert out.count("done, skipped") == len(pipeline.STAGES)
    assert {f: f.read_bytes() for f in before} == before  # eval's results.json is eval's alone


def test_a_torn_manifest_is_an_error_naming_it(tmp_path, capsys):
    (tmp_path / "pipeline.json").write_text('{\n  "preset": "smo')
    with pytest.raises(SystemExit) as e:
        main(["pipeline", "--preset", "smoke", "--out", str(tmp_path)])
    assert e.value.code == 2 and f"{tmp_path / 'pipeline.json'}:2: not valid JSON" in capsys.readouterr().err


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
    rankings.write_text((run / "collect" / "rankings.jsonl").read_text())
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


# ----------------------------------------------------------------------------------------------------
# Stale stages: the stage runner on a run folder of stand-in stages


def fake_stage(run: Path, name: str, calls: list[str], content: str = "1"):
    """A stand-in for a stage: records that it ran, and writes its result files, or its marker (the folder of a
    model stage must be gone when a stale model stage runs again, else its --resume would keep the old one)."""

    def fn():
        calls.append(name)
        if name in pipeline.MODEL_STAGES:
            assert not (run / name / DONE).exists(), f"{name} ran again over its finished folder"
        for path in [marker(run, name)] + [run / rel for rel in pipeline.RESULT_FILES.get(name, ()) if rel != "world"]:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{name} {content}")

    return fn


def marker(run: Path, name: str) -> Path:
    return run / "report.html" if name == "report" else run / "world" / DONE if name == "world" else \
        run / pipeline.RESULT_FILES[name][0]


def run_stages(run: Path, manifest: dict, calls: list[str], only=None, contents: dict | None = None,
               preset: dict | None = None,
               names=("world", "prepare", "pretrain", "sft", "collect", "rm", "dpo")) -> None:
    stage = pipeline.stage_runner(run, manifest, only, preset)
    for name in names:
        stage(name, marker(run, name), fake_stage(run, name, calls, (contents or {}).get(name, "1")))


def test_a_finished_stage_whose_inputs_changed_runs_again_and_only_it(tmp_path, capsys):
    run, calls = tmp_path, []
    manifest = {"stage_seconds": {}, "inputs": {}}
    run_stages(run, manifest, calls)
    assert calls == ["world", "prepare", "pretrain", "sft", "collect", "rm", "dpo"]
    calls.clear()
    run_stages(run, manifest, calls)
    assert calls == []  # nothing changed: everything skipped
    run_stages(run, manifest, calls, only=["collect"], contents={"collect": "other rankings"})
    assert calls == ["collect"]
    calls.clear()
    run_stages(run, manifest, calls)
    assert calls == ["rm", "dpo"]  # what read the rankings, nothing before
    assert "rm: its inputs changed since it ran (collect): running it again" in capsys.readouterr().out
    assert pipeline.read_json_file(run / "pipeline.json") == manifest  # the record on disk, written atomically
    calls.clear()
    run_stages(run, manifest, calls, only=["collect"], contents={"collect": "other rankings"})  # the same again
    run_stages(run, manifest, calls)
    assert calls == ["collect"]  # the same output: nothing after it is stale


def test_stages_finished_before_inputs_were_recorded_are_kept_and_a_stopped_stage_resumes_only_on_its_inputs(
        tmp_path):
    run, calls = tmp_path, []
    manifest = {"stage_seconds": {}, "inputs": {}}
    run_stages(run, manifest, calls)
    legacy = {"stage_seconds": {}, "inputs": {}}  # a run folder of an earlier version: no inputs recorded
    calls.clear()
    run_stages(run, legacy, calls)
    assert calls == [] and legacy["inputs"] == manifest["inputs"]
    # rm stopped mid-way (no done.json, a checkpoint left): run again on the same inputs, it resumes (its folder kept)
    (run / "rm" / DONE).unlink()
    (run / "rm" / "checkpoints").mkdir()
    run_stages(run, manifest, calls)
    assert calls == ["rm"] and (run / "rm" / "checkpoints").is_dir()
    # ... but on other inputs it starts over: its folder is removed first
    (run / "rm" / DONE).unlink()
    (run / "collect" / "rankings.jsonl").write_text("collected again, differently")
    calls.clear()
    run_stages(run, manifest, calls)
    assert calls == ["rm", "dpo"] and not (run / "rm" / "checkpoints").exists()


GRPO_CHAIN = ("world", "prepare", "pretrain", "sft", "grpo", "eval", "report")


def test_a_finished_stage_whose_settings_changed_runs_again_and_so_does_what_read_it(tmp_path, capsys):
    run, calls = tmp_path, []
    preset = copy.deepcopy(pipeline.PRESETS["smoke"])
    manifest = {"stage_seconds": {}, "inputs": {}}
    run_stages(run, manifest, calls, preset=preset, names=GRPO_CHAIN)
    assert calls == list(GRPO_CHAIN) and manifest["inputs"]["grpo"]["settings"] == {"grpo": preset["grpo"]}
    calls.clear()
    run_stages(run, manifest, calls, preset=preset, names=GRPO_CHAIN)
    assert calls == []
    preset["grpo"]["max_steps"] += 1  # GRPO trains longer: another model
    run_stages(run, manifest, calls, preset=preset, names=GRPO_CHAIN, contents={"grpo": "4 steps"})
    assert calls == ["grpo", "eval", "report"]
    assert "grpo: its inputs changed since it ran (settings): running it again" in capsys.readouterr().out
    calls.clear()
    preset["eval"]["pass_n"] += 1  # an evaluation setting: the evaluation and the report, not GRPO
    run_stages(run, manifest, calls, preset=preset, names=GRPO_CHAIN, contents={"grpo": "4 steps", "eval": "n=5"})
    assert calls == ["eval", "report"]
    calls.clear()
    run_stages(run, manifest, calls, names=GRPO_CHAIN, contents={"grpo": "4 steps", "eval": "n=5"})
    assert calls == []  # without a preset, settings are not compared


def test_stages_recorded_before_settings_were_are_kept_and_their_settings_recorded(tmp_path):
    run, calls = tmp_path, []
    preset = copy.deepcopy(pipeline.PRESETS["smoke"])
    manifest = {"stage_seconds": {}, "inputs": {}}
    run_stages(run, manifest, calls, names=GRPO_CHAIN)  # a manifest of an earlier version: inputs, no settings
    assert all("settings" not in inputs for inputs in manifest["inputs"].values())
    calls.clear()
    run_stages(run, manifest, calls, preset=preset, names=GRPO_CHAIN)
    assert calls == [] and all(manifest["inputs"][name]["settings"] == {k: preset[k] for k in pipeline.SETTINGS[name]}
                               for name in GRPO_CHAIN)
    assert pipeline.read_json_file(run / "pipeline.json") == manifest


def test_a_changed_grpo_setting_trains_grpo_again_and_evaluates_only_it_again(run, tmp_path, monkeypatch, capsys):
    """The real stages: GRPO with one step fewer runs again from the SFT model; the evaluation runs again but
    takes every other model's figures from its cache; the report is written again; nothing else runs."""
    copy_run = tmp_path / "copy"
    shutil.copytree(run, copy_run)
    monkeypatch.setitem(pipeline.PRESETS["smoke"], "grpo", pipeline.PRESETS["smoke"]["grpo"] | {"max_steps": 2})
    evaluated: list[str] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda name, *a: (evaluated.append(name), real(name, *a))[1])
    capsys.readouterr()
    main(["pipeline", "--preset", "smoke", "--out", str(copy_run)])
    out = capsys.readouterr().out
    assert out.count("done, skipped") == len(pipeline.STAGES) - 3
    assert "grpo: its inputs changed since it ran (settings)" in out and "eval: its inputs changed" in out
    rows = [json.loads(line) for line in (copy_run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2] and evaluated == ["grpo"]
    before, after = (json.loads((r / "eval" / "results.json").read_text()) for r in (run, copy_run))
    assert {m: after["models"][m] for m in after["models"] if m != "grpo"} == {
        m: before["models"][m] for m in before["models"] if m != "grpo"}
    assert after["models"]["grpo"] != before["models"]["grpo"]


# ----------------------------------------------------------------------------------------------------
# Killed and run again


def same_files(a: Path, b: Path) -> list[str]:
    """The result files (weights, rankings, results, shards, tokenizers, world) that differ between two run folders
    (data/meta.json names the run's own paths)."""
    names = sorted({str(f.relative_to(a)) for f in a.rglob("*") if f.is_file()} |
                   {str(f.relative_to(b)) for f in b.rglob("*") if f.is_file()})
    kept = [n for n in names if "checkpoints" not in Path(n).parts and (n.startswith("world/") or n.endswith((
        ".safetensors", ".bin", "rankings.jsonl", "results.json", "tokenizer.json")))]
    return [n for n in kept if not ((a / n).is_file() and (b / n).is_file() and (a / n).read_bytes() ==
                                    (b / n).read_bytes())]


def test_a_pipeline_killed_at_a_random_moment_ends_with_the_files_of_an_uninterrupted_run(run, tmp_path, capsys):
    """SIGKILL once, at a random moment of a random stage (after the pipeline has recorded that the stage
    started, within the first half of the time the stage took in the uninterrupted run), then run again: every
    stage resumes or starts over as its files allow, and the result files are those of the uninterrupted run,
    byte for byte."""
    seed = random.SystemRandom().randrange(2**32)  # not the global generator, which the stages seed
    rng = random.Random(seed)
    stage = rng.choice(pipeline.STAGES[:-1])
    delay = rng.uniform(0, json.loads((run / "pipeline.json").read_text())["stage_seconds"][stage] / 2)
    out = tmp_path / "killed"

    def started() -> bool:
        try:
            return stage in json.loads((out / "pipeline.json").read_text())["inputs"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return False

    cmd = [sys.executable, "-m", "instructgpt.cli", "pipeline", "--preset", "smoke", "--out", str(out)]
    killed = kill_when(cmd, started, delay, tmp_path / "log.txt")
    assert killed, f"the pipeline finished within {delay:.2f} s of starting {stage} (seed {seed})"
    main(["pipeline", "--preset", "smoke", "--out", str(out)])
    assert same_files(run, out) == [], f"killed {delay:.2f} s into {stage} (seed {seed})"
    assert all((out / stage / "model.safetensors").is_file() for stage in pipeline.MODEL_STAGES)
    shutil.rmtree(out)


def test_leftovers_of_a_killed_attempt_are_removed_and_nothing_else(tmp_path):
    """`world` and `prepare` build under a temporary name: a SIGKILL leaves that folder, which the next attempt
    removes with the stage's own folder, and only those."""
    for name in ["data", "data.tmp-r7a_e6r1", ".world.x1y2", "world", "database", "data2", "world.json"]:
        (tmp_path / name).mkdir() if "." not in name or "tmp" in name or name.startswith(".") else (
            (tmp_path / name).write_text("{}"))
        if (tmp_path / name).is_dir():
            (tmp_path / name / "tokenizer.json").write_text("{}")
    pipeline.remove_leftovers(tmp_path / "data")
    pipeline.remove_leftovers(tmp_path / "world")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data2", "database", "world.json"]
