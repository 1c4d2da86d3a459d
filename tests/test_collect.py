"""collect: K replies per prompt within [k_min, k_max], rankings are permutations by the world's labeler,
empty replies dropped (counted) and sampled again, deterministic for a seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from instructgpt import collect as collect_module
from instructgpt.checkpoint import save_model
from instructgpt.cli import main
from instructgpt.collect import collect_command
from instructgpt.data import read_comparisons, read_rankings
from instructgpt.errors import UserError
from instructgpt.model import GPT, ModelConfig
from instructgpt.recipe import call
from instructgpt.tokenizer import SPECIAL_TOKENS, Tokenizer
from instructgpt.world import Labeler, WorldSizes, write_world


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def constant_policy(tok: Tokenizer, p_end: float) -> GPT:
    """A policy whose next-token distribution is the same at every step: the end token with probability
    p_end, every character alike otherwise, never another special token. Its replies are random strings
    of random length, some of them empty (the end token first) and some cut at max_new_tokens."""
    V = tok.vocab_size
    model = GPT(ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, block_size=128, tie_embeddings=False))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()  # the final hidden state is the bias: e_0 everywhere
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.lm_head.weight.zero_()  # logit of token v = lm_head.weight[v, 0]
        n_chars = V - len(SPECIAL_TOKENS)
        for v in tok.special_ids:
            model.lm_head.weight[v, 0] = -30.0
        model.lm_head.weight[tok.eos_id, 0] = math.log(p_end * n_chars / (1 - p_end))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("collect")
    world = root / "world"
    write_world(world, seed=0, sizes=WorldSizes(corpus_chars=5_000, n_sft=4, n_rm=40, n_rl=4, n_eval=4))
    prompts = [json.loads(line)["prompt"] for line in open(world / "prompts_rm.jsonl")]
    tok = Tokenizer.train_char(prompts + ["abcdefghijklmnopqrstuvwxyz .,"])
    torch.manual_seed(0)
    save_model(constant_policy(tok, p_end=0.3), root / "policy")
    tok.save(root / "policy" / "tokenizer.json")
    return {"root": root, "world": world, "policy": root / "policy", "prompts": world / "prompts_rm.jsonl"}


def collect(setup: dict, out: str, **kw) -> dict:
    args = dict(k_min=3, k_max=6, max_new_tokens=4, batch_size=16, seed=5, device="cpu") | kw
    return call(collect_command, init=setup["policy"], prompts=setup["prompts"], out=setup["root"] / out,
                world=setup["world"], **args)


def test_collect_writes_valid_rankings_and_is_deterministic(setup: dict) -> None:
    s = collect(setup, "a.jsonl")
    again = collect(setup, "b.jsonl")
    collect(setup, "c.jsonl", seed=6)
    root = setup["root"]
    assert (root / "a.jsonl").read_bytes() == (root / "b.jsonl").read_bytes()
    assert s == {**again, "seconds": s["seconds"]}
    assert (root / "a.jsonl").read_bytes() != (root / "c.jsonl").read_bytes()

    rows = [json.loads(line) for line in open(root / "a.jsonl")]
    prompts = {json.loads(line)["id"]: json.loads(line) for line in open(setup["prompts"])}
    labeler = Labeler.load(setup["world"], seed=5)
    sizes = set()
    for r in rows:
        K = len(r["completions"])
        sizes.add(K)
        assert 3 <= K <= 6
        assert sorted(r["ranking"]) == list(range(K))
        assert all(c.strip() for c in r["completions"])
        assert len(r["ended"]) == K and all(isinstance(e, bool) for e in r["ended"])
        p = prompts[r["id"]]
        assert r["prompt"] == [{"role": "user", "content": p["prompt"]}]
        assert r["ranking"] == labeler.rank(p, r["completions"], r["ended"])  # the world's labeler ranked
    assert sizes == {3, 4, 5, 6}  # K is drawn over the whole range

    # a reply is empty when the end token comes first (p = 0.3): dropped, counted, sampled again
    assert s["empty_replies_dropped"] > 0
    assert s["completions"] == sum(len(r["completions"]) for r in rows)
    assert s["comparisons"] == sum(len(r["completions"]) * (len(r["completions"]) - 1) // 2 for r in rows)
    if s["prompts_dropped"] == 0:
        assert s["prompts"] == 40 and s["sampled"] == s["completions"] + s["empty_replies_dropped"]
    assert 0 < s["unended"] < s["completions"]  # some replies were cut at max_new_tokens
    # what `instructgpt rm` reads, "ended" flags included
    assert len(read_comparisons(root / "a.jsonl")) == len(rows) == len(read_rankings([root / "a.jsonl"]))


def test_without_resampling_short_prompts_are_dropped_and_counted(setup: dict) -> None:
    s = collect(setup, "d.jsonl", k_min=5, k_max=5, resample_rounds=0)
    rows = [json.loads(line) for line in open(setup["root"] / "d.jsonl")]
    assert all(len(r["completions"]) == 5 for r in rows)
    assert s["sampled"] == 5 * 40
    assert s["prompts_dropped"] == 40 - len(rows) > 0  # P(5 non-empty of 5) = 0.7^5: most prompts are short
    assert s["empty_replies_dropped"] >= s["prompts_dropped"]


def test_collect_rejects_bad_flags_and_foreign_prompts(setup: dict, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="k-min"):
        collect(setup, "e.jsonl", k_min=1)
    with pytest.raises(UserError, match="k-min"):
        collect(setup, "e.jsonl", k_min=5, k_max=4)
    foreign = tmp_path / "prompts.jsonl"
    foreign.write_text(json.dumps({"prompt": "abc"}) + "\n")
    with pytest.raises(UserError, match="world prompts"):
        call(collect_command, init=setup["policy"], prompts=foreign, out=tmp_path / "out.jsonl", world=setup["world"],
             device="cpu")
    assert not (setup["root"] / "e.jsonl").exists() and not (tmp_path / "out.jsonl").exists()
    assert not (tmp_path / "out.jsonl.args.json").exists()
    with pytest.raises(UserError, match="folder"):  # --out is the rankings file
        collect(setup, str(tmp_path))


def test_sample_responses_gives_k_replies_per_prompt(setup: dict) -> None:
    from instructgpt.checkpoint import load_model
    from instructgpt.data import read_prompts
    from instructgpt.generate import SamplingParams

    tok = Tokenizer.load(setup["policy"] / "tokenizer.json")
    model = load_model(setup["policy"])
    items = list(read_prompts(setup["prompts"]))[:5]
    got = collect_module.sample_responses(model, tok, items, [1, 0, 3, 2, 4], SamplingParams(max_new_tokens=3), 4,
                                          torch.Generator().manual_seed(0))
    assert [len(g) for g in got] == [1, 0, 3, 2, 4]
    assert all(len(tok.encode(t)) <= 3 for g in got for t, _ in g)


# ----------------------------------------------------------------------------------------------------
# The command line: a recipe file, flags on top of it


def test_collect_from_a_recipe_file_and_a_flag(setup: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "collect.yaml"
    out = tmp_path / "rankings.jsonl"
    recipe.write_text(f"""\
init: {setup["policy"]}
prompts: {setup["prompts"]}
out: {out}
world: {setup["world"]}
k-min: 3
k_max: 4
max_new_tokens: 4
max-prompts: 6
temperature: 0.8
seed: 9
device: cpu
""")
    main(["collect", "--config", str(recipe), "--seed", "5"])
    args = json.loads((tmp_path / "rankings.jsonl.args.json").read_text())  # beside the rankings file
    assert args["seed"] == 5  # the flag beats the file
    assert (args["init"], args["out"]) == (str(setup["policy"]), str(out))
    assert (args["k_min"], args["k_max"], args["max_new_tokens"], args["max_prompts"], args["temperature"]) == (
        3, 4, 4, 6, 0.8)
    assert (args["batch_size"], args["resample_rounds"]) == (64, 3)  # the defaults
    rows = [json.loads(line) for line in open(out)]
    assert 0 < len(rows) <= 6 and all(3 <= len(r["completions"]) <= 4 for r in rows)
    # the args file is itself a recipe: it reproduces the rankings
    again = tmp_path / "again.jsonl"
    main(["collect", "--config", str(tmp_path / "rankings.jsonl.args.json"), "--out", str(again)])
    assert again.read_bytes() == out.read_bytes()


def test_collect_recipe_with_a_misspelled_key_fails(setup: dict, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "collect.yaml"
    recipe.write_text(f"policy: {setup['policy']}\nprompts: {setup['prompts']}\nout: {tmp_path / 'r.jsonl'}\n"
                      f"world: {setup['world']}\n")
    with pytest.raises(SystemExit) as e:
        main(["collect", "--config", str(recipe)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "'policy'" in err and str(recipe) in err, err  # --policy is --init now, as in every other command
    assert not (tmp_path / "r.jsonl").exists()
