"""The SFT stage: the exact loss mask, packing, learning on the world, real data, exact resume, the
encoder-decoder path, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructgpt import checkpoint
from instructgpt import sft as sft_module
from instructgpt.batching import IGNORE, pack_batch
from instructgpt.chat import FewShot, render_prompt, replies
from instructgpt.checkpoint import load_model, save_model
from instructgpt.data import Example, read_examples, read_prompts
from instructgpt.errors import UserError
from instructgpt.evaluate import world_few_shot
from instructgpt.generate import SamplingParams, generate
from instructgpt.model import GPT, ModelConfig, Seq2Seq
from instructgpt.prepare import prepare_command
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import build, call, to_dict
from instructgpt.sft import SFTArgs, encode_all, encode_example, pad_batch, sft_command, sft_loss_sum
from instructgpt.tokenizer import Tokenizer
from instructgpt.world.command import world_command
from instructgpt.world.judge import summarise
from instructgpt.world.labeler import Labeler
from instructgpt.world.world import HELD_OUT_FAMILIES, World

TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,?!'\n"
SMALL = dict(n_layer=2, n_head=2, n_embd=64)


def char_tok() -> Tokenizer:
    return Tokenizer.train_char([TEXT])


def conv(*turns: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def world_score(model, tok: Tokenizer, world: Path, few_shot: bool, n: int | None = None) -> float:
    items = list(read_prompts(world / "prompts_eval.jsonl"))[:n]
    records = [{"prompt": p.messages[-1]["content"], "family": p.meta["family"], "meta": p.meta["meta"],
                "id": p.meta["id"]} for p in items]
    shots = world_few_shot(World.load(world)) if few_shot else None  # as the evaluation prompts a pretrained model
    answers = replies(model, tok, items, shots, max_new_tokens=24, batch_size=64)
    return summarise(Labeler.load(world), items, records, answers)["labeler_score"]


# ----------------------------------------------------------------------------------------------------
# A small world, its shards, and a briefly pretrained GPT, shared by the tests that train


@pytest.fixture(scope="module")
def world_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world_run")
    world_command(out=root / "world", seed=0, corpus_chars=60_000, n_sft=300, n_rm=1, n_rl=1, n_eval=44)
    prepare_command(inputs=[root / "world" / "corpus.txt"], out=root / "data", vocab_size=400)
    call(pretrain_command, data=root / "data", out=root / "pretrain", **SMALL, block_size=64, max_steps=40,
                     batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=40, eval_iters=2, samples=0,
                     checkpoint_interval=40)
    return root


# ----------------------------------------------------------------------------------------------------
# The loss mask


def test_loss_mask_is_exact_token_by_token() -> None:
    tok = char_tok()
    ex = Example(conv("hi", "yo.", "and?", "ok!", system="Be brief."))
    enc = encode_example(tok, ex, max_length=200)
    # The rendering written out by hand: (token ids, trained?) per piece, in order.
    pieces = [([tok.bos_id], False), ([tok.system_id], False), (tok.encode("Be brief.") + [tok.eos_id], False),
              ([tok.user_id], False), (tok.encode("hi") + [tok.eos_id], False),
              ([tok.assistant_id], False), (tok.encode("yo.") + [tok.eos_id], True),
              ([tok.user_id], False), (tok.encode("and?") + [tok.eos_id], False),
              ([tok.assistant_id], False), (tok.encode("ok!") + [tok.eos_id], True)]
    full = [t for ids, _ in pieces for t in ids]
    trained = [flag for ids, flag in pieces for _ in ids]
    assert enc.ids == full[:-1]
    assert len(enc.labels) == len(enc.ids)
    for t, label in enumerate(enc.labels):  # label t is the target of input t: the token at t + 1
        assert label == (full[t + 1] if trained[t + 1] else IGNORE), t
    targets = [x for x in enc.labels if x != IGNORE]
    assert targets == tok.encode("yo.") + [tok.eos_id] + tok.encode("ok!") + [tok.eos_id]
    assert enc.labels[-1] == tok.eos_id  # the end token of the last reply is trained
    assert tok.pad_id not in targets and tok.user_id not in targets and tok.assistant_id not in targets

    # padding is never trained and never attended: labels IGNORE, mask 0
    short = encode_example(tok, Example(conv("a", "b.")), max_length=200)
    batch = pad_batch([enc, short], tok.pad_id)
    n = len(short.ids)
    assert batch["labels"][1, n:].eq(IGNORE).all() and batch["attention_mask"][1, n:].eq(0).all()
    assert batch["ids"][1, n:].eq(tok.pad_id).all()
    assert batch["labels"][1, :n].tolist() == short.labels
    packed = pack_batch([enc, short], tok.pad_id, row_length=200)
    assert sorted(x for x in packed["labels"].flatten().tolist() if x != IGNORE) == sorted(
        x for x in enc.labels + short.labels if x != IGNORE)

    # seq2seq: the encoder reads the prompt, the decoder <|bos|> + reply, trained on reply + <|eos|>
    s2s = encode_example(tok, ex, max_length=200, seq2seq=True)
    assert s2s.src == render_prompt(tok, ex.messages[:-1])
    assert s2s.ids == [tok.bos_id] + tok.encode("ok!")
    assert s2s.labels == tok.encode("ok!") + [tok.eos_id]

    # a cut example loses its end token (and says so); one with no reply token left is dropped
    cut = encode_example(tok, ex, max_length=len(full) - 2)
    assert cut.truncated and cut.labels[-1] != tok.eos_id and not encode_example(tok, ex, 200).truncated
    assert encode_example(tok, ex, max_length=10) is None
    with pytest.raises(UserError, match="no example has a trainable reply within 10 tokens"):
        encode_all(tok, [ex], 10, False, "training data")


# ----------------------------------------------------------------------------------------------------
# Packing


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packing_equals_padding_and_isolates_examples(family: str) -> None:
    tok = char_tok()
    make = ModelConfig.llama if family == "llama" else ModelConfig.gpt2
    torch.manual_seed(0)
    model = GPT(make(vocab_size=tok.vocab_size, block_size=64, **SMALL)).eval()
    examples = [Example(conv("add 2 and 3", "5.")), Example(conv("Spell cat backwards.", "tac.")),
                Example(conv("hi", "Hello there, friend!")), Example(conv("Count to three.", "1 2 3."))]
    items = [encode_example(tok, ex, 64) for ex in examples]
    packed = pack_batch(items, tok.pad_id, row_length=64)
    assert packed["ids"].size(0) < len(items)  # several examples share a row
    seg, pos = packed["segment_ids"][0], packed["position_ids"][0]
    assert {0, 1} <= set(seg.tolist())
    assert all(pos[t] == 0 for t in range(len(seg)) if seg[t] >= 0 and (t == 0 or seg[t] != seg[t - 1]))

    with torch.no_grad():
        n = sum(int((torch.tensor(e.labels) != IGNORE).sum()) for e in items)
        packed_loss = float(sft_loss_sum(model, packed)) / n
        padded_loss = float(sft_loss_sum(model, pad_batch(items, tok.pad_id))) / n
        # each example alone, weighted by its number of target tokens
        alone = [(float(sft_loss_sum(model, pad_batch([e], tok.pad_id))), sum(x != IGNORE for x in e.labels))
                 for e in items]
        weighted = sum(s for s, _ in alone) / sum(k for _, k in alone)
        assert packed_loss == pytest.approx(weighted, abs=1e-5)
        assert padded_loss == pytest.approx(weighted, abs=1e-5)

        # changing example 0 changes nothing in example 1, which shares its row
        other = [encode_example(tok, Example(conv("mul 7 and 9", "5.")), 64)] + items[1:]
        assert len(other[0].ids) == len(items[0].ids)
        packed2 = pack_batch(other, tok.pad_id, row_length=64)
        assert torch.equal(packed2["segment_ids"], packed["segment_ids"])
        a = model(packed["ids"], position_ids=packed["position_ids"], segment_ids=packed["segment_ids"])
        b = model(packed2["ids"], position_ids=packed2["position_ids"], segment_ids=packed2["segment_ids"])
        first, second = seg == 0, seg == 1
        assert not torch.allclose(a[0, first], b[0, first])
        torch.testing.assert_close(a[0, second], b[0, second], rtol=0, atol=1e-6)
        # and example 1 inside the packed row has its logits when alone
        solo = model(torch.tensor([items[1].ids]))
        torch.testing.assert_close(a[0, second], solo[0], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Learning: the world


def test_sft_beats_the_few_shot_pretrained_model(world_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "sft"
    call(sft_command, init=world_run / "pretrain", data=[world_run / "world" / "sft_train.jsonl"], out=out,
                max_steps=120, batch_size=16, lr=3e-3, dropout=0.0, packing=True, select_by="labeler",
                world=world_run / "world", select_prompts=22, select_max_new_tokens=16, eval_interval=40)
    tok = Tokenizer.load(out / "tokenizer.json")
    pretrained = world_score(load_model(world_run / "pretrain"), tok, world_run / "world", few_shot=True)
    tuned = world_score(load_model(out), tok, world_run / "world", few_shot=False)
    print(f"labeler score on 44 held-out prompts: pretrained few-shot {pretrained:.3f}, SFT {tuned:.3f}")
    with capsys.disabled():
        print(f"\n[sft] labeler score: pretrained few-shot {pretrained:.3f}, SFT {tuned:.3f}")
    assert tuned > pretrained + 0.1

    # the exported model is the evaluation with the best labeler score; validation loss is logged too
    evals = [r for r in rows(out) if "labeler_score" in r]
    assert [r["step"] for r in evals] == [40, 80, 120] and all("val_loss" in r for r in evals)
    best = max(evals, key=lambda r: r["labeler_score"])
    done = json.loads((out / "done.json").read_text())
    assert done["selected_by"] == "labeler_score" and done["selected_step"] == best["step"]
    assert json.loads((out / "best" / "best.json").read_text())["value"] == best["labeler_score"]
    for k, v in weights(out / "best").items():
        assert torch.equal(weights(out)[k], v), k
    assert json.loads((out / "config.json").read_text())["model"]["dropout"] == 0.0


def test_selection_prompts_are_held_out_and_not_the_evaluation(world_run: Path) -> None:
    prompts, records = sft_module.selection_prompts(world_run / "world", 22, seed=0)
    evaluation = {p.messages[-1]["content"] for p in read_prompts(world_run / "world" / "prompts_eval.jsonl")}
    train = {e.messages[0]["content"] for e in read_examples(world_run / "world" / "sft_train.jsonl")}
    texts = [r["prompt"] for r in records]
    assert len(texts) == 22 and len(set(texts)) > 15
    assert not set(texts) & evaluation
    # the families whose content the world holds out never repeat a training prompt
    assert not {r["prompt"] for r in records if r["family"] in HELD_OUT_FAMILIES} & train
    assert [p.messages[-1]["content"] for p in prompts] == texts


# ----------------------------------------------------------------------------------------------------
# Exact resume


class Stop(Exception):
    pass


def test_resume_is_exact(world_run: Path, tmp_path: Path, monkeypatch) -> None:
    """8 steps with dropout, packing and pretraining windows == 4 steps, a crash, a resume and 4 more."""
    args = dict(init=world_run / "pretrain", data=[world_run / "world" / "sft_train.jsonl"], max_steps=8,
                batch_size=8, lr=1e-3, dropout=0.2, packing=True, ptx_fraction=0.2, ptx_data=world_run / "data",
                eval_interval=3, checkpoint_interval=2, log_interval=1)
    call(sft_command, out=tmp_path / "full", **args)

    real_save = checkpoint.Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 4:
            raise Stop
        return path

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(sft_command, out=tmp_path / "split", **args)
    monkeypatch.undo()
    assert not (tmp_path / "split" / "done.json").exists()
    with pytest.raises(UserError, match="unfinished SFT run; pass --resume"):
        call(sft_command, out=tmp_path / "split", **args)
    call(sft_command, out=tmp_path / "split", resume=True, **args)

    for folder in ("", "checkpoints/step_0000008/model", "best"):
        full, split = weights(tmp_path / "full" / folder), weights(tmp_path / "split" / folder)
        assert full.keys() == split.keys()
        for k in full:
            assert torch.equal(full[k], split[k]), (folder, k)
    assert rows(tmp_path / "full") == rows(tmp_path / "split")
    assert [r["step"] for r in rows(tmp_path / "full")] == list(range(0, 9))  # step 0: the initial val loss
    assert json.loads((tmp_path / "split" / "done.json").read_text())["steps"] == 8
    with pytest.raises(UserError, match="finished SFT run"):
        call(sft_command, out=tmp_path / "split", **args)
    done = json.loads((tmp_path / "split" / "done.json").read_text())
    assert call(sft_command, out=tmp_path / "split", resume=True, **args) == done  # finished: nothing to do
    assert (tmp_path / "split" / "done.json").is_file()


# ----------------------------------------------------------------------------------------------------
# The encoder-decoder: pretrain (prefix LM), fine-tune, generate


def test_seq2seq_pretrain_sft_generate(world_run: Path, tmp_path: Path) -> None:
    pre = tmp_path / "s2s_pretrain"
    call(pretrain_command, data=world_run / "data", out=pre, arch="seq2seq", **SMALL, block_size=48, max_steps=30,
                     batch_size=8, lr=3e-3, warmup_steps=5, eval_interval=15, eval_iters=2, samples=0,
                     checkpoint_interval=30)
    val = [r["val_loss"] for r in rows(pre) if "val_loss" in r]
    assert len(val) == 3 and val[2] < val[1] < val[0], val
    assert isinstance(load_model(pre), Seq2Seq)
    assert json.loads((pre / "config.json").read_text())["objective"] == "prefix_lm"

    out = tmp_path / "s2s_sft"
    call(sft_command, init=pre, data=[world_run / "world" / "sft_train.jsonl"], out=out, max_steps=30, batch_size=8,
                lr=3e-3, dropout=0.1, eval_interval=15)
    val = [r["val_loss"] for r in rows(out) if "val_loss" in r]
    assert val[-1] < val[0], val
    model, tok = load_model(out).eval(), Tokenizer.load(out / "tokenizer.json")

    # generation: the engine (encoder once, decoder with a KV cache) equals the slow twin that reruns the
    # whole decoder for every new token
    prompt = render_prompt(tok, conv("What is 3 + 4?"))
    fast = generate(model, [prompt], SamplingParams(max_new_tokens=12, temperature=0.0), tok.eos_id, tok.pad_id,
                    start_id=tok.bos_id).token_lists()[0]
    slow, tgt = [], [tok.bos_id]
    with torch.no_grad():
        for _ in range(12):
            nxt = int(model(torch.tensor([prompt]), torch.tensor([tgt]))[0, -1].argmax())
            slow.append(nxt)
            tgt.append(nxt)
            if nxt == tok.eos_id:
                break
    assert fast == slow
    # evaluation's replies work for it, with the chat template and few-shot
    for few_shot in (None, FewShot()):
        answers = replies(model, tok, list(read_prompts(world_run / "world" / "prompts_eval.jsonl"))[:6],
                          few_shot, max_new_tokens=12, batch_size=4)
        assert len(answers) == 6 and all(isinstance(text, str) for text, _ in answers)


# ----------------------------------------------------------------------------------------------------
# Real data


def _first_lines(src: Path, dst: Path, n: int) -> Path:
    with open(src) as f:
        dst.write_text("".join(next(f) for _ in range(n)))
    return dst


@pytest.mark.parametrize("name, rows_", [("t0_ag_news_classify.jsonl", 200), ("gsm8k_train.jsonl", 240)])
def test_sft_on_real_data(shared_data: Path, tmp_path: Path, name: str, rows_: int) -> None:
    data = _first_lines(shared_data / name, tmp_path / name, rows_)
    examples = read_examples(data)
    tok = Tokenizer.train_bpe((m["content"] for ex in examples for m in ex.messages), vocab_size=1024)
    max_length = 512  # every example fits: nothing is left out or cut
    torch.manual_seed(0)
    init = tmp_path / "init"
    save_model(GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=max_length, **SMALL)), init)
    tok.save(init)
    if name.startswith("t0"):  # "Business<|endoftext|>": the reader drops GPT-2's end text, we add <|eos|>
        enc = encode_example(tok, examples[0], max_length)
        assert [x for x in enc.labels if x != IGNORE] == tok.encode(" Business") + [tok.eos_id]  # space_after_role
    out = tmp_path / "sft"
    call(sft_command, init=init, data=[data], out=out, max_steps=12, batch_size=8, lr=3e-3, packing=True,
                val_fraction=0.1, eval_interval=6)
    val = [r["val_loss"] for r in rows(out) if "val_loss" in r]
    assert len(val) == 3 and val[2] < val[1] < val[0] < 7.5, val  # steps 0 (random init: ln 1024 = 6.9), 6, 12
    done = json.loads((out / "done.json").read_text())
    assert done["examples"] + done["val_examples"] == rows_
    assert (out / "tokenizer.json").is_file() and isinstance(load_model(out), GPT)


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_fails_clearly_and_writes_nothing(world_run: Path, tmp_path: Path) -> None:
    good = world_run / "world" / "sft_train.jsonl"
    init = world_run / "pretrain"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi", "completion": 3}\n')
    out = tmp_path / "out"
    cases = [
        (dict(init=init, data=[bad]), r'bad.jsonl:2: field "completion": expected a string, got int'),
        (dict(init=init, data=[tmp_path / "missing.jsonl"]), "missing.jsonl: no such file"),
        (dict(init=tmp_path / "nope", data=[good]), "--init .*nope: no such folder"),
        (dict(init=init, data=[good], ptx_fraction=0.1), "--ptx-fraction needs --ptx-data"),
        (dict(init=init, data=[good], ptx_fraction=1.0, ptx_data=world_run / "data"), r"must be in \[0, 1\)"),
        (dict(init=init, data=[good], select_by="labeler"), "--select-by labeler needs --world"),
        (dict(init=init, data=[good], world=tmp_path / "noworld", select_by="labeler"), "noworld"),
        (dict(init=world_run / "data", data=[good]), "no config.json"),
    ]
    # pretraining shards written with another tokenizer
    other = tmp_path / "other_data"
    prepare_command(inputs=[world_run / "world" / "corpus_heldout.txt"], out=other, vocab_size=300)
    cases.append((dict(init=init, data=[good], ptx_fraction=0.1, ptx_data=other), "another tokenizer"))
    # --packing on an encoder-decoder
    s2s = tmp_path / "s2s"
    tok = Tokenizer.load(init / "tokenizer.json")
    save_model(Seq2Seq(ModelConfig(vocab_size=tok.vocab_size, block_size=64, arch="seq2seq", **SMALL)), s2s)
    tok.save(s2s)
    cases.append((dict(init=s2s, data=[good], packing=True), "--packing is for decoder-only models"))
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            call(sft_command, out=out, max_steps=2, **kwargs)
        assert not out.exists(), (kwargs, message)

    # skip_invalid keeps the valid record and says how many were skipped
    with pytest.warns(UserWarning, match="skipped 1 invalid record"):
        call(sft_command, init=init, data=[bad], out=out, max_steps=1, skip_invalid=True, val_fraction=0.0)
    assert json.loads((out / "done.json").read_text())["examples"] == 1


def test_cli(world_run: Path, tmp_path: Path) -> None:
    from instructgpt.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sft", "--init", str(tmp_path / "nope"), "--data", "a.jsonl", "b.jsonl", "--out", str(tmp_path / "o"),
              "--packing", "--select-by", "labeler", "--world", str(world_run / "world")])
    assert e.value.code == 2
    main(["sft", "--init", str(world_run / "pretrain"), "--data", str(world_run / "world" / "sft_train.jsonl"),
          "--out", str(tmp_path / "o"), "--max-steps", "2", "--batch-size", "4", "--packing"])
    assert json.loads((tmp_path / "o" / "done.json").read_text())["steps"] == 2


def test_cli_recipe_file_with_a_flag_on_top(world_run: Path, tmp_path: Path) -> None:
    from instructgpt.cli import main

    out = tmp_path / "o"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"init: {world_run / 'pretrain'}\n"
                      f"data: [{world_run / 'world' / 'sft_train.jsonl'}]\n"
                      f"out: {out}\n"
                      "lr: 1e-3\n"
                      "max-steps: 2\n"
                      "packing: true\n"
                      "dropout: 0.1\n"
                      "train:\n  batch_size: 4\n  log_interval: 1\n")
    main(["sft", "--config", str(recipe), "--lr", "3e-4"])
    saved = json.loads((out / "args.json").read_text())
    assert saved["init"] == str(world_run / "pretrain")
    assert saved["data"] == [str(world_run / "world" / "sft_train.jsonl")]
    assert saved["packing"] is True and saved["dropout"] == 0.1 and saved["select_by"] == "loss"
    assert saved["train"]["lr"] == 3e-4  # the flag wins over the file
    assert (saved["train"]["max_steps"], saved["train"]["batch_size"], saved["train"]["log_interval"]) == (2, 4, 1)
    # SFT's own defaults for the shared settings; the computed ones stay None (resolved at run time)
    assert (saved["train"]["weight_decay"], saved["train"]["keep_last"], saved["train"]["seed"]) == (0.0, 2, 1337)
    assert saved["train"]["warmup_steps"] is None and saved["train"]["eval_interval"] is None
    # the run completed with the flag's learning rate (one warm-up step: step 0 has the peak lr)
    assert json.loads((out / "done.json").read_text())["steps"] == 2
    assert [r["lr"] for r in rows(out) if "lr" in r][0] == pytest.approx(3e-4)
    # args.json is itself a recipe: it rebuilds the same arguments
    assert to_dict(build(SFTArgs, saved, "args.json")) == saved


def test_cli_misspelled_recipe_key_names_the_key_and_the_file(world_run: Path, tmp_path: Path, capsys) -> None:
    from instructgpt.cli import main

    out = tmp_path / "o"
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"init: {world_run / 'pretrain'}\n"
                      f"data: [{world_run / 'world' / 'sft_train.jsonl'}]\n"
                      f"out: {out}\n"
                      "bacth-size: 4\n")
    with pytest.raises(SystemExit) as e:
        main(["sft", "--config", str(recipe), "--max-steps", "1"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "'bacth-size'" in err and str(recipe) in err and "'batch-size'" in err  # the key, the file, the fix
    assert not out.exists()
