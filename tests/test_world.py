"""The instruction world: determinism, file formats, held-out splits and the `world` command."""

import json
import random
import re
from pathlib import Path

import pytest

from instructgpt.cli import main
from instructgpt.errors import UserError
from instructgpt.world.corpus import WorldSizes, write_world
from instructgpt.world.labeler import Labeler, numbers
from instructgpt.world.world import (
    ATTRIBUTES,
    DEMO_HABITS,
    FAMILIES,
    HELD_OUT_FAMILIES,
    World,
    build_world,
    demonstrate,
    make_prompts,
    number_words,
    write_demonstration,
)

SMALL = WorldSizes(corpus_chars=30_000, n_sft=330, n_rm=110, n_rl=110, n_eval=220)
FILES = ["corpus.txt", "corpus_heldout.txt", "sft_train.jsonl", "prompts_rm.jsonl", "prompts_rl.jsonl",
         "prompts_eval.jsonl", "world.json"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "world"
    write_world(out, seed=3, sizes=SMALL)
    return out


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_same_seed_same_bytes_and_other_seed_differs(world_dir, tmp_path):
    write_world(tmp_path / "again", seed=3, sizes=SMALL)
    write_world(tmp_path / "other", seed=4, sizes=SMALL)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (world_dir / name).read_bytes(), name
        assert (tmp_path / "other" / name).read_bytes() != (world_dir / name).read_bytes(), name


def test_files_parse_and_have_the_documented_fields(world_dir):
    assert sorted(p.name for p in world_dir.iterdir()) == sorted(FILES)  # no temporary files left
    sft = _jsonl(world_dir / "sft_train.jsonl")
    assert len(sft) == SMALL.n_sft
    for r in sft:
        assert set(r) == {"prompt", "completion", "messages", "family", "meta", "id", "habit"}
        assert r["messages"] == [{"role": "user", "content": r["prompt"]},
                                 {"role": "assistant", "content": r["completion"]}]
    for name, n in [("prompts_rm.jsonl", SMALL.n_rm), ("prompts_rl.jsonl", SMALL.n_rl),
                    ("prompts_eval.jsonl", SMALL.n_eval)]:
        recs = _jsonl(world_dir / name)
        assert len(recs) == n
        assert all(set(r) == {"prompt", "family", "meta", "id"} for r in recs)
        assert {r["family"] for r in recs} == set(FAMILIES)
        assert len({r["id"] for r in recs}) == n
    world = World.load(world_dir)
    assert len(world.people) >= 40 and world.seed == 3
    assert World.from_dict(json.loads(json.dumps(world.to_dict()))).to_dict() == world.to_dict()


def test_prompts_and_replies_are_short(world_dir):
    for r in _jsonl(world_dir / "sft_train.jsonl"):
        assert 4 <= len(r["prompt"].split()) <= 25, r["prompt"]
        assert 1 <= len(r["completion"].split()) <= 30, r["completion"]
        assert r["completion"][-1] in ".!?"


def _content(r: dict) -> set:
    """What a prompt is about, for the families whose evaluation content is held out."""
    m, fam = r["meta"], r["family"]
    if fam == "arithmetic":
        return {(m["op"], m["a"], m["b"])}
    if fam in ("fact", "unknown"):
        return {m["entity"]}
    if "word" in m:
        return {m["word"]}
    return set(m["words"])


def test_eval_prompts_use_only_held_out_content(world_dir):
    train = {}
    for name in ["sft_train.jsonl", "prompts_rm.jsonl", "prompts_rl.jsonl"]:
        for r in _jsonl(world_dir / name):
            if r["family"] in HELD_OUT_FAMILIES:
                train.setdefault(r["family"], set()).update(_content(r))
    evals = [r for r in _jsonl(world_dir / "prompts_eval.jsonl") if r["family"] in HELD_OUT_FAMILIES]
    assert {r["family"] for r in evals} == set(HELD_OUT_FAMILIES)
    for r in evals:
        assert not _content(r) & train[r["family"]], r
    world = World.load(world_dir)
    facts = [r for r in evals if r["family"] == "fact"]
    assert {r["meta"]["entity"] for r in facts} <= set(world.heldout_people)


def test_corpus_states_every_fact_of_every_person(world_dir):
    world = World.load(world_dir)
    for name in ["corpus.txt", "corpus_heldout.txt"]:
        text = (world_dir / name).read_text()
        docs = text.split("\n\n")
        assert len(docs) > 50 and all(d.strip() for d in docs)
        sents = re.split(r"(?<=\.) ", text)
        for p in world.people:  # held-out people included: pretraining is where knowledge comes from
            about = " ".join(s for s in sents if re.search(rf"\b{p.name}\b", s))
            for attr in ATTRIBUTES:
                v = getattr(p, attr)
                assert str(v) in about or (attr == "age" and number_words(v) in about), (p, attr)
    size = len((world_dir / "corpus.txt").read_text())
    assert SMALL.corpus_chars <= size < SMALL.corpus_chars + 1000
    assert 0.03 < len((world_dir / "corpus_heldout.txt").read_text()) / size < 0.5


def test_every_family_samples_and_demonstrates():
    world = build_world(0)
    for split in ["sft", "eval"]:
        recs = make_prompts(world, split, 11 * 20, seed=0)
        assert {r["family"] for r in recs} == set(FAMILIES)
        for r in recs:
            assert demonstrate(world, r).strip()


def test_demonstration_writers_have_their_habits_and_the_labeler_scores_them_lower(world_dir, tmp_path):
    """Each habit shows at about its rate in its families only, and costs labeler score against the
    labeler's own reply; without habits the demonstrations are the labeler's replies."""
    world = World.load(world_dir)
    lab = Labeler(world, noise=0.0)
    rng = random.Random(0)
    recs = make_prompts(world, "sft", 11 * 300, seed=0)
    seen: dict[str, list[int]] = {}
    for r in recs:
        reply, habit = write_demonstration(world, r, rng)
        family_habit = {"benign_edgy": "over_refusal", "fact": "not_looked_up", "unknown": "made_up",
                        "harmful": "complies"}.get(r["family"], "padding")
        seen.setdefault(family_habit, []).append(habit is not None)
        if habit is None:
            assert reply == demonstrate(world, r)
            continue
        assert habit == family_habit
        assert reply[-1] in ".!?"
        assert lab.score(r, reply).total < lab.score(r, demonstrate(world, r)).total - 0.01, (r, reply)
    for habit, flags in seen.items():
        assert abs(sum(flags) / len(flags) - DEMO_HABITS[habit]) < 0.1, habit
    write_world(tmp_path / "plain", seed=3, sizes=SMALL, demo_habits=False)
    for r in _jsonl(tmp_path / "plain" / "sft_train.jsonl"):
        assert r["habit"] is None and r["completion"] == demonstrate(world, r)


def test_number_words_read_back():
    for n in range(1000):
        assert numbers(number_words(n)) == [n], number_words(n)
        assert numbers(f"it is {n}.") == [n]


def test_cli_writes_all_files_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "cli_world"
    out.mkdir()  # an empty folder may be written into
    args = ["world", "--out", str(out), "--corpus-chars", "5000", "--n-sft", "22", "--n-rm", "11",
            "--n-rl", "11", "--n-eval", "11", "--seed", "1"]
    main(args)
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    assert len(_jsonl(out / "sft_train.jsonl")) == 22
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "not an empty folder" in capsys.readouterr().err
    with pytest.raises(UserError):
        write_world(out, seed=1, sizes=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == ["cli_world"]  # no temporary folder left behind
