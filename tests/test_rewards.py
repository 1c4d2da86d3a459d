"""Verifiable rewards: the world checker agrees with the labeler, GSM8K's final answers, calling and combining
reward functions, and loading them by name."""

import random
import sys

import pytest
import torch

from instructgpt.data import read_prompts, write_jsonl
from instructgpt.errors import UserError
from instructgpt.rewards import WorldChecker, combine, gsm8k, load_reward_fn, score_batch
from instructgpt.world.judge import world_record
from instructgpt.world.labeler import Labeler, response_variants, wrong_answer
from instructgpt.world.world import FAMILIES, NOT_KNOWN, REFUSAL, build_world, demonstrate, make_prompts, number_words

# ----------------------------------------------------------------------------------------------------
# The world checker against the labeler


def replies(world, rec: dict, rng: random.Random) -> list[str]:
    """The labeler's realistic mix of replies plus near misses: case, hedges, spelled-out numbers, doubles."""
    demo = demonstrate(world, rec)
    wrong = wrong_answer(world, rec, rng)
    out = [text for text, _ in response_variants(world, rec, rng).values()]
    out += [wrong, demo.lower(), demo.upper(), demo.rstrip("."), f"{demo} {demo}", f"  {demo}\n",
            f"{demo} Or maybe: {wrong}", f"{wrong} {demo}", f"{demo.rstrip('.')} or {wrong}", "", "   ", ".",
            REFUSAL, NOT_KNOWN, f"The answer is {demo}", "Sure! " + demo]
    answer = rec["meta"].get("answer")
    if isinstance(answer, int):
        out += [f"{number_words(answer)}.", f"It is {answer + 1}, no, {answer}.", f"{answer}, {answer + 1}."]
    if rec["family"] == "fact" and rec["meta"]["attribute"] == "town":  # the right town among others
        others = [t for t in world.towns if t != answer]
        out += [f"{rec['meta']['entity']} lives in {answer} or {others[0]}.", f"{answer}, {', '.join(others)}."]
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_world_checker_agrees_with_the_labeler_on_every_family(seed: int, tmp_path) -> None:
    world = build_world(seed, n_people=12, n_towns=4, n_heldout_people=3)
    recs = make_prompts(world, "rl", 6 * len(FAMILIES), seed) + make_prompts(world, "eval", 3 * len(FAMILIES), seed)
    # through the prompt file, as a stage reads it: the reward sees Prompt.meta, the labeler its world record
    write_jsonl(tmp_path / "prompts.jsonl", recs)
    prompts = read_prompts(tmp_path / "prompts.jsonl")
    labeler, check = Labeler(world, noise=0.0), WorldChecker(world)
    rng = random.Random(seed)
    verdicts: dict[str, set[bool]] = {f: set() for f in FAMILIES}
    for p in prompts:
        rec = world_record(p)
        for text in replies(world, rec, rng):
            want = labeler.score(rec, text).criteria["correct"] == 1.0
            got = check(p.messages, text, p.meta)
            assert got == float(want), f"{rec['family']} {rec['meta']}: {text!r}: checker {got}, labeler {want}"
            verdicts[rec["family"]].add(want)
        assert check(p.messages, demonstrate(world, rec), p.meta) == 1.0
    assert all(v == {True, False} for v in verdicts.values()), verdicts  # every family saw both verdicts


def test_world_checker_rejects_the_right_answer_among_others() -> None:
    world = build_world(0, n_people=8, n_towns=4, n_heldout_people=2)
    check = WorldChecker(world)
    a, b = sorted(world.towns)[:2]
    town = {"entity": "Bavo", "attribute": "town", "answer": a}
    assert check.correct("fact", town, f"Bavo lives in {a}.")
    assert not check.correct("fact", town, f"Bavo lives in {a} or {b}.")
    age = {"entity": "Bavo", "attribute": "age", "answer": 34}
    assert check.correct("fact", age, "Bavo is thirty four years old.")
    assert not check.correct("fact", age, "Bavo is 34 or 35 years old.")
    assert check.correct("arithmetic", {"answer": 42}, "17 + 25 = 42. I hope that helps.")
    assert not check.correct("arithmetic", {"answer": 42}, "The answer is 41. Or 42.")  # read in the first sentence
    assert check.correct("uppercase", {"answer": "CAT"}, "CAT.") and not check.correct("uppercase", {"answer": "CAT"},
                                                                                       "cat.")
    assert check.correct("reverse", {"answer": "tac"}, "TAC.")  # the task is the order, not the case
    assert check.correct("repeat", {"word": "cat", "n": 3}, "cat cat cat.")
    assert not check.correct("repeat", {"word": "cat", "n": 3}, "cat cat cat cat.")


def test_world_checker_names_what_is_missing() -> None:
    check = WorldChecker(build_world(0, n_people=8, n_towns=4, n_heldout_people=2))
    with pytest.raises(UserError, match="records with 'family' and 'meta'"):
        check([{"role": "user", "content": "hi"}], "hi", {"answer": "#### 3"})
    with pytest.raises(UserError, match="unknown task family 'poetry'"):
        check([], "hi", {"family": "poetry", "meta": {}})


# ----------------------------------------------------------------------------------------------------
# GSM8K


def test_gsm8k_reads_the_last_number_of_the_reply() -> None:
    rec = {"answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,234"}
    for good in ["The answer is 1,234.", "1234", "1234.0", "So 12 + 1222 = 1234.", "#### 1,234", "$1,234!"]:
        assert gsm8k([], good, rec) == 1.0, good
    for bad in ["1234 clips, sold over 2 months.", "12,34", "123", "", "no idea", "1,234.5"]:
        assert gsm8k([], bad, rec) == 0.0, bad
    neg = {"answer": "#### -5"}
    assert gsm8k([], "It drops to -5.", neg) == 1.0
    assert gsm8k([], "10-5 = 5.", neg) == 0.0  # a minus between numbers is a subtraction
    with pytest.raises(UserError, match="needs the reference"):
        gsm8k([], "3", {"question": "?"})
    with pytest.raises(UserError, match="####"):
        gsm8k([], "3", {"answer": "three"})
    with pytest.raises(UserError, match="not a number"):
        gsm8k([], "3", {"answer": "#### three"})


def test_gsm8k_gives_every_reference_full_marks_and_a_wrong_final_none(shared_data) -> None:
    prompts = read_prompts(shared_data / "gsm8k_train.jsonl")
    for p in prompts:
        worked = p.meta["answer"]
        assert gsm8k(p.messages, worked, p.meta) == 1.0, worked[-80:]
        head, _, final = worked.rpartition("####")
        assert gsm8k(p.messages, f"{head}#### {final.strip()}1", p.meta) == 0.0


# ----------------------------------------------------------------------------------------------------
# Calling over a batch


def conv(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_score_batch_returns_the_scores() -> None:
    prompts, responses, records = [conv("a"), conv("b"), conv("c")], ["x", "yy", "zzz"], [{}, {}, {}]
    values = iter([1, 0.5, True])  # an int, a float and a bool are numbers
    got = score_batch(lambda p, r, rec: next(values), prompts, responses, records, "mine")
    assert got.dtype == torch.float32 and got.tolist() == [1.0, 0.5, 1.0]
    got = score_batch(lambda p, r, rec: torch.tensor(len(r)), prompts, responses, records, "mine")
    assert got.tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="2 responses"):
        score_batch(gsm8k, prompts, responses[:2], records, "gsm8k")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "1.0", [1.0], torch.tensor([1.0, 2.0])])
def test_score_batch_stops_on_what_is_not_a_finite_number(bad) -> None:
    prompts, responses = [conv("fine"), conv("the culprit")], ["a", "b"]

    def fn(p, r, rec):
        return bad if r == "b" else 1.0

    with pytest.raises(UserError, match=r"reward function my\.mod:fn returned .* for prompt 1 \('the culprit'\)"):
        score_batch(fn, prompts, responses, [{}, {}], "my.mod:fn")


def test_score_batch_names_the_function_and_prompt_that_raised() -> None:
    def fn(p, r, rec):
        return 1 / 0 if rec.get("boom") else 0.0

    with pytest.raises(UserError, match=r"reward function f raised ZeroDivisionError on prompt 2 \('q'\)"):
        score_batch(fn, [conv("o"), conv("p"), conv("q")], ["a", "b", "c"], [{}, {}, {"boom": 1}], "f")


def test_combine_weighs_functions_and_the_reward_model() -> None:
    prompts, responses = [conv("2+2?"), conv("3+3?")], ["4.", "7."]
    records = [{"answer": "#### 4"}, {"answer": "#### 6"}]

    def length(p, r, rec):
        return float(len(r))

    def rm(ps, rs):
        return torch.tensor([0.5, -1.0])

    reward = combine([("gsm8k", gsm8k, 2.0), ("length", length, 0.1)], model=(rm, 0.5))
    parts = reward.parts(prompts, responses, records)
    assert {k: v.tolist() for k, v in parts.items()} == {"gsm8k": [1.0, 0.0], "length": [2.0, 2.0],
                                                         "model": [0.5, -1.0]}
    torch.testing.assert_close(reward(prompts, responses, records), torch.tensor([2.45, -0.3]))
    only_rm = combine([], model=(rm, 2.0))
    torch.testing.assert_close(only_rm(prompts, responses, records), torch.tensor([1.0, -2.0]))
    with pytest.raises(UserError, match="reward model"):
        combine([], model=(lambda ps, rs: torch.tensor([1.0, float("nan")]), 1.0))(prompts, responses, records)
    with pytest.raises(UserError, match="reward model"):
        combine([], model=(lambda ps, rs: torch.tensor([1.0]), 1.0))(prompts, responses, records)
    with pytest.raises(ValueError, match="differ"):
        combine([("a", gsm8k, 1.0), ("a", length, 1.0)])
    with pytest.raises(ValueError, match="at least one"):
        combine([])


# ----------------------------------------------------------------------------------------------------
# --reward-fn


def test_load_reward_fn_builtins(tmp_path) -> None:
    assert load_reward_fn("gsm8k") == ("gsm8k", gsm8k)
    world = build_world(0, n_people=8, n_towns=4, n_heldout_people=2)
    (tmp_path / "world.json").write_text(__import__("json").dumps(world.to_dict()))
    for given in (world, tmp_path, str(tmp_path)):
        name, fn = load_reward_fn("world", world=given)
        assert name == "world" and isinstance(fn, WorldChecker)
        assert fn([], "5.", {"family": "arithmetic", "meta": {"answer": 5}}) == 1.0
    with pytest.raises(UserError, match="--world"):
        load_reward_fn("world")
    with pytest.raises(UserError, match="no world.json"):
        load_reward_fn("world", world=tmp_path / "nowhere")


def test_load_reward_fn_from_a_module_or_a_file(tmp_path, monkeypatch) -> None:
    (tmp_path / "my_rewards_for_test.py").write_text(
        "def exclaim(prompt, response, record):\n    return float(response.endswith('!'))\nNOT_A_FN = 3\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_rewards_for_test", raising=False)
    name, fn = load_reward_fn("my_rewards_for_test:exclaim")  # found in the current folder
    assert name == "my_rewards_for_test:exclaim" and fn([], "yes!", {}) == 1.0
    name, fn = load_reward_fn(f"{tmp_path / 'my_rewards_for_test.py'}:exclaim")
    assert fn([], "no", {}) == 0.0
    for spec, msg in [("no_colon", "must be world, gsm8k"), (":fn", "must be"), ("mod:", "must be"),
                      ("my_rewards_for_test:nope", "cannot load"), ("missing_file.py:fn", "no file"),
                      ("no_such_module_xyz:fn", "cannot load"), ("my_rewards_for_test:NOT_A_FN", "not callable")]:
        with pytest.raises(UserError, match=msg):
            load_reward_fn(spec)
