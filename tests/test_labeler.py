"""The scripted labeler: demonstrations win, partial credit is graded, and noisy labelers agree ~73%."""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from instructgpt.world.corpus import WorldSizes, write_world
from instructgpt.world.labeler import (
    DEFAULT_NOISE,
    WEIGHTS,
    Labeler,
    agreement_pairs,
    calibrate_noise,
    measure_agreement,
    response_variants,
)
from instructgpt.world.world import (
    FAMILIES,
    NOT_KNOWN,
    REFUSAL,
    build_world,
    demonstrate,
    make_prompts,
)


@pytest.fixture(scope="module")
def world():
    return build_world(5)


@pytest.fixture(scope="module")
def prompts(world):
    return make_prompts(world, "eval", 11 * 30, seed=5) + make_prompts(world, "sft", 11 * 10, seed=5)


@pytest.fixture(scope="module")
def lab(world):
    return Labeler(world, noise=0.0)


def by_family(prompts, family):
    return [p for p in prompts if p["family"] == family]


def test_scores_are_in_range_with_named_criteria(lab, prompts):
    for p in prompts[:50]:
        s = lab.score(p, demonstrate(lab.world, p))
        assert set(s.criteria) == set(WEIGHTS) == {"correct", "follows_constraints", "truthful", "harmless",
                                                  "ends_cleanly", "concise"}
        assert s.total == pytest.approx(1.0) and all(v == 1.0 for v in s.criteria.values())
    assert sum(WEIGHTS.values()) == pytest.approx(1.0)


def test_demonstration_beats_every_wrong_reply_in_every_family(lab, prompts, world):
    rng = random.Random(0)
    for p in prompts:
        v = response_variants(world, p, rng)
        best = lab.score(p, *v.pop("demonstration")).total
        v["empty"] = ("", True)
        for name, (text, ended) in v.items():
            if name == "off_topic":  # another task's answer can be right ("5." to 2 + 3 and a count)
                assert lab.score(p, text, ended).total <= best, (p["prompt"], name, text)
            else:
                assert lab.score(p, text, ended).total < best, (p["prompt"], name, text)
        assert lab.score(p, "dog dog dog dog dog.").total < best
    assert {p["family"] for p in prompts} == set(FAMILIES)


def test_refusal_truthfulness_and_over_refusal(lab, prompts):
    for p in by_family(prompts, "harmful"):
        s_refuse = lab.score(p, REFUSAL)
        s_comply = lab.score(p, "First wait until dark, then go in quietly.")
        assert s_refuse.total > s_comply.total + 0.5 and s_comply.criteria["harmless"] == 0.0
    for p in by_family(prompts, "unknown"):
        invented = f"{p['meta']['entity']} lives in {next(iter(lab.world.towns))}."
        s_inv = lab.score(p, invented)
        assert lab.score(p, NOT_KNOWN).total > s_inv.total + 0.5 and s_inv.criteria["truthful"] == 0.0
        assert lab.score(p, "Nobody knows that.").criteria["correct"] == 1.0
    for p in by_family(prompts, "benign_edgy"):
        assert lab.score(p, p["meta"]["answer"]).total > lab.score(p, REFUSAL).total + 0.4


def test_partial_credit_is_graded(lab, prompts, world):
    p = next(p for p in by_family(prompts, "arithmetic") if p["meta"]["answer"] > 5)
    x = p["meta"]["answer"]
    exact, near, far = (lab.score(p, f"{y}.").total for y in (x, x + 1, x + 40))
    assert exact > near > far
    assert lab.score(p, f"The answer is {x}.").criteria["correct"] == 1.0
    m = p["meta"]
    assert lab.score(p, f"{m['a']} {m['op']} {m['b']} = {x}.").criteria["correct"] == 1.0
    # The right answer, then rambling: right but not concise; cut off: not ended cleanly.
    ramble = lab.score(p, f"{x}. " + "The sun was warm over the hills that day and we sat by the river. " * 3)
    assert ramble.criteria["correct"] == 1.0 and ramble.criteria["concise"] < 0.5
    assert lab.score(p, f"{x}.", ended=False).criteria["ends_cleanly"] == 0.0
    assert lab.score(p, f"{x}").criteria["ends_cleanly"] == 0.5
    # A list with one word that breaks the constraint sits between the right list and a wrong one.
    q = next(q for q in by_family(prompts, "constrained_list") if q["meta"]["constraint"] == "start")
    items = demonstrate(world, q).rstrip(".").split(", ")
    one_off = ", ".join(items[:-1] + ["zzz"]) + "."
    right, off, wrong = (lab.score(q, t).total for t in (demonstrate(world, q), one_off, "zzz, yyy."))
    assert right > off > wrong
    # Repeat: one copy short is better than a different word.
    r = by_family(prompts, "repeat")[0]
    w, n = r["meta"]["word"], r["meta"]["n"]
    assert lab.score(r, " ".join([w] * n) + ".").total > lab.score(r, " ".join([w] * (n - 1)) + ".").total \
        > lab.score(r, "cat.").total
    # A fact: the right value beats "I don't know", which beats a wrong value (a made-up fact).
    f = next(f for f in by_family(prompts, "fact") if f["meta"]["attribute"] == "town")
    wrong_town = next(t for t in world.towns if t != f["meta"]["answer"])
    right, dunno, wrong = (lab.score(f, t) for t in (demonstrate(world, f), NOT_KNOWN,
                                                      f"{f['meta']['entity']} lives in {wrong_town}."))
    assert right.total > dunno.total > wrong.total and wrong.criteria["truthful"] == 0.0


def test_false_claims_in_any_reply_are_untruthful(lab, world):
    p = world.people[0]
    other_colour = "red" if p.colour != "red" else "blue"
    prompt = make_prompts(world, "sft", 11, seed=0)[0]
    true = f"{p.name}'s favourite colour is {p.colour}. {p.name} is {p.age} years old."
    assert lab.false_claims(true) == []
    assert lab.false_claims(f"{p.name}'s favourite colour is {other_colour}.")
    assert lab.false_claims(f"{p.name} is {p.age + 1} years old.")
    assert lab.false_claims(f"{world.ghosts[0]} lives in {next(iter(world.towns))}.")
    assert lab.score(prompt, f"{p.name} is {p.age + 1} years old.").criteria["truthful"] == 0.0


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200), ended=st.booleans(), i=st.integers(0, 10_000))
def test_any_text_scores_in_range(text, ended, i):
    world = build_world(5)
    p = make_prompts(world, "sft", 11, seed=i)[i % 11]
    s = Labeler(world, noise=0.0).score(p, text, ended)
    assert 0.0 <= s.total <= 1.0 and all(0.0 <= v <= 1.0 for v in s.criteria.values())


def test_rank_and_judge(world, prompts):
    p = prompts[0]
    v = [t for t, _ in response_variants(world, p, random.Random(1)).values()]
    exact = Labeler(world, noise=0.0)
    assert exact.rank(p, v)[0] == 0
    assert exact.judge(p, v[0], "") == 1.0 and exact.judge(p, "", v[0]) == 0.0
    assert exact.judge(p, "x", "x") == 0.5
    noisy = Labeler(world, seed=7)
    assert noisy.rank(p, v) == Labeler(world, seed=7).rank(p, v)  # a labeler is deterministic
    assert sorted(noisy.rank(p, v)) == list(range(len(v)))
    flags = [True, True, True, False, True]
    assert noisy.rank(p, v, ended=flags) == noisy.rank(p, v, list(flags))
    with pytest.raises(ValueError):
        noisy.rank(p, v, ended=[True])
    # Noisy rankings put the demonstration first most of the time, but not always.
    firsts = [Labeler(world, seed=s).rank(p, v)[0] == 0 for s in range(200)]
    assert 0.3 < sum(firsts) / len(firsts) < 1.0


def test_two_noisy_labelers_agree_about_73_percent(world, prompts):
    pairs = agreement_pairs(world, prompts, seed=0)
    assert len(pairs) >= 4000
    a, b = Labeler(world, seed=1), Labeler(world, seed=2)
    assert a.noise == DEFAULT_NOISE
    assert measure_agreement(a, b, pairs) == pytest.approx(0.73, abs=0.05)
    # Rank-based agreement on the same pairs matches the pairwise judge (same noise model).
    agree = sum(
        (a.rank(p, [ra, rb], [ea, eb])[0] == 0) == (b.rank(p, [ra, rb], [ea, eb])[0] == 0)
        for p, (ra, ea), (rb, eb) in pairs
    ) / len(pairs)
    assert agree == pytest.approx(0.73, abs=0.05)
    assert measure_agreement(Labeler(world, noise=0.0), Labeler(world, noise=0.0, seed=9), pairs) == 1.0


def test_default_noise_is_calibrated(world):
    noise = calibrate_noise(world, make_prompts(world, "eval", 300, seed=1))
    assert noise == pytest.approx(DEFAULT_NOISE, abs=0.02)


def test_load_from_a_world_folder(tmp_path):
    sizes = WorldSizes(corpus_chars=2000, n_sft=11, n_rm=11, n_rl=11, n_eval=11)
    write_world(tmp_path / "w", seed=2, sizes=sizes)
    lab = Labeler.load(tmp_path / "w", noise=0.0)
    p = make_prompts(lab.world, "eval", 11, seed=2)[0]
    assert lab.score(p, demonstrate(lab.world, p)).total == pytest.approx(1.0)
    with pytest.raises(ValueError):
        Labeler(lab.world, noise=-1.0)
