"""DPO: the loss against hand-computed values, sequence log-probabilities against a loop, learning on world
rankings, reference log-probabilities computed once, per-step metrics, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import one_thread_pool
from safetensors.torch import load_file
from test_rm import build_world_run  # the small world run: labeler rankings and a fresh tiny model

from instructgpt import dpo as dpo_module
from instructgpt.batching import IGNORE
from instructgpt.batching import pad_labelled as pad
from instructgpt.chat import render_prompt, render_response
from instructgpt.checkpoint import Checkpointer
from instructgpt.cli import main
from instructgpt.dpo import DPOArgs, dpo_command, encode
from instructgpt.errors import UserError
from instructgpt.losses import dpo_loss, sequence_logprobs
from instructgpt.model import GPT, ModelConfig
from instructgpt.recipe import build, call
from instructgpt.tokenizer import Tokenizer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (see test_rm.py)."""
    yield from one_thread_pool()


def test_dpo_loss_by_hand() -> None:
    # log pi(y_w) = -5, log pi(y_l) = -7, both -6 under the reference, beta = 0.1:
    # r_w = 0.1 * (-5 + 6) = 0.1, r_l = 0.1 * (-7 + 6) = -0.1, loss = -log sigmoid(0.2) = log(1 + e^-0.2)
    loss, chosen, rejected = dpo_loss(torch.tensor([-5.0, -6.0]), torch.tensor([-7.0, -6.0]),
                                      torch.tensor([-6.0, -6.0]), torch.tensor([-6.0, -6.0]), beta=0.1)
    assert loss.tolist() == pytest.approx([math.log1p(math.exp(-0.2)), math.log(2)], abs=1e-6)
    assert loss[0].item() == pytest.approx(0.5981388693, abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, 0.0]) and rejected.tolist() == pytest.approx([-0.1, 0.0])
    # the gradient pushes log pi(y_w) up and log pi(y_l) down by beta * sigmoid(-(r_w - r_l))
    pi_w, pi_l = torch.tensor([-5.0], requires_grad=True), torch.tensor([-7.0], requires_grad=True)
    dpo_loss(pi_w, pi_l, torch.tensor([-6.0]), torch.tensor([-6.0]), 0.1)[0].sum().backward()
    g = 0.1 * (1 - 1 / (1 + math.exp(-0.2)))
    assert pi_w.grad.item() == pytest.approx(-g) and pi_l.grad.item() == pytest.approx(g)


def test_sequence_logprobs_match_a_loop_over_response_tokens() -> None:
    tok = Tokenizer.train_char(["abcdefgh ?."])
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=32)).eval()
    prompts = [[{"role": "user", "content": "abc?"}], [{"role": "user", "content": "h"}]]
    replies = ["def.", "gg hh ab."]
    rows = [encode(tok, p, r, 32) for p, r in zip(prompts, replies)]
    got = sequence_logprobs(model, pad(rows, tok.pad_id))
    for i, (p, r) in enumerate(zip(prompts, replies)):
        full = render_prompt(tok, p) + render_response(tok, r)
        logp = F.log_softmax(model(torch.tensor([full])), -1)[0]  # (T, V)
        n_p = len(render_prompt(tok, p))
        want = sum(logp[t - 1, full[t]] for t in range(n_p, len(full)))  # reply tokens and the end token
        assert got[i].item() == pytest.approx(want.item(), abs=1e-4)


def test_encode_labels_only_the_reply_and_its_end() -> None:
    tok = Tokenizer.train_char(["abcdefgh ?."])
    prompt = [{"role": "user", "content": "abc?"}]
    ids, labels = encode(tok, prompt, "de.", 64)
    full = render_prompt(tok, prompt) + render_response(tok, "de.")
    assert ids == full[:-1] and labels[-4:] == full[-4:] and labels[-1] == tok.eos_id
    assert all(x == IGNORE for x in labels[:-4])
    _, cut = encode(tok, prompt, "de.", 64, ended=False)  # a reply cut at max_new_tokens has no end token
    assert [x for x in cut if x != IGNORE] == tok.encode("de.")
    ids, labels = encode(tok, prompt, "de.", 5)  # too long: the prompt loses its oldest tokens
    assert len(ids) == 5 and labels[-4:] == full[-4:]


# ----------------------------------------------------------------------------------------------------
# Learning on world rankings, with the reference computed once


@pytest.fixture(scope="module")
def world_dpo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("world_dpo")
    run = build_world_run(root, n_prompts=200)
    rows = {"ref_rows": 0}
    real_load = dpo_module.load_model

    def counting_load(*a, **k):  # the second model loaded is the reference: count the rows it scores
        model = real_load(*a, **k)
        if counting_load.calls == 1:
            model.register_forward_hook(lambda m, args, out: rows.__setitem__("ref_rows", rows["ref_rows"] + len(out)))
        counting_load.calls += 1
        return model

    counting_load.calls = 0
    patch = pytest.MonkeyPatch()
    patch.setattr(dpo_module, "load_model", counting_load)
    summary = call(dpo_command, init=run["sft"], data=[run["rankings"]], out=root / "dpo", val_fraction=0.2,
                   epochs=1.0, batch_size=16, lr=1e-3, warmup_steps=4, eval_interval=50, device="cpu")
    patch.undo()
    return {**run, "out": root / "dpo", "summary": summary, "ref_rows": rows["ref_rows"],
            "models_loaded": counting_load.calls}


def test_dpo_raises_heldout_preference_accuracy(world_dpo: dict) -> None:
    s = world_dpo["summary"]
    # 160 training prompts x 10 pairs, 1 epoch (100 steps); 40 held-out prompts (400 pairs). At step 0
    # policy == reference, so every implicit reward is 0 and the accuracy is 0.5 (ties count half). After:
    # 0.68 here, 0.63-0.67 over seeds 1-2.
    assert s["pairs"] == 1600 and s["val_pairs"] == 400
    assert s["val_accuracy_before"] == 0.5
    assert s["val_accuracy_after"] > 0.6, s
    assert s["val_margin_after"] > 0


def test_reference_logprobs_are_computed_once(world_dpo: dict) -> None:
    s = world_dpo["summary"]
    assert world_dpo["models_loaded"] == 2  # the policy and the reference
    # each chosen and rejected row once, training and held-out, over 100 steps and 4 evaluations
    assert world_dpo["ref_rows"] == 2 * (s["pairs"] + s["val_pairs"])


def test_a_short_run_scores_only_the_pairs_it_visits(world_dpo: dict, tmp_path: Path, monkeypatch) -> None:
    """3 steps of 16 pairs out of 1600: the reference scores those 48 pairs (and the held-out ones), not all;
    the steps see the same pairs and losses as the first 3 steps of the full epoch run."""
    scored = []
    real = dpo_module.reference_logprobs
    monkeypatch.setattr(dpo_module, "reference_logprobs", lambda ref, pairs, *a, **k: (
        scored.append(len(pairs)), real(ref, pairs, *a, **k))[1])
    call(dpo_command, init=world_dpo["sft"], data=[world_dpo["rankings"]], out=tmp_path / "short", val_fraction=0.2,
         max_steps=3, batch_size=16, lr=1e-3, warmup_steps=4, eval_interval=50, device="cpu")
    assert scored == [48, world_dpo["summary"]["val_pairs"]]
    short = [json.loads(line) for line in open(tmp_path / "short" / "metrics.jsonl")]
    full = [json.loads(line) for line in open(world_dpo["out"] / "metrics.jsonl")][:3]
    assert [r["loss"] for r in short] == pytest.approx([r["loss"] for r in full], abs=1e-6)


def test_dpo_logs_reward_metrics_every_step(world_dpo: dict) -> None:
    rows = [json.loads(line) for line in open(world_dpo["out"] / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, world_dpo["summary"]["steps"] + 1))
    for r in rows:
        assert {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margins"} <= r.keys()
        assert r["rewards/margins"] == pytest.approx(r["rewards/chosen"] - r["rewards/rejected"], abs=1e-5)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert evals and evals[-1]["step"] == world_dpo["summary"]["steps"]
    assert evals[-1]["eval/accuracy"] == world_dpo["summary"]["val_accuracy_after"]
    assert rows[-1]["rewards/accuracy"] > 0.5


# ----------------------------------------------------------------------------------------------------
# Exact resume


class Stop(Exception):
    pass


def test_dpo_resume_is_exact(tmp_path: Path, monkeypatch) -> None:
    run = build_world_run(tmp_path, n_prompts=12, block_size=64, dropout=0.1)
    args = dict(data=[run["rankings"]], max_steps=6, checkpoint_interval=3, batch_size=8, lr=1e-3, warmup_steps=2,
                eval_interval=2, val_fraction=0.25, device="cpu", dropout=True)
    call(dpo_command, init=run["sft"], out=tmp_path / "full", **args)

    real_save = Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 3:
            raise Stop
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(dpo_command, init=run["sft"], out=tmp_path / "split", **args)
    monkeypatch.undo()
    with pytest.raises(UserError, match="--resume"):  # an unfinished run is continued, never overwritten
        call(dpo_command, init=run["sft"], out=tmp_path / "split", **args)
    s = call(dpo_command, init=run["sft"], out=tmp_path / "split", resume=True, **args)

    full, split = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "split"))
    assert full.keys() == split.keys()
    for k in full:
        assert torch.equal(full[k], split[k]), k
    assert (tmp_path / "full" / "metrics.jsonl").read_text() == (tmp_path / "split" / "metrics.jsonl").read_text()
    assert s == {**json.loads((tmp_path / "full" / "done.json").read_text()), "seconds": s["seconds"]}

    # OUT/args.json is the resolved recipe: it reads back to the same arguments, and the split run's says --resume
    saved = json.loads((tmp_path / "split" / "args.json").read_text())
    assert saved["train"]["resume"] is True and saved["train"]["max_steps"] == 6 and saved["dropout"] is True
    assert build(DPOArgs, saved, "args.json") == build(DPOArgs, {**args, "init": run["sft"], "out": tmp_path / "split",
                                                                  "resume": True}, "the test")


# ----------------------------------------------------------------------------------------------------
# The command line: a recipe file, flags on top


def test_dpo_from_a_recipe_file_with_a_flag_on_top(tmp_path: Path) -> None:
    run = build_world_run(tmp_path, n_prompts=12, block_size=64)
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"init: {run['sft']}\ndata: [{run['rankings']}]\nout: {tmp_path / 'dpo'}\n"
                      "beta: 0.2\nval_fraction: 0.25\ntrain:\n  lr: 1e-3\n  batch-size: 4\n  max_steps: 2\n"
                      "grad_clip: 0.5\ndevice: cpu\n")
    main(["dpo", "--config", str(recipe), "--lr", "3e-4"])
    saved = json.loads((tmp_path / "dpo" / "args.json").read_text())
    assert saved["beta"] == 0.2 and saved["val_fraction"] == 0.25 and saved["data"] == [str(run["rankings"])]
    assert saved["train"]["lr"] == 3e-4  # the flag wins over the file
    assert (saved["train"]["batch_size"], saved["train"]["max_steps"], saved["train"]["grad_clip"]) == (4, 2, 0.5)
    assert saved["train"]["weight_decay"] == 0.0 and saved["train"]["warmup_steps"] == 10  # DPO's own defaults
    done = json.loads((tmp_path / "dpo" / "done.json").read_text())
    assert done["steps"] == 2 and done["beta"] == 0.2
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    assert rows[0]["lr"] == pytest.approx(3e-4 / 10)  # warm-up step 0 of 10, from the flag's lr


def test_a_misspelled_key_in_the_recipe_file_names_the_key_and_the_file(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"init: {tmp_path / 'sft'}\ndata: [{tmp_path / 'r.jsonl'}]\nout: {tmp_path / 'dpo'}\n"
                      "betta: 0.2\n")
    with pytest.raises(SystemExit) as e:
        main(["dpo", "--config", str(recipe)])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "'betta'" in err and str(recipe) in err and "'beta'" in err
    assert not (tmp_path / "dpo").exists()


def test_pairs_without_reference_logprobs_are_scored_when_a_batch_needs_them(tmp_path: Path, monkeypatch) -> None:
    """The replay of the sampler scores every pair a run visits, once; should it ever miss some (a resume with
    another per-step count, which the resume check now refuses first), a batch scores its missing pairs on the
    spot instead of failing with KeyError 'ref' (audit F22). Same run, up to the reference's batch shapes."""
    run = build_world_run(tmp_path, n_prompts=12, block_size=64)
    args = dict(data=[run["rankings"]], max_steps=4, batch_size=4, lr=1e-3, warmup_steps=2, val_fraction=0.25,
                device="cpu")
    call(dpo_command, init=run["sft"], out=tmp_path / "full", **args)

    def held_out_only(a, r):  # a replay that missed every training pair
        dpo_module.score_pairs(a, r, r.val)
        r.ref = None

    monkeypatch.setattr(dpo_module, "score_reference", held_out_only)
    call(dpo_command, init=run["sft"], out=tmp_path / "lazy", **args)
    full, lazy = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("full", "lazy"))
    for k in full:
        torch.testing.assert_close(lazy[k], full[k], atol=1e-6, rtol=0)
    losses = [[r["loss"] for r in map(json.loads, open(tmp_path / d / "metrics.jsonl"))] for d in ("full", "lazy")]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
