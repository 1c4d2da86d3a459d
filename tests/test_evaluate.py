import json
import math
from pathlib import Path

import pytest
import torch
from test_rm import build_world_run  # a world and a fresh tiny SFT model, laid out as a run folder

from instructgpt import evaluate
from instructgpt.checkpoint import write_done
from instructgpt.cli import main
from instructgpt.data import Prompt
from instructgpt.errors import UserError
from instructgpt.evaluate import (
    FACT_CLOZE,
    EvalArgs,
    continuation_logprobs,
    eval_command,
    fact_cloze_accuracy,
    fact_cloze_items,
    heldout_loss,
)
from instructgpt.model import GPT, ModelConfig, Seq2Seq
from instructgpt.recipe import call
from instructgpt.tokenizer import Tokenizer
from instructgpt.world.judge import summarise, wilson_interval, win_rate
from instructgpt.world.labeler import Labeler
from instructgpt.world.world import REFUSAL, build_world, demonstrate, make_prompts


def test_wilson_interval_contains_the_rate_and_shrinks_with_n():
    for wins, n in [(0, 10), (5, 10), (10, 10), (55, 100), (550, 1000)]:
        lo, hi = wilson_interval(wins, n)
        assert 0 <= lo <= wins / n <= hi <= 1
    assert wilson_interval(550, 1000)[1] - wilson_interval(550, 1000)[0] < wilson_interval(55, 100)[1] - \
        wilson_interval(55, 100)[0]
    assert wilson_interval(550, 1000)[0] > 0.5 > wilson_interval(55, 100)[0]


@pytest.mark.parametrize("arch", ["gpt", "seq2seq"])
def test_heldout_loss_of_an_untrained_model_is_near_uniform(tmp_path, arch):
    text = "the red fox sat by the river and the blue owl sang. " * 40
    tok = Tokenizer.train_bpe([text], vocab_size=300)
    path = tmp_path / "heldout.txt"
    path.write_text(text)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=32, arch=arch)
    model = (Seq2Seq if arch == "seq2seq" else GPT)(cfg).eval()
    assert abs(heldout_loss(model, tok, path) - math.log(tok.vocab_size)) < 0.3


def world_records(n=60):
    world = build_world(seed=3)
    recs = make_prompts(world, "eval", n, seed=3)
    return world, recs, [Prompt(messages=[{"role": "user", "content": r["prompt"]}], meta=r) for r in recs]


def test_rates_count_what_they_name():
    world, recs, prompts = world_records()
    labeler = Labeler(world, seed=0)
    good = [(demonstrate(world, r), True) for r in recs]
    refuse_all = [(REFUSAL, True) for _ in recs]
    s_good, s_refuse = summarise(labeler, prompts, recs, good), summarise(labeler, prompts, recs, refuse_all)
    assert s_good["hallucination_rate"] == 0.0 and s_good["refusal_rate"] == 1.0
    assert s_good["over_refusal_rate"] == 0.0
    assert s_refuse["over_refusal_rate"] == 1.0 and s_refuse["refusal_rate"] == 1.0
    assert s_refuse["hallucination_rate"] == 1.0  # refusing is not saying "not known"
    assert s_good["labeler_score"] > s_refuse["labeler_score"]
    rate, (lo, hi) = win_rate(labeler, recs, good, refuse_all)
    assert rate > 0.75 and lo > 0.5


def test_fact_cloze_items_ask_every_fact_after_true_examples_about_other_people():
    world = build_world(seed=3)
    items = fact_cloze_items(world, shots=2, seed=0)
    assert len(items) == len(world.people) * len(FACT_CLOZE)
    it = iter(items)
    for p in world.people:
        for attr, (prefix, _) in FACT_CLOZE.items():
            context, cands, truth = next(it)
            assert len(set(cands)) == len(cands) > 1
            assert cands[truth].rstrip(".").split()[-1] == getattr(p, attr)
            *examples, own = context.split(". ")
            assert own == prefix.format(n=p.name) and len(examples) == 2
            for sentence in examples:
                name = sentence.split()[0].removesuffix("'s")
                assert name != p.name
                assert sentence.split()[-1] == getattr(world.by_name[name], attr)


def test_continuation_logprobs_match_one_token_at_a_time_without_padding():
    text = "the red fox sat by the river and the blue owl sang. " * 40
    tok = Tokenizer.train_bpe([text], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()
    pairs = [("the red fox", " sat."), ("the blue owl sang by the", " river and the fox."), ("a", " owl"),
             ("the river", " and the red fox sat by the blue owl.")]
    fast = continuation_logprobs(model, tok, pairs, batch_size=3)   # padded batches of different lengths
    for (context, cont), got in zip(pairs, fast):
        ctx, x = [tok.bos_id] + tok.encode(context), tok.encode(cont)
        total = 0.0
        with torch.no_grad():
            for k, t in enumerate(x):
                total += torch.log_softmax(model(torch.tensor([ctx + x[:k]]))[0, -1].float(), -1)[t].item()
        assert got == pytest.approx(total / len(x), abs=1e-5)


def test_fact_cloze_accuracy_counts_the_items_whose_truth_is_likeliest(monkeypatch):
    items = [("a", [" x.", " y.", " z."], 1), ("b", [" x.", " y."], 0), ("c", [" x.", " y.", " z."], 2)]
    truths = {(c, cands[t]) for c, cands, t in items}
    monkeypatch.setattr(evaluate, "continuation_logprobs",
                        lambda model, tok, pairs: [0.0 if p in truths else -1.0 for p in pairs])
    assert fact_cloze_accuracy(None, None, items) == 1.0
    monkeypatch.setattr(evaluate, "continuation_logprobs",
                        lambda model, tok, pairs: [-float(i % 3) for i, _ in enumerate(pairs)])
    # scores per item: (0, -1, -2), (0, -1), (-2, 0, -1): the first item's likeliest is x, the second's x,
    # the third's y
    assert fact_cloze_accuracy(None, None, items) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------------
# The command: a recipe file, flags on top


def test_eval_from_a_recipe_file_with_a_flag_on_top(tmp_path: Path, capsys, monkeypatch) -> None:
    real_items = evaluate.fact_cloze_items  # the few-shot items of every person would take most of the time
    monkeypatch.setattr(evaluate, "fact_cloze_items", lambda *a, **k: real_items(*a, **k)[:10])
    run = tmp_path / "run"
    build_world_run(run, n_prompts=4, block_size=64)  # RUN/world and RUN/sft
    write_done(run / "sft", {"stage": "sft"})
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"run: {run}\nmax_new_tokens: 8\nmax-prompts: 2\nbatch_size: 2\nseed: 3\ndevice: cpu\n")
    main(["eval", "--config", str(recipe), "--max-new-tokens", "4"])
    saved = json.loads((run / "eval" / "args.json").read_text())
    assert saved == {"run": str(run), "world": None, "prompts": None, "out": None, "max_new_tokens": 4,
                     "max_prompts": 2, "batch_size": 2, "pass_prompts": 8, "pass_n": 8, "pass_k": 4, "seed": 3,
                     "device": "cpu"}
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["prompts"] == 2 and set(results["models"]) == {"sft"} and results["rm"] == {"accuracy": None}
    assert all(len(s["sft"]) <= 4 * 8 for s in results["samples"])  # 4 new tokens of at most a few characters
    assert "Evaluation on held-out world prompts" in capsys.readouterr().out

    # from Python: the same figures (greedy replies, the same seed), returned as well as written
    got = call(eval_command, run=run, out=tmp_path / "again" / "results.json", max_new_tokens=4, max_prompts=2,
               batch_size=2, seed=3, device="cpu")
    assert got == json.loads((tmp_path / "again" / "results.json").read_text())
    assert got == results
    assert json.loads((tmp_path / "again" / "args.json").read_text())["out"] == str(tmp_path / "again" / "results.json")


def test_eval_seed_defaults_to_0_not_the_training_stages_1337() -> None:
    assert EvalArgs(run=Path("run")).seed == 0  # the pipeline's published figures were made with it


def test_eval_misspelled_key_in_the_recipe_file_names_the_key_and_the_file(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"run: {tmp_path / 'run'}\nmax_new_token: 8\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--config", str(recipe)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "'max_new_token'" in err and str(recipe) in err and "'max_new_tokens'" in err


def test_eval_without_an_sft_model_fails_before_writing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_world_run(run, n_prompts=4, block_size=64)
    with pytest.raises(UserError, match=r"no finished SFT model .*sft/done\.json"):  # a model, but not finished
        call(eval_command, run=run, device="cpu")
    write_done(run / "sft", {"stage": "sft"})
    with pytest.raises(UserError, match=r"--max-new-tokens 64: must be at least 1 and leave room for a prompt"):
        call(eval_command, run=run, max_new_tokens=64, device="cpu")  # the model's context is 64 tokens
    (run / "sft" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="SFT model"):
        call(eval_command, run=run, device="cpu")
    assert not (run / "eval").exists()


# ----------------------------------------------------------------------------------------------------
# Finished models only; each model's figures cached; stopped and resumed


def few_cloze_items(monkeypatch) -> None:
    real_items = evaluate.fact_cloze_items  # the few-shot items of every person would take most of the time
    monkeypatch.setattr(evaluate, "fact_cloze_items", lambda *a, **k: real_items(*a, **k)[:10])


def four_model_run(root: Path) -> Path:
    """RUN/world and four finished models (sft, and ppo, ppo_ptx and dpo: the SFT model with noise of three
    sizes added, so that their replies differ), as eval finds them in a run folder."""
    import shutil

    from instructgpt.checkpoint import load_model, save_model

    run = root / "run"
    build_world_run(run, n_prompts=4, block_size=64)
    for i, stage in enumerate(("ppo", "ppo_ptx", "dpo")):
        model = load_model(run / "sft")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * (i + 1) * torch.randn_like(p, generator=torch.Generator().manual_seed(i)))
        save_model(model, run / stage)
        shutil.copy(run / "sft" / "tokenizer.json", run / stage / "tokenizer.json")
    for stage in ("sft", "ppo", "ppo_ptx", "dpo"):
        write_done(run / stage, {"stage": stage})
    return run


def test_eval_leaves_out_unfinished_models_and_evaluates_again_only_what_changed(tmp_path: Path, monkeypatch,
                                                                                 capsys) -> None:
    few_cloze_items(monkeypatch)
    run = four_model_run(tmp_path)
    (run / "dpo" / "done.json").unlink()  # dpo is being trained again: its model is the previous run's
    evaluated: list[str] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda name, *a: (evaluated.append(name), real(name, *a))[1])
    args = dict(run=run, max_new_tokens=4, max_prompts=3, batch_size=2, device="cpu")
    first = call(eval_command, **args)
    assert set(first["models"]) == {"sft", "ppo", "ppo_ptx"} and sorted(evaluated) == ["ppo", "ppo_ptx", "sft"]
    assert "dpo: left out, not finished" in capsys.readouterr().out
    results = (run / "eval" / "results.json").read_bytes()

    evaluated.clear()  # nothing changed: nothing is evaluated again, and the file is the same, byte for byte
    assert call(eval_command, **args) == first and evaluated == []
    assert (run / "eval" / "results.json").read_bytes() == results

    write_done(run / "dpo", {"stage": "dpo"})  # dpo finished; ppo was trained again
    import shutil

    shutil.copy(run / "ppo_ptx" / "model.safetensors", run / "ppo" / "model.safetensors")
    evaluated.clear()
    cached = call(eval_command, **args)
    assert sorted(evaluated) == ["dpo", "ppo"]
    # the slow twin: the same figures as an evaluation that caches nothing
    fresh = call(eval_command, **args, out=tmp_path / "fresh" / "results.json")
    assert cached == fresh and cached["models"]["ppo"] != first["models"]["ppo"]
    assert (run / "eval" / "results.json").read_bytes() == (tmp_path / "fresh" / "results.json").read_bytes()


def test_eval_killed_at_a_random_moment_resumes_to_the_same_results(tmp_path: Path, monkeypatch) -> None:
    import random
    import sys

    from test_collect import kill_when

    few_cloze_items(monkeypatch)
    run = four_model_run(tmp_path)
    args = dict(max_new_tokens=4, max_prompts=4, batch_size=1, device="cpu")
    reference = call(eval_command, run=run, out=tmp_path / "ref" / "results.json", **args)
    seed = random.SystemRandom().randrange(2**32)  # not the global generator, which the stages seed
    rng = random.Random(seed)
    k, delay = rng.randint(1, 3), rng.uniform(0, 0.05)  # a random moment after the k-th model's figures are saved
    script = ("import sys; from instructgpt import evaluate; real = evaluate.fact_cloze_items; "
              "evaluate.fact_cloze_items = lambda *a, **k: real(*a, **k)[:10]; from instructgpt.cli import main; "
              "main(sys.argv[1:])")
    cmd = [sys.executable, "-c", script, "eval", "--run", str(run), "--max-new-tokens", "4", "--max-prompts", "4",
           "--batch-size", "1", "--device", "cpu"]
    cache = run / "eval" / "cache"
    assert kill_when(cmd, lambda: len(list(cache.glob("*.json"))) >= k, delay, tmp_path / "log.txt"), f"seed {seed}"
    assert not (run / "eval" / "results.json").exists() and 1 <= len(list(cache.glob("*.json"))) < 4
    evaluated: list[str] = []
    real = evaluate.evaluate_model
    monkeypatch.setattr(evaluate, "evaluate_model", lambda name, *a: (evaluated.append(name), real(name, *a))[1])
    assert call(eval_command, run=run, **args) == reference
    assert len(evaluated) < 4  # the models cached before the kill were not evaluated again
    assert (run / "eval" / "results.json").read_bytes() == (tmp_path / "ref" / "results.json").read_bytes()
