"""collect: K replies per prompt within [k_min, k_max], rankings are permutations by the world's labeler,
empty replies dropped (counted) and sampled again, deterministic for a seed; a collection stopped at any point
(an exception, or SIGKILL) resumes from its chunks and writes the file an uninterrupted run writes."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
    # sampling settings and prompts that cannot be sampled from are the user's to fix (not a ValueError's traceback)
    with pytest.raises(UserError, match=r"--temperature must be >= 0"):
        collect(setup, "e.jsonl", temperature=-1.0)
    with pytest.raises(UserError, match=r"--top-p must be in \(0, 1\]"):
        collect(setup, "e.jsonl", top_p=0.0)
    with pytest.raises(UserError, match=r"--max-new-tokens 200 does not fit the model's context of 128"):
        collect(setup, "e.jsonl", max_new_tokens=200)
    with pytest.raises(UserError, match=r"prompt 1 is \d+ tokens, and with --max-new-tokens 120 does not fit"):
        collect(setup, "e.jsonl", max_new_tokens=120)
    strange = tmp_path / "strange.jsonl"
    strange.write_text(json.dumps({"prompt": "abc", "family": "poetry", "id": "x"}) + "\n")
    with pytest.raises(UserError, match=r"prompt 1 has the task family 'poetry', which the labeler does not know"):
        call(collect_command, init=setup["policy"], prompts=strange, out=tmp_path / "out.jsonl", world=setup["world"],
             device="cpu")
    assert not (setup["root"] / "e.jsonl").exists() and not (tmp_path / "out.jsonl").exists()


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


# ----------------------------------------------------------------------------------------------------
# Stopped and resumed


class Stop(BaseException):
    """A crash at a chosen point (a BaseException, as KeyboardInterrupt: nothing may catch it)."""


def test_a_stopped_collection_resumes_from_its_chunks_to_the_same_file(setup: dict, monkeypatch) -> None:
    """Stopped after the first batch, in the middle of the first round, after its last batch, and in the second
    round: each resumed run samples only the batches that were not saved, and writes the reference's bytes."""
    kw = dict(batch_size=8, k_min=5, k_max=5)  # 200 rows: 25 batches in round 0; ~0.7^5 of prompts resampled
    reference = collect(setup, "ref.jsonl", **kw)
    writes: list[str] = []
    real_write = collect_module.write_json_atomic
    monkeypatch.setattr(collect_module, "write_json_atomic", lambda path, obj: (writes.append(Path(path).name),
                                                                                real_write(path, obj)))
    collect(setup, "count.jsonl", **kw)
    batches = [w for w in writes if w.startswith("chunk-")]
    first_round = sum(w.startswith("chunk-00-") for w in batches)
    assert first_round == 25 and len(batches) > first_round  # some replies were empty: a second round ran
    generated: list[int] = []
    real_generate = collect_module.generate
    monkeypatch.setattr(collect_module, "generate", lambda *a, **k: (generated.append(1), real_generate(*a, **k))[1])
    for stop_after in (1, 12, first_round, first_round + 1):
        out = setup["root"] / f"stopped_{stop_after}.jsonl"
        monkeypatch.setattr(collect_module, "write_json_atomic", stopping_after(stop_after, real_write))
        with pytest.raises(Stop):
            collect(setup, out.name, **kw)
        assert not out.exists() and len(list(out.with_name(out.name + ".chunks").glob("chunk-*"))) == stop_after
        monkeypatch.setattr(collect_module, "write_json_atomic", real_write)
        generated.clear()
        summary = collect(setup, out.name, **kw)
        assert len(generated) == len(batches) - stop_after  # only what was not saved
        assert out.read_bytes() == (setup["root"] / "ref.jsonl").read_bytes()
        assert summary == {**reference, "seconds": summary["seconds"]}
        assert not out.with_name(out.name + ".chunks").exists()  # gone once the rankings are written


def stopping_after(n: int, write: Callable) -> Callable:
    """write_json_atomic that raises Stop once it has written the n-th chunk."""
    saved = 0

    def stopping(path, obj):
        nonlocal saved
        write(path, obj)
        saved += Path(path).name.startswith("chunk-")
        if saved == n:
            raise Stop

    return stopping


def test_chunks_of_other_arguments_are_not_replayed(setup: dict, monkeypatch) -> None:
    real_write = collect_module.write_json_atomic
    monkeypatch.setattr(collect_module, "write_json_atomic", stopping_after(3, real_write))
    with pytest.raises(Stop):
        collect(setup, "other.jsonl", batch_size=8, seed=6)
    monkeypatch.setattr(collect_module, "write_json_atomic", real_write)
    collect(setup, "other.jsonl", batch_size=8, seed=5)  # another seed: the chunks are of another collection
    collect(setup, "other_ref.jsonl", batch_size=8, seed=5)
    assert (setup["root"] / "other.jsonl").read_bytes() == (setup["root"] / "other_ref.jsonl").read_bytes()


def kill_when(cmd: list[str], written: Callable[[], bool], delay: float, log: Path, env: dict | None = None) -> bool:
    """Start `cmd`, wait until `written()` (it has saved something), then `delay` seconds more, and SIGKILL it.
    True if it was killed, False if it finished first."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), **(env or {})}
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=err, env=env)
        try:
            while not written():
                if proc.poll() is not None:
                    raise AssertionError(f"{cmd[2:5]} ended before writing anything: {log.read_text()[-3000:]}")
                time.sleep(0.002)
            deadline = time.monotonic() + delay
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.001)
            killed = proc.poll() is None
            if killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            return killed
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_a_collection_killed_at_a_random_moment_resumes_to_the_same_file(setup: dict, tmp_path: Path,
                                                                          capsys) -> None:
    kw = dict(batch_size=2, max_new_tokens=6)
    collect(setup, "kill_ref.jsonl", **kw)  # about 120 batches
    out = tmp_path / "killed.jsonl"
    chunks = out.with_name(out.name + ".chunks")
    seed = random.SystemRandom().randrange(2**32)  # not the global generator, which the stages seed
    rng = random.Random(seed)
    k, delay = rng.randint(1, 60), rng.uniform(0, 0.02)  # a random moment after the k-th chunk is saved
    cmd = [sys.executable, "-m", "instructgpt.cli", "collect", "--init", str(setup["policy"]), "--prompts",
           str(setup["prompts"]), "--world", str(setup["world"]), "--out", str(out), "--k-min", "3", "--k-max", "6",
           "--max-new-tokens", "6", "--batch-size", "2", "--seed", "5", "--device", "cpu"]
    killed = kill_when(cmd, lambda: len(list(chunks.glob("chunk-*"))) >= k, delay, tmp_path / "log.txt")
    assert killed, f"the collection finished within {delay:.3f} s of its chunk {k} (seed {seed})"
    assert not out.exists() and any(chunks.glob("chunk-*"))
    capsys.readouterr()
    call(collect_command, init=setup["policy"], prompts=setup["prompts"], out=out, world=setup["world"], k_min=3,
         k_max=6, seed=5, device="cpu", **kw)
    assert "[collect] resuming:" in capsys.readouterr().out
    assert out.read_bytes() == (setup["root"] / "kill_ref.jsonl").read_bytes(), f"kill seed {seed}"
