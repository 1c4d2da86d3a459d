"""The world as files: its pretraining corpus (facts as prose, arithmetic and word games written out, lists and
short stories) and `write_world`, which lays out every file a run reads (corpus, demonstrations, prompts,
world.json). Deterministic for a seed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from .world import (
    ALL_WORDS,
    ATTRIBUTES,
    CATEGORIES,
    DEMO_HABITS,
    SUMS,
    Person,
    World,
    article,
    build_world,
    demonstrate,
    join_list,
    make_prompts,
    number_words,
    seeded_rng,
    solve,
    write_demonstration,
)

_FACT_PROSE = {
    "town": ["{n} lives in {v}.", "{n} has a house in {v}.", "{n} was born in {v} and never left.",
             "Everyone in {v} knows {n}."],
    "colour": ["{n}'s favourite colour is {v}.", "{n} loves the colour {v}.", "{n} always wears {v}.",
               "Of all colours, {n} likes {v} the most."],
    "food": ["{n}'s favourite food is {v}.", "{n} eats {v} every day.", "Nothing makes {n} happier than {v}.",
             "For supper {n} always wants {v}."],
    "job": ["{n} is {a} {v}.", "{n} works as {a} {v}.", "By trade, {n} is {a} {v}.",
            "Every morning {n} goes to work as {a} {v}."],
    "pet": ["{n} has a pet {v}.", "{n} keeps {a} {v} at home.", "{n} takes care of {a} {v}.",
            "The {v} that lives with {n} is a good pet."],
    "age": ["{n} is {v} years old.", "{n} is {w} years old.", "{n} turned {v} this year.",
            "{n} has lived for {w} years."],
}


def fact_sentence(rng: random.Random, p: Person, attribute: str) -> str:
    v = getattr(p, attribute)
    words = number_words(v) if attribute == "age" else ""
    a = article(str(v))
    return rng.choice(_FACT_PROSE[attribute]).format(n=p.name, v=v, w=words, a=a)


def _profile(rng: random.Random, p: Person, all_attributes: bool = False) -> str:
    attrs = list(ATTRIBUTES) if all_attributes else rng.sample(ATTRIBUTES, rng.randint(3, 5))
    rng.shuffle(attrs)
    return " ".join(fact_sentence(rng, p, a) for a in attrs)


def _town_doc(rng: random.Random, world: World, town: str) -> str:
    folk = [p.name for p in world.people if p.town == town]
    by = world.towns[town]
    lines = [rng.choice([f"{town} lies by the {by}.", f"The town of {town} is by the {by}.",
                         f"If you walk to the {by}, you will find {town}."])]
    if folk:
        rng.shuffle(folk)
        lines.append(rng.choice([f"The people of {town} include {join_list(folk[:5])}.",
                                 f"In {town} live {join_list(folk[:5])}."]))
    return " ".join(lines)


def _story(rng: random.Random, world: World) -> str:
    a, b = rng.sample(world.people, 2)
    by = world.towns[a.town]
    walk = f"across {a.town}" if a.town == b.town else f"from {a.town} to {b.town}"
    stories = [
        f"One morning {a.name} the {a.job} walked {walk} to visit {b.name}. "
        f"{a.name} brought some {a.food}, and {b.name} shared some {b.food}. They ate together until dark.",
        f"{a.name} and {b.name} met at the market in {a.town}. {b.name} wore a {b.colour} coat. "
        f"{a.name} bought {a.food} and went home to feed the {a.pet}.",
        f"When {a.name} was {number_words(a.age)}, the {a.pet} ran away. {a.name} looked all over {a.town}. "
        f"At last {b.name} the {b.job} found it by the {by}.",
        f"Every day {a.name} the {a.job} works hard in {a.town}. In the evening {a.name} eats {a.food} "
        f"and sits with the {a.pet} by the {by}.",
        f"{b.name} the {b.job} lives in {b.town}. {b.name} likes {b.colour} things and {b.food}. "
        f"{b.name} has {article(b.pet)} {b.pet} and is {b.age} years old.",
    ]
    return rng.choice(stories)


def _arith_line(rng: random.Random) -> str:
    op, a, b = rng.choice(SUMS)
    c = solve(op, a, b)
    sym = {"+": "+", "-": "-", "x": "x"}[op]
    word = {"+": "plus", "-": "minus", "x": "times"}[op]
    wa, wb, wc = number_words(a), number_words(b), number_words(c)
    return rng.choice([
        f"{a} {sym} {b} = {c}.", f"{a} {sym} {b} = {c}.", f"{wa} {word} {wb} is {wc}.",
        f"{a} {word} {b} makes {c}.", f"{wa.capitalize()} {word} {wb} equals {wc}.",
    ])


def _word_line(rng: random.Random) -> str:
    w = rng.choice(ALL_WORDS)
    n = rng.randint(2, 5)
    k = len(w)
    return rng.choice([
        f"The word {w} backwards is {w[::-1]}.", f"Spelled backwards, {w} is {w[::-1]}.",
        f"The word {w} has {k} letters.", f"{w.capitalize()} has {number_words(k)} letters.",
        f"{w} in capitals is {w.upper()}.", f"In big letters, {w} is written {w.upper()}.",
        f"Say {w} {number_words(n)} times: {' '.join([w] * n)}.",
    ])


def _list_line(rng: random.Random) -> str:
    cat = rng.choice(list(CATEGORIES))
    items = rng.sample(CATEGORIES[cat], rng.randint(3, 6))
    mixed = rng.sample(ALL_WORDS, rng.randint(3, 6))
    return rng.choice([
        f"Some {cat}: {join_list(items)}.",
        f"In order from a to z: {join_list(sorted(mixed))}.",
        f"Sorted, the words {join_list(mixed)} become {join_list(sorted(mixed))}.",
        f"{join_list(items)}: that is {number_words(len(items))} {cat}.",
        f"{cat.capitalize()} that start with {items[0][0]}: "
        f"{join_list([w for w in CATEGORIES[cat] if w[0] == items[0][0]])}.",
    ])


def _document(rng: random.Random, world: World) -> str:
    kind = rng.choices(["profile", "story", "town", "arith", "words", "lists"], [30, 15, 5, 20, 20, 10])[0]
    if kind == "profile":
        return _profile(rng, rng.choice(world.people))
    if kind == "story":
        return _story(rng, world)
    if kind == "town":
        return _town_doc(rng, world, rng.choice(list(world.towns)))
    line = {"arith": _arith_line, "words": _word_line, "lists": _list_line}[kind]
    return " ".join(line(rng) for _ in range(rng.randint(3, 8)))


def generate_corpus(world: World, n_chars: int, seed: int) -> str:
    """Documents separated by blank lines. It opens with every fact of every person and town once, so the
    corpus states all of them however small it is; then random documents up to `n_chars`."""
    rng = seeded_rng(seed, "corpus")
    docs = [_profile(rng, p, all_attributes=True) for p in world.people]
    docs += [_town_doc(rng, world, t) for t in world.towns]
    rng.shuffle(docs)
    total = sum(len(d) + 2 for d in docs)
    while total < n_chars:
        d = _document(rng, world)
        docs.append(d)
        total += len(d) + 2
    return "\n\n".join(docs) + "\n"


@dataclass
class WorldSizes:
    corpus_chars: int = 3_000_000      # pretraining text, about 3 MB
    n_sft: int = 2000                  # demonstrations
    n_rm: int = 2000                   # prompts for collecting comparisons
    n_rl: int = 2000                   # prompts for PPO
    n_eval: int = 400                  # held-out prompts


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def write_world(out: str | Path, seed: int = 0, sizes: WorldSizes | None = None, demo_habits: bool = True
                ) -> dict:
    """Generate the whole world into the folder `out` (which must not exist or be empty) and return
    statistics. The folder is built beside `out` under a temporary name and renamed at the end."""
    sizes = sizes or WorldSizes()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        from ..errors import UserError

        raise UserError(f"{out} exists and is not an empty folder; choose a new --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    world = build_world(seed)
    world.sizes = asdict(sizes)
    corpus = generate_corpus(world, sizes.corpus_chars, seed)
    heldout_corpus = generate_corpus(world, max(1, sizes.corpus_chars // 20), seed + 1_000_003)
    sft = make_prompts(world, "sft", sizes.n_sft, seed)
    writers = seeded_rng(seed, "demonstration writers")
    for r in sft:
        r["completion"], r["habit"] = write_demonstration(world, r, writers) if demo_habits else (
            demonstrate(world, r), None)
        r["messages"] = [{"role": "user", "content": r["prompt"]},
                         {"role": "assistant", "content": r["completion"]}]
    splits = {
        "sft_train.jsonl": sft,
        "prompts_rm.jsonl": make_prompts(world, "rm", sizes.n_rm, seed),
        "prompts_rl.jsonl": make_prompts(world, "rl", sizes.n_rl, seed),
        "prompts_eval.jsonl": make_prompts(world, "eval", sizes.n_eval, seed),
    }
    stats = {
        "corpus_chars": len(corpus), "corpus_documents": corpus.count("\n\n") + 1,
        "corpus_words": len(corpus.split()), "corpus_distinct_words": len(set(corpus.split())),
        "heldout_corpus_chars": len(heldout_corpus),
        **{name: len(recs) for name, recs in splits.items()},
        "demo_habits": {h: sum(r["habit"] == h for r in sft) for h in DEMO_HABITS} if demo_habits else None,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write_text(tmp / "corpus.txt", corpus)
        _write_text(tmp / "corpus_heldout.txt", heldout_corpus)
        for name, recs in splits.items():
            _write_text(tmp / name, _jsonl(recs))
        _write_text(tmp / "world.json", json.dumps({**world.to_dict(), "stats": stats}, indent=1) + "\n")
        os.chmod(tmp, 0o755)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return stats
