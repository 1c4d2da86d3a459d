"""The reward model: K-way loss vs its pairwise twin, padding-independent scores, the demonstrations'
mean reward, learning on world rankings and on Anthropic HH, bad rankings, exact resume."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread_pool
from safetensors.torch import load_file

from instructgpt import checkpoint
from instructgpt import rm as rm_module
from instructgpt.checkpoint import load_model, save_model
from instructgpt.cli import main
from instructgpt.data import Comparison, write_jsonl
from instructgpt.errors import UserError
from instructgpt.model import GPT, ModelConfig, ScalarModel
from instructgpt.recipe import call
from instructgpt.rm import (
    EncodedComparison,
    RMArgs,
    batch_loss_sum,
    make_batch,
    n_prompts,
    rm_command,
    score_responses,
    score_sequences,
)
from instructgpt.tokenizer import Tokenizer
from instructgpt.world import Labeler, World, WorldSizes, write_world
from instructgpt.world.labeler import response_variants


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and a busy 2-core machine makes two threads spin);
    the stages size their thread pool from `distributed.default_threads`."""
    yield from one_thread_pool()


# ----------------------------------------------------------------------------------------------------
# A small world run: world prompts, five replies each (the demonstration, a wrong, a rambling, a truncated
# and an off-topic one) ranked by the world's noisy labeler, and a freshly initialised tiny "SFT" model.


def build_world_run(root: Path, n_prompts: int = 200, dropout: float = 0.0, block_size: int = 96) -> dict:
    world_dir = root / "world"
    write_world(world_dir, seed=0, sizes=WorldSizes(corpus_chars=20_000, n_sft=60, n_rm=n_prompts, n_rl=4, n_eval=4))
    world = World.load(world_dir)
    labeler = Labeler.load(world_dir, seed=1)  # default noise: ~73% agreement between two labelers
    rng = random.Random(0)
    rows, texts = [], [(world_dir / "corpus.txt").read_text()]
    for line in open(world_dir / "prompts_rm.jsonl"):
        p = json.loads(line)
        variants = list(response_variants(world, p, rng).values())
        replies, ended = [t for t, _ in variants], [e for _, e in variants]
        rows.append({"prompt": [{"role": "user", "content": p["prompt"]}], "completions": replies,
                     "ranking": labeler.rank(p, replies, ended), "ended": ended})
        texts += replies + [p["prompt"]]
    texts += [json.dumps(json.loads(line)) for line in open(world_dir / "sft_train.jsonl")]
    write_jsonl(root / "rankings.jsonl", rows)
    tok = Tokenizer.train_char(texts)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=block_size,
                            dropout=dropout))
    save_model(model, root / "sft", extra={"stage": "sft"})
    tok.save(root / "sft" / "tokenizer.json")
    return {"world": world_dir, "rankings": root / "rankings.jsonl", "sft": root / "sft", "tok": tok,
            "demos": world_dir / "sft_train.jsonl"}


@pytest.fixture(scope="module")
def world_rm(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world_rm")
    run = build_world_run(root, n_prompts=400)
    summary = call(rm_command, init=run["sft"], data=[run["rankings"]], out=root / "rm", demos=[run["demos"]],
                   val_fraction=0.2, epochs=1.0, batch_size=8, lr=2e-3, warmup_steps=4, log_interval=1,
                   eval_interval=10, device="cpu")
    return {**run, "out": root / "rm", "summary": summary}


def tiny_scalar(seed: int = 0, V: int = 40, dropout: float = 0.0) -> ScalarModel:
    torch.manual_seed(seed)
    return ScalarModel(ModelConfig(vocab_size=V, n_layer=2, n_head=2, n_embd=32, block_size=32, dropout=dropout))


# ----------------------------------------------------------------------------------------------------
# The loss and the scores


def test_kway_batch_equals_pairwise_loop() -> None:
    """One forward per completion, all pairs of a prompt in one element == a loop over pairs with one
    forward per pair member, averaged over each prompt's pairs, then over the prompts."""
    model = tiny_scalar()
    g = torch.Generator().manual_seed(1)
    items = []
    for K in (2, 3, 4, 5):
        seqs = [torch.randint(6, 40, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
                for _ in range(K)]
        ranking = torch.randperm(K, generator=g).tolist()
        pairs = Comparison([{"role": "user", "content": "x"}], ["a"] * K, ranking).pairs()
        items.append(EncodedComparison(seqs, pairs))

    batch = make_batch(items, pad_id=0)
    fast = batch_loss_sum(model, batch) / n_prompts(batch)
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    per_prompt = []
    for item in items:
        losses = []
        for w, l in item.pairs:
            r_w = model.score(torch.tensor([item.seqs[w]]), torch.ones(1, len(item.seqs[w]), dtype=torch.long))
            r_l = model.score(torch.tensor([item.seqs[l]]), torch.ones(1, len(item.seqs[l]), dtype=torch.long))
            losses.append(-F.logsigmoid(r_w - r_l).squeeze())
        assert len(losses) == len(item.seqs) * (len(item.seqs) - 1) // 2
        per_prompt.append(torch.stack(losses).mean())
    slow = torch.stack(per_prompt).mean()
    slow.backward()

    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(fast_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_is_the_same_alone_and_in_any_padded_batch(side: str) -> None:
    model = tiny_scalar(seed=3)
    g = torch.Generator().manual_seed(4)
    seqs = [torch.randint(6, 40, (n,), generator=g).tolist() for n in (1, 5, 17, 32, 9, 2)]
    alone = torch.cat([score_sequences(model, [s], pad_id=0) for s in seqs])
    batched = score_sequences(model, seqs, pad_id=0, padding_side=side)
    small_batches = score_sequences(model, seqs[::-1], pad_id=0, batch_size=4, padding_side=side).flip(0)
    torch.testing.assert_close(batched, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(small_batches, alone, rtol=0, atol=1e-5)
    # the scores differ from row to row, so the test would see a row read at the wrong position
    assert alone.unique().numel() == len(seqs)


def test_score_responses_uses_the_chat_template_and_the_end_flag(world_rm: dict) -> None:
    rm = load_model(world_rm["out"], kind="scalar")
    tok = world_rm["tok"]
    prompt = [{"role": "user", "content": "Add 2 and 3."}]
    ended = rm_module.encode_pair(tok, prompt, "5.", 96)
    cut = rm_module.encode_pair(tok, prompt, "5.", 96, ended=False)
    assert ended[-1] == tok.eos_id and cut == ended[:-1]
    got = score_responses(rm, tok, [prompt, prompt], ["5.", "5."], ended=[True, False])
    torch.testing.assert_close(got, score_sequences(rm, [ended, cut], tok.pad_id))


# ----------------------------------------------------------------------------------------------------
# The stage on world rankings


def test_rm_learns_world_rankings(world_rm: dict) -> None:
    s = world_rm["summary"]
    # 320 training prompts x 10 pairs, 1 epoch (40 steps); 80 held-out prompts (800 pairs). Chance is 0.5;
    # the noisy labeler's rankings agree with its own noiseless scores on ~81% of such pairs (the ceiling).
    # A freshly initialised 2-layer model learns the surface (ends cleanly, length, on topic): 0.64 here,
    # 0.63-0.64 over seeds 1-3.
    assert s["train_prompts"] == 320 and s["val_pairs"] == 800 and s["steps"] == 40
    assert s["val_accuracy"] > 0.6, s
    rows = [json.loads(line) for line in open(world_rm["out"] / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, s["steps"] + 1))
    assert all(0 <= r["accuracy"] <= 1 and r["loss"] > 0 for r in rows)
    assert rows[-1]["val_accuracy"] == pytest.approx(s["val_accuracy"])  # the bias shift changes no order
    for name in ("model.safetensors", "config.json", "tokenizer.json", "done.json"):
        assert (world_rm["out"] / name).is_file(), name


def test_demonstrations_have_mean_reward_zero(world_rm: dict) -> None:
    rm = load_model(world_rm["out"], kind="scalar")
    demos = [json.loads(line) for line in open(world_rm["demos"])]
    r = score_responses(rm, world_rm["tok"], [d["messages"][:-1] for d in demos],
                        [d["messages"][-1]["content"] for d in demos])
    assert abs(float(r.double().mean())) < 1e-4
    assert float(r.std()) > 0  # not a constant reward
    config = json.loads((world_rm["out"] / "config.json").read_text())
    assert config["normalised_on"] == "demonstrations" and config["bias_shift"] == world_rm["summary"]["bias_shift"]


# ----------------------------------------------------------------------------------------------------
# Real data: Anthropic HH (harmless), pairwise (K = 2)


def test_hh_rlhf_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    lines = (shared_data / "hh_rlhf_harmless_1600.jsonl").read_text().splitlines()[:300]
    data = tmp_path / "hh_300.jsonl"
    data.write_text("\n".join(lines) + "\n")
    tok = Tokenizer.train_char([json.loads(line)[k] for line in lines for k in ("chosen", "rejected")])
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=32, block_size=128)),
               tmp_path / "init")
    tok.save(tmp_path / "init" / "tokenizer.json")
    with pytest.warns(UserWarning, match="skipped 1 invalid record"):  # line 87 has an empty "chosen" reply
        s = call(rm_command, init=tmp_path / "init", data=[data], out=tmp_path / "rm", val_fraction=0.1, max_steps=8,
                 batch_size=8, lr=1e-3, warmup_steps=2, device="cpu", skip_invalid=True)
    assert s["val_prompts"] == 30 and s["val_pairs"] == 30 and s["train_prompts"] == 269
    assert 0.0 <= s["val_accuracy"] <= 1.0
    assert s["normalised_on"] == "top-ranked training completions"
    assert (tmp_path / "rm" / "done.json").is_file()


# ----------------------------------------------------------------------------------------------------
# Bad rankings fail through the command line, naming file, line and field, and write nothing


GOOD = {"prompt": "Add 2 and 3.", "completions": ["5.", "6."], "ranking": [0, 1]}


@pytest.mark.parametrize("bad, field, words", [
    ({"ranking": [0, 0]}, "ranking", "permutation"),
    ({"ranking": [0, 2]}, "ranking", "permutation"),
    ({"completions": ["5."], "ranking": [0]}, "completions", "at least 2"),
    ({"completions": ["5.", "  "]}, "completions[1]", "empty"),
    ({"ended": [True]}, "ended", "2 booleans"),
])
def test_bad_rankings_fail_with_file_line_field(tmp_path: Path, capsys, bad: dict, field: str, words: str) -> None:
    tok = Tokenizer.train_char(["Add 2 and 3.56 "])
    torch.manual_seed(0)
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)),
               tmp_path / "init")
    tok.save(tmp_path / "init" / "tokenizer.json")
    data = tmp_path / "rankings.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD) + "\n" + json.dumps({**GOOD, **bad}) + "\n")
    out = tmp_path / "rm"
    with pytest.raises(SystemExit) as e:
        main(["rm", "--init", str(tmp_path / "init"), "--data", str(data), "--out", str(out), "--device", "cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{data}:4:" in err and f'field "{field}"' in err and words in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Exact resume


class Stop(Exception):
    pass


def test_rm_resume_is_exact(tmp_path: Path, monkeypatch) -> None:
    run = build_world_run(tmp_path, n_prompts=24, dropout=0.1, block_size=64)
    args = dict(data=[run["rankings"]], max_steps=6, checkpoint_interval=3, batch_size=4, lr=1e-3, warmup_steps=2,
                log_interval=1, eval_interval=2, val_fraction=0.25, device="cpu", max_length=64)
    call(rm_command, init=run["sft"], out=tmp_path / "full", **args)

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 3:
            raise Stop
        return path

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(rm_command, init=run["sft"], out=tmp_path / "split", **args)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "done.json").exists()
    with pytest.raises(UserError, match="--resume"):  # an unfinished run is continued, never overwritten
        call(rm_command, init=run["sft"], out=tmp_path / "split", **args)
    call(rm_command, init=run["sft"], out=tmp_path / "split", resume=True, **args)

    full, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "split"))
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("full", "split")]
    assert metrics[0] == metrics[1]
    # a finished run: refused without --resume, nothing to do with it
    with pytest.raises(UserError, match="finished"):
        call(rm_command, init=run["sft"], out=tmp_path / "split", **args)
    assert call(rm_command, init=run["sft"], out=tmp_path / "split", resume=True, **args)["steps"] == 6


# ----------------------------------------------------------------------------------------------------
# The command line: a recipe file, flags on top of it


def test_rm_from_a_recipe_file_and_a_flag(tmp_path: Path) -> None:
    run = build_world_run(tmp_path, n_prompts=16, block_size=64)
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"""\
init: {run["sft"]}
data: [{run["rankings"]}]
out: {tmp_path / "rm"}
val-fraction: 0.25
max_length: 64
lr: 5e-4
max-steps: 2
batch_size: 4
train:
  warmup_steps: 1
  grad_clip: 0.5
device: cpu
""")
    main(["rm", "--config", str(recipe), "--lr", "3e-4"])
    args = json.loads((tmp_path / "rm" / "args.json").read_text())
    assert args["init"] == str(run["sft"]) and args["data"] == [str(run["rankings"])]
    assert args["val_fraction"] == 0.25 and args["max_length"] == 64 and args["demos"] is None
    t = args["train"]
    assert t["lr"] == 3e-4  # the flag beats the file
    assert (t["max_steps"], t["batch_size"], t["warmup_steps"], t["grad_clip"], t["device"]) == (2, 4, 1, 0.5, "cpu")
    assert (t["weight_decay"], t["checkpoint_interval"], t["seed"]) == (0.0, 500, 1337)  # the stage's defaults
    done = json.loads((tmp_path / "rm" / "done.json").read_text())
    assert done["steps"] == 2 and done["val_prompts"] == 4
    rows = [json.loads(line) for line in open(tmp_path / "rm" / "metrics.jsonl")]
    assert rows[0]["lr"] == pytest.approx(3e-4)  # step 0 is the end of a 1-step warm-up


def test_rm_defaults() -> None:
    """The shared settings keep the defaults rm_command had as keyword arguments (and its hard-coded betas and
    gradient clip), whatever TrainConfig's own defaults are: the pipeline's figures depend on them."""
    t = RMArgs(init=Path("sft"), data=[Path("r.jsonl")], out=Path("rm")).train
    assert (t.batch_size, t.grad_accum, t.lr, t.min_lr, t.warmup_steps, t.max_steps, t.weight_decay) == (
        8, 1, 1e-4, None, 10, None, 0.0)
    assert (t.beta1, t.beta2, t.grad_clip) == (0.9, 0.95, 1.0)
    assert (t.log_interval, t.eval_interval, t.checkpoint_interval, t.keep_last, t.seed) == (10, None, 500, 2, 1337)
    assert (t.device, t.dtype, t.compile, t.fsdp, t.resume, t.report_to) == ("auto", "auto", None, False, False, "none")


def test_rm_recipe_with_a_misspelled_key_fails(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "rm.yaml"
    recipe.write_text(f"init: {tmp_path}\ndata: [{tmp_path / 'r.jsonl'}]\nout: {tmp_path / 'rm'}\nval-fracton: 0.2\n")
    with pytest.raises(SystemExit) as e:
        main(["rm", "--config", str(recipe)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "val-fracton" in err and str(recipe) in err and "val-fraction" in err, err
    assert not (tmp_path / "rm").exists()


def test_all_pairs_of_a_ranking() -> None:
    c = Comparison([{"role": "user", "content": "x"}], ["a", "b", "c", "d"], [2, 0, 3, 1])
    assert sorted(c.pairs()) == sorted((c.ranking[i], c.ranking[j]) for i, j in itertools.combinations(range(4), 2))


def test_a_non_finite_bias_shift_is_refused() -> None:
    """Centring the reward on a NaN mean would make every reward NaN: the stage stops instead (audit F29)."""
    from instructgpt.rm import normalise_bias
    from instructgpt.train import DivergedError

    tok = Tokenizer.train_char(["hello world, hi"])
    rm = tiny_scalar(V=tok.vocab_size)
    assert normalise_bias(rm, tok, [[{"role": "user", "content": "hi"}]], ["hello"]) != 0
    with torch.no_grad():
        rm.score_head.weight.fill_(float("nan"))
    bias = rm.score_head.bias.clone()
    with pytest.raises(DivergedError, match="mean score on the 1 responses .* is nan"):
        normalise_bias(rm, tok, [[{"role": "user", "content": "hi"}]], ["hello"])
    assert torch.equal(rm.score_head.bias, bias)
