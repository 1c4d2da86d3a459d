"""Exact match and pass@k on the capability families: the evaluation's figures against plain loops with the
world's checker, Chen et al.'s pass@k estimator against enumerating every draw of k samples, the bootstrap
interval against resampling in a loop, and the sampled replies themselves."""

import itertools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_evaluate import few_cloze_items, four_model_run

from instructgpt import evaluate
from instructgpt.chat import FewShot, few_shot_prompt
from instructgpt.checkpoint import load_model
from instructgpt.data import Prompt
from instructgpt.errors import UserError
from instructgpt.evaluate import (
    bootstrap_interval,
    eval_command,
    exact_match,
    exact_match_change,
    pass_at_k,
    pass_subset,
    sampled_replies,
)
from instructgpt.model import GPT, ModelConfig
from instructgpt.recipe import call
from instructgpt.rewards import WorldChecker
from instructgpt.tokenizer import Tokenizer
from instructgpt.world.judge import wilson_interval
from instructgpt.world.world import CAPABILITY_FAMILIES, FAMILIES, World, build_world, demonstrate, make_prompts


def test_pass_at_k_is_the_share_of_draws_of_k_samples_that_hold_a_correct_one():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))  # samples 0 .. c-1 are the correct ones
                brute = sum(any(i < c for i in draw) for draw in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)  # pass@1 is the share of correct samples
    for bad in ((4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_bootstrap_interval_equals_resampling_each_group_in_a_loop():
    groups = [[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    rng = np.random.default_rng(7)
    picks = [[rng.integers(0, len(g), len(g)) for _ in range(500)] for g in groups]  # group by group, as drawn
    means = [np.mean([np.mean([g[j] for j in picks[i][b]]) for i, g in enumerate(groups)]) for b in range(500)]
    assert bootstrap_interval(groups, seed=7, resamples=500) == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    # one group of 400 Bernoulli(0.3) draws: about as wide as Wilson's interval, around the rate
    x = (np.random.default_rng(0).random(400) < 0.3).astype(float).tolist()
    lo, hi = bootstrap_interval([x])
    wlo, whi = wilson_interval(sum(x), len(x))
    assert lo < np.mean(x) < hi and abs((hi - lo) - (whi - wlo)) < 0.2 * (whi - wlo)
    assert bootstrap_interval([[1.0] * 5, [0.0] * 3]) == [0.5, 0.5]  # nothing to resample: no spread


def fake_reply(world: World, record: dict, salt: int) -> str:
    """The right answer for about half the prompts (which half depends on the salt), else a wrong one."""
    good = (sum(map(ord, record["prompt"])) + salt) % 2 == 0
    return demonstrate(world, record) if good else "no."


def test_exact_match_counts_what_the_checker_accepts_per_capability_family():
    world = build_world(seed=3)
    records = make_prompts(world, "eval", 66, seed=3)  # six of each family
    texts = [fake_reply(world, r, 0) for r in records]
    checker = WorldChecker(world)
    got = exact_match(checker, records, texts)
    assert list(got["per_family"]) == list(CAPABILITY_FAMILIES)  # fact, harmful ... have no single answer
    rates = []
    for family in CAPABILITY_FAMILIES:
        pairs = [(r, t) for r, t in zip(records, texts) if r["family"] == family]
        correct = sum(checker([{"role": "user", "content": r["prompt"]}], t, r) for r, t in pairs)
        fig = got["per_family"][family]
        assert (fig["n"], fig["correct"], fig["rate"]) == (len(pairs), correct, correct / len(pairs))
        assert fig["ci95"] == list(wilson_interval(correct, len(pairs)))
        rates.append(correct / len(pairs))
    assert got["mean"]["rate"] == pytest.approx(np.mean(rates)) and 0 < got["mean"]["rate"] < 1
    lo, hi = got["mean"]["ci95"]
    assert lo < got["mean"]["rate"] < hi
    good = exact_match(checker, records, [demonstrate(world, r) for r in records])
    assert all(f["rate"] == 1.0 for f in good["per_family"].values()) and good["mean"]["ci95"] == [1.0, 1.0]
    assert exact_match(checker, [r for r in records if r["family"] == "fact"], ["x"] * 6) is None


def test_the_change_in_exact_match_is_a_paired_bootstrap_over_the_same_prompts():
    world = build_world(seed=3)
    records = make_prompts(world, "eval", 66, seed=3)
    checker = WorldChecker(world)
    base, texts = [fake_reply(world, r, 0) for r in records], [fake_reply(world, r, 1) for r in records]
    got = exact_match_change(checker, records, texts, base, seed=5)
    assert got["diff"] == pytest.approx(exact_match(checker, records, texts)["mean"]["rate"]
                                        - exact_match(checker, records, base)["mean"]["rate"])
    # the slow twin: per family, draw prompt indices and score both models' replies to the drawn prompts
    hits = {f: [(checker.correct(f, r["meta"], t), checker.correct(f, r["meta"], b))
                for r, t, b in zip(records, texts, base) if r["family"] == f] for f in CAPABILITY_FAMILIES}
    rng = np.random.default_rng(5)
    picks = {f: rng.integers(0, len(hits[f]), (2000, len(hits[f]))) for f in CAPABILITY_FAMILIES}
    changes = [np.mean([np.mean([hits[f][j][0] for j in picks[f][b]]) - np.mean([hits[f][j][1] for j in picks[f][b]])
                        for f in CAPABILITY_FAMILIES]) for b in range(2000)]
    assert got["ci95"] == pytest.approx(list(np.percentile(changes, [2.5, 97.5])))
    # the same replies: no change and no spread; right where the base was wrong on every prompt: above zero
    assert exact_match_change(checker, records, base, base) == {"diff": 0.0, "ci95": [0.0, 0.0]}
    right = [demonstrate(world, r) for r in records]
    better = exact_match_change(checker, records, right, base)
    assert better["ci95"][0] > 0
    assert better["diff"] == pytest.approx(1 - exact_match(checker, records, base)["mean"]["rate"])
    assert exact_match_change(checker, [r for r in records if r["family"] == "fact"], ["x"] * 6, ["y"] * 6) is None


def test_the_pass_at_k_prompts_are_the_first_of_each_capability_family():
    records = [{"family": f} for f in ["fact", "sort", "sort", "count", "sort", "harmful", "count", "count"]]
    assert pass_subset(records, 2) == [1, 2, 3, 6]
    assert pass_subset(records, 0) == []


def salt_of(model) -> int:
    """A number that differs between the models of `four_model_run` (their weights do)."""
    return int(abs(float(next(model.parameters()).detach().sum())) * 1e4)


def test_the_evaluations_capability_figures_equal_plain_loops_with_the_checker(tmp_path: Path, monkeypatch):
    """Greedy replies and sampled replies stood in for by answers right about half the time (a different half for
    each model and sample): the figures in results.json are those of plain loops over the replies and of pass@k
    counted by enumerating every draw of k samples."""
    few_cloze_items(monkeypatch)
    run = four_model_run(tmp_path)
    world = World.load(run / "world")
    prompts = run / "world" / "prompts_eval.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in make_prompts(world, "eval", 33, seed=0)))

    def replies(model, tok, items, few_shot, max_new_tokens, batch_size, progress=None):
        return [(fake_reply(world, {"prompt": p.messages[-1]["content"], **p.meta}, salt_of(model)), True)
                for p in items]

    def sampled(model, tok, items, few_shot, max_new_tokens, n, seed, batch_size):
        return [[fake_reply(world, {"prompt": p.messages[-1]["content"], **p.meta}, salt_of(model) + 3 * j + seed)
                 for j in range(n)] for p in items]

    monkeypatch.setattr(evaluate, "replies", replies)
    monkeypatch.setattr(evaluate, "sampled_replies", sampled)
    results = call(eval_command, run=run, max_new_tokens=4, batch_size=8, pass_prompts=2, pass_n=5, pass_k=3,
                   seed=1, device="cpu")
    assert results == json.loads((run / "eval" / "results.json").read_text())
    records = [json.loads(line) for line in prompts.read_text().splitlines()]
    checker = WorldChecker(world)
    first_two = [i for i, r in enumerate(records) if r["family"] in CAPABILITY_FAMILIES
                 and sum(q["family"] == r["family"] for q in records[:i]) < 2]
    assert len(first_two) == 2 * len(CAPABILITY_FAMILIES)
    assert results["capability"]["pass_at_k"] | {"prompts": 12, "n": 5, "k": 3, "per_family": 2, "seed": 1} == \
        results["capability"]["pass_at_k"]
    for name, figures in results["models"].items():
        texts = [s[name] for s in results["samples"]]
        em = figures["exact_match"]
        for family in CAPABILITY_FAMILIES:
            hits = [checker.correct(r["family"], r["meta"], t) for r, t in zip(records, texts) if r["family"] == family]
            assert (em["per_family"][family]["n"], em["per_family"][family]["correct"]) == (len(hits), sum(hits))
        model = load_model(run / evaluate.STAGE_DIRS[name])
        counts = []
        for i in first_two:
            p = Prompt(messages=[{"role": "user", "content": records[i]["prompt"]}], meta=records[i])
            samples = sampled(model, None, [p], None, 4, 5, 1, 8)[0]
            counts.append(sum(checker.correct(records[i]["family"], records[i]["meta"], t) for t in samples))
        assert 0 < sum(counts) < 5 * len(counts)
        for k in (1, 3):
            draws = list(itertools.combinations(range(5), k))
            brute = np.mean([sum(any(j < c for j in d) for d in draws) / len(draws) for c in counts])
            fig = figures["pass_at_k"][f"pass@{k}"]
            assert fig["rate"] == pytest.approx(brute, abs=1e-12)
            assert fig["ci95"][0] <= fig["rate"] <= fig["ci95"][1]
    assert len({json.dumps(m["exact_match"]) for m in results["models"].values()}) > 1  # the salts differ


def test_sampled_replies_are_seeded_per_prompt_whatever_the_batch():
    world = build_world(seed=0)
    records = make_prompts(world, "rl", 3, seed=0)
    items = [Prompt(messages=[{"role": "user", "content": r["prompt"]}], meta=r) for r in records]
    tok = Tokenizer.train_char([few_shot_prompt(r["prompt"]) + demonstrate(world, r) for r in records])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=64)).eval()
    a = sampled_replies(model, tok, items, None, 6, 4, seed=5, batch_size=64)
    assert len(a) == 3 and all(len(s) == 4 for s in a)
    for batch_size in (2, 5):  # fewer slots than a prompt's samples: as many as they; slots freed and refilled
        assert sampled_replies(model, tok, items, None, 6, 4, seed=5, batch_size=batch_size) == a
    assert sampled_replies(model, tok, items, None, 6, 4, seed=6, batch_size=64) != a
    assert len({t for s in a for t in s}) > 3  # temperature 1: an untrained model's samples differ
    few = sampled_replies(model, tok, items, FewShot(), 24, 4, seed=5, batch_size=64)  # few-shot, as `chat.replies`
    assert all("\n" not in t for s in few for t in s)


def test_pass_at_k_flags_are_checked_before_anything_is_written(tmp_path: Path):
    from test_rm import build_world_run

    from instructgpt.checkpoint import write_done

    run = tmp_path / "run"
    build_world_run(run, n_prompts=4, block_size=64)
    write_done(run / "sft", {"stage": "sft"})
    for flags in (dict(pass_n=4, pass_k=5), dict(pass_n=0, pass_k=1), dict(pass_prompts=-1)):
        with pytest.raises(UserError, match="--pass-k"):
            call(eval_command, run=run, device="cpu", **flags)
    assert not (run / "eval").exists()


def test_the_capability_families_are_world_families_with_one_answer():
    assert set(CAPABILITY_FAMILIES) < set(FAMILIES)
    world = build_world(seed=0)
    rng = random.Random(0)
    for family in CAPABILITY_FAMILIES:
        for _ in range(5):
            from instructgpt.world.world import sample_prompt

            record = sample_prompt(world, family, rng)
            assert WorldChecker(world).correct(family, record["meta"], demonstrate(world, record))


def test_the_pretrained_model_is_shown_its_familys_answers_from_training_content():
    """Few-shot examples of each family come from the world's training content (no evaluation person, word or
    sum), answered as the labeler would (the checker's right answer), the same for a seed; a prompt gets its own
    family's, and one without a family the fixed examples."""
    from instructgpt.evaluate import world_few_shot
    from instructgpt.world.world import sample_prompt, seeded_rng

    world = build_world(seed=0)
    shots = world_few_shot(world)
    assert shots == world_few_shot(build_world(seed=0)) and shots != world_few_shot(build_world(seed=1))
    assert set(shots.by_family) == set(FAMILIES) and all(len(v) == 3 for v in shots.by_family.values())
    checker = WorldChecker(world)
    held = set(world.heldout_words) | set(world.heldout_people)
    for family, examples in shots.by_family.items():
        rng = seeded_rng(world.seed, "few-shot examples", family)  # the records behind the examples, drawn again
        for question, answer in examples:
            rec = sample_prompt(world, family, rng, heldout=False)
            assert rec["prompt"] == question and answer == demonstrate(world, rec)
            m = rec["meta"]
            assert not {m.get("word"), m.get("entity"), *m.get("words", [])} & held, question
            assert family != "arithmetic" or not world.is_heldout_sum(m["op"], m["a"], m["b"])
            assert family not in CAPABILITY_FAMILIES or checker.correct(family, m, answer), (question, answer)
    for r in make_prompts(world, "eval", 11, seed=0):
        text = shots.text(Prompt(messages=[{"role": "user", "content": r["prompt"]}], meta=r))
        assert text.endswith(f"Question: {r['prompt']}\nAnswer:")
        assert all(f"Question: {q}\nAnswer: {a}\n\n" in text for q, a in shots.by_family[r["family"]])
    assert shots.text(Prompt(messages=[{"role": "user", "content": "Hello?"}])) == few_shot_prompt("Hello?")
