"""LoRA and the memory levers in the training stages (sft, rm, dpo; pretrain's activation checkpointing): only the
adapters (and a reward model's head) train, and the exported model is --init plus the merged delta, weight by
weight; DPO's reference is the policy with its adapters off, exactly a separate copy of --init; resume is exact;
the adapter exported for PEFT over the Hugging Face export of --init computes the stage's model; activation
checkpointing leaves the first step as it was; misuse fails naming the flag."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import one_thread_pool
from safetensors.torch import load_file
from test_pretrain import write_data
from test_rm import build_world_run

from instructgpt import dpo as dpo_module
from instructgpt import memory
from instructgpt.checkpoint import TRAINED, Checkpointer, load_model, save_model
from instructgpt.cli import main
from instructgpt.distributed import Runtime, mixed_precision
from instructgpt.dpo import dpo_command
from instructgpt.errors import UserError
from instructgpt.finetune import frozen, hold_in
from instructgpt.hf_export import export_command
from instructgpt.model import GPT, ModelConfig
from instructgpt.pretrain import pretrain_command
from instructgpt.recipe import call
from instructgpt.rm import rm_command
from instructgpt.sft import sft_command

COMMANDS = {"sft": sft_command, "rm": rm_command, "dpo": dpo_command}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    yield from one_thread_pool()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """World rankings and demonstrations, a GPT-2 style "SFT" model (dropout 0.1) and a Llama style one with
    the same tokenizer."""
    root = tmp_path_factory.mktemp("lora")
    run = build_world_run(root, n_prompts=12, block_size=64, dropout=0.1)
    torch.manual_seed(1)
    llama = GPT(ModelConfig.llama(vocab_size=run["tok"].vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                                  block_size=64, dropout=0.1))
    with torch.no_grad():  # norms away from 1, which would hide a mistake
        for name, p in llama.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.uniform_(0.5, 1.5)
    save_model(llama, root / "llama")
    shutil.copy(run["sft"] / "tokenizer.json", root / "llama" / "tokenizer.json")
    return {**run, "root": root, "inits": {"gpt2": run["sft"], "llama": root / "llama"}}


def stage_args(stage: str, world: dict, **kw) -> dict:
    """A few steps of a stage with LoRA rank 4 (alpha 8), checkpointed every 2 steps."""
    common = dict(init=world["sft"], lora_rank=4, lora_alpha=8.0, warmup_steps=1, checkpoint_interval=2, lr=1e-2,
                  log_interval=1, eval_interval=2, keep_last=0, device="cpu", max_steps=4)
    data = {"sft": dict(data=[world["demos"]], batch_size=4, val_fraction=0.1, dropout=0.1),
            "rm": dict(data=[world["rankings"]], demos=[world["demos"]], batch_size=2, val_fraction=0.25),
            "dpo": dict(data=[world["rankings"]], batch_size=4, val_fraction=0.25, dropout=True)}[stage]
    return {**common, **data, **kw}


def weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / name))


def lora_names(trained: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.removesuffix(".lora_A") for k in trained if k.endswith(".lora_A")})


def assert_merged(out: dict, base: dict, trained: dict, scale: float) -> None:
    """Every exported weight is --init's, but each adapted layer's, which is W + scale B A (B A summed in fp32)."""
    adapted = lora_names(trained)
    assert adapted and all(trained[f"{n}.lora_B"].abs().sum() > 0 for n in adapted)  # the adapters did train
    for key, value in out.items():
        layer = key.removesuffix(".weight")
        if layer in adapted:
            A, B = trained[f"{layer}.lora_A"], trained[f"{layer}.lora_B"]
            expected = (base[key].float() + (B.float() @ A.float()) * scale).to(base[key].dtype)
            assert torch.equal(value, expected), key
            assert not torch.equal(value, base[key]), key
        elif not key.startswith("score_head."):
            assert torch.equal(value, base[key]), key


# ----------------------------------------------------------------------------------------------------
# Only the adapters train; the exported model is merged


@pytest.fixture(scope="module")
def lora_sft(world: dict) -> dict:
    """SFT with LoRA from each init; the exported model is chosen by validation loss (best/)."""
    outs = {}
    for family, init in world["inits"].items():
        out = world["root"] / f"sft_{family}"
        call(sft_command, **stage_args("sft", world, init=init, out=out))
        outs[family] = out
    return outs


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_sft_trains_only_adapters_and_exports_them_merged(world: dict, lora_sft: dict, family: str) -> None:
    out = lora_sft[family]
    base, exported = weights(world["inits"][family]), weights(out)
    assert exported.keys() == base.keys()  # a plain model: no adapter keys
    best = json.loads((out / "best" / "best.json").read_text())
    trained = weights(out / "best", TRAINED)  # the chosen step's adapters
    step = weights(out / "checkpoints" / f"step_{best['step']:07d}" / "model")
    assert step.keys() == trained.keys() and all(torch.equal(step[k], trained[k]) for k in step)
    assert all(k.endswith((".lora_A", ".lora_B")) for k in step)  # step checkpoints hold the adapters only
    optim = torch.load(out / "checkpoints" / "step_0000004" / "state" / "optim_optimizer.pt", weights_only=True)
    assert len(optim["state"]) == len(step)  # and their optimizer state only
    assert_merged(exported, base, trained, scale=8.0 / 4)
    published = weights(out / "best")  # what chat and serve would read of best/: the same merged model
    assert published.keys() == exported.keys() and all(torch.equal(published[k], exported[k]) for k in exported)
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["rank"] == 4 and config["lora"]["base"] == str(world["inits"][family].resolve())
    peft = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (peft["r"], peft["lora_alpha"], peft["base_model_name_or_path"]) == (4, 8.0, config["lora"]["base"])


def test_lora_rm_trains_the_trunk_adapters_and_the_head(world: dict, tmp_path: Path) -> None:
    call(rm_command, **stage_args("rm", world, out=tmp_path / "rm"))
    base, exported = weights(world["sft"]), weights(tmp_path / "rm")
    trained = weights(tmp_path / "rm" / "checkpoints" / "step_0000004" / "model")
    assert {k for k in trained if not k.endswith((".lora_A", ".lora_B"))} == {"score_head.weight", "score_head.bias"}
    assert exported.keys() == {k for k in base if not k.startswith("lm_head.")} | {"score_head.weight",
                                                                                    "score_head.bias"}
    assert_merged(exported, base, trained, scale=8.0 / 4)
    assert torch.equal(exported["score_head.weight"], trained["score_head.weight"])
    # the bias is the trained one, shifted so the demonstrations score 0 on average
    shift = json.loads((tmp_path / "rm" / "done.json").read_text())["bias_shift"]
    assert exported["score_head.bias"].item() == pytest.approx(trained["score_head.bias"].item() - shift, abs=1e-5)
    assert not (tmp_path / "rm" / "adapter").exists()  # PEFT's adapter could not hold the head
    load_model(tmp_path / "rm", kind="scalar")  # a plain reward model


# ----------------------------------------------------------------------------------------------------
# DPO: the reference is the policy with its adapters off


def test_lora_dpo_reference_is_the_policy_with_adapters_off(world: dict, tmp_path: Path, monkeypatch) -> None:
    """The must-hold: the reference of a LoRA run is the policy with its adapters off, exactly a separate copy
    of --init, even once the adapters have trained: the training pairs are scored when a batch first needs them
    (mid-run), with the adapters off in one run and by a copy of --init in its twin; the steps are the same bit
    for bit. And a LoRA run loads --init once: no second model."""
    loads = []
    real_load = dpo_module.load_model
    monkeypatch.setattr(dpo_module, "load_model", lambda *a, **k: (loads.append(a), real_load(*a, **k))[1])
    args = stage_args("dpo", world, max_steps=4, checkpoint_interval=4)
    call(dpo_command, **args, out=tmp_path / "default")
    assert len(loads) == 1  # the policy; no reference copy

    def scored_lazily(copy: bool):
        def score_reference(a, run):  # the held-out pairs now; each training pair when a batch needs it
            if copy:  # the slow, obviously right twin: the reference loaded as a separate model
                with torch.random.fork_rng():  # building it draws initial weights: keep the dropout masks
                    run.ref = real_load(a.init, kind="gpt").requires_grad_(False)
            dpo_module.score_pairs(a, run, run.val)
        return score_reference

    for name in ("off", "copy"):
        monkeypatch.setattr(dpo_module, "score_reference", scored_lazily(name == "copy"))
        call(dpo_command, **args, out=tmp_path / name)
    off, copy = weights(tmp_path / "off"), weights(tmp_path / "copy")
    assert all(torch.equal(off[k], copy[k]) for k in off)
    rows = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("off", "copy")]
    assert rows[0] == rows[1]
    assert not all(torch.equal(off[k], weights(world["sft"])[k]) for k in off)  # and the policy did move


# ----------------------------------------------------------------------------------------------------
# Exact resume


class Stop(Exception):
    pass


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_lora_resume_is_exact(world: dict, tmp_path: Path, monkeypatch, stage: str) -> None:
    command, args = COMMANDS[stage], stage_args(stage, world, lora_dropout=0.1)
    call(command, **args, out=tmp_path / "full")

    real_save = Checkpointer.save

    def save_then_stop(self, step, *a, **k):
        path = real_save(self, step, *a, **k)
        if step == 2:
            raise Stop
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_stop)
    with pytest.raises(Stop):
        call(command, **args, out=tmp_path / "split")
    monkeypatch.undo()
    with pytest.raises(UserError, match="--lora-rank"):  # the adapters' settings are the run's
        call(command, **{**args, "lora_rank": 8}, out=tmp_path / "split", resume=True)
    with pytest.raises(UserError, match="--lora-alpha"):
        call(command, **{**args, "lora_alpha": 4.0}, out=tmp_path / "split", resume=True)
    with pytest.raises(UserError, match="--lora-targets"):
        call(command, **{**args, "lora_targets": ["attn"]}, out=tmp_path / "split", resume=True)
    call(command, **args, out=tmp_path / "split", resume=True, activation_checkpointing=True)  # may change

    full, split = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert full.keys() == split.keys() and all(torch.equal(full[k], split[k]) for k in full)
    metrics = [(tmp_path / d / "metrics.jsonl").read_text() for d in ("full", "split")]
    assert metrics[0] == metrics[1]
    if stage != "rm":
        adapters = [weights(tmp_path / d / "adapter", "adapter_model.safetensors") for d in ("full", "split")]
        assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_lora_on_two_ranks_matches_one_process_and_fsdp_resumes_exactly(world: dict, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """torchrun, 2 ranks with half the batch each: SFT and the reward model sharded (FSDP2, adapters and head
    as DTensors, the reward's bias shifted on its shard), DPO under DDP; then an FSDP run resumed from its
    checkpoint ends on the same bytes."""
    from test_distributed import assert_close_weights, flags, metrics, stop_after_checkpoint, torchrun

    from instructgpt import distributed

    monkeypatch.setattr(distributed, "default_threads", lambda: 1)
    init = tmp_path / "init"  # without dropout, whose masks differ between one process and two
    model = load_model(world["sft"])
    model.config.dropout = 0.0
    save_model(model, init)
    shutil.copy(world["sft"] / "tokenizer.json", init / "tokenizer.json")
    for stage, launch in (("sft", ["--fsdp"]), ("rm", ["--fsdp"]), ("dpo", [])):
        args = stage_args(stage, world, init=init, max_steps=3, eval_interval=3)
        args.update({"sft": {"dropout": 0.0}, "dpo": {"dropout": False}}.get(stage, {}))
        call(COMMANDS[stage], **{**args, "batch_size": 2 * args["batch_size"]}, out=tmp_path / f"{stage}1")
        torchrun(stage, *flags(**{k: v for k, v in args.items() if v is not False}, out=tmp_path / f"{stage}2"),
                 *launch)
        losses = [[r["loss"] for r in metrics(tmp_path / f"{stage}{n}") if "loss" in r] for n in (1, 2)]
        assert losses[1] == pytest.approx(losses[0], rel=1e-5), stage
        # the reward model's final norm bias gets rounding noise for a gradient, which Adam scales to lr-sized steps
        assert_close_weights(tmp_path / f"{stage}1", tmp_path / f"{stage}2", atol=1e-4 if stage == "rm" else 1e-5)
    resumed = tmp_path / "rm2_resumed"
    stop_after_checkpoint(tmp_path / "rm2", resumed, 2)
    args = stage_args("rm", world, init=init, max_steps=3, eval_interval=3)
    torchrun("rm", *flags(**args, out=resumed), "--fsdp", "--resume")
    assert_close_weights(tmp_path / "rm2", resumed, atol=0)


# ----------------------------------------------------------------------------------------------------
# The adapter over the Hugging Face export of --init computes the stage's model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_export_hf_adapter_loads_in_peft_and_computes_the_stage_model(world: dict, lora_sft: dict, tmp_path: Path,
                                                                       family: str) -> None:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from instructgpt.model import positions_from_mask

    transformers.logging.set_verbosity_error()
    src = lora_sft[family]
    main(["export-hf", "--src", str(src), "--out", str(tmp_path / "hf"), "--adapter"])
    config = json.loads((tmp_path / "hf" / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    adapted = peft.PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    ours = load_model(src).eval()  # the merged stage model

    idx = torch.randint(0, world["tok"].vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(idx)
    mask[1, :5] = 0
    with torch.no_grad():
        theirs = adapted(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        mine = ours(idx, mask)[..., : theirs.size(-1)]
        real = mask.bool()
        torch.testing.assert_close(theirs[real], mine[real], atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter():  # without the adapter: --init, which the stage moved away from
            base = adapted(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        assert not torch.allclose(base[real], theirs[real], atol=1e-3)


def test_export_hf_adapter_refuses_what_it_cannot_give(world: dict, lora_sft: dict, tmp_path: Path) -> None:
    call(sft_command, **stage_args("sft", world, lora_rank=0, max_steps=1), out=tmp_path / "full")
    with pytest.raises(UserError, match="--adapter: .* was not trained with LoRA"):
        export_command(tmp_path / "full", tmp_path / "hf", adapter=True)
    src = tmp_path / "stage"
    shutil.copytree(lora_sft["gpt2"], src)
    record = json.loads((src / "config.json").read_text())
    base = tmp_path / "base"
    shutil.copytree(world["inits"]["gpt2"], base)
    record["lora"]["base"] = str(base)
    (src / "config.json").write_text(json.dumps(record))
    export_command(src, tmp_path / "hf", adapter=True)  # the same files elsewhere: fine
    torch.manual_seed(5)
    save_model(GPT(load_model(base).config), base)  # other weights under the same name
    with pytest.raises(UserError, match="model.safetensors changed since"):
        export_command(src, tmp_path / "hf2", adapter=True)


# ----------------------------------------------------------------------------------------------------
# Activation checkpointing: the same first step, in every training stage


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "dpo"])
def test_activation_checkpointing_gives_the_same_first_step(world: dict, tmp_path: Path, monkeypatch,
                                                            stage: str) -> None:
    if stage == "pretrain":
        command, args = pretrain_command, dict(data=write_data(tmp_path / "data", train_tokens=5000), n_layer=2,
                                               n_head=2, n_embd=32, block_size=16, batch_size=4, dropout=0.1,
                                               warmup_steps=1, log_interval=1, samples=0, device="cpu")
    else:
        command, args = COMMANDS[stage], stage_args(stage, world, lora_rank=0)
    args = {**args, "max_steps": 1, "eval_interval": 1}
    recomputed = []
    real = memory.checkpoint
    monkeypatch.setattr(memory, "checkpoint", lambda *a, **k: (recomputed.append(1), real(*a, **k))[1])
    call(command, **args, out=tmp_path / "off")
    assert not recomputed
    call(command, **args, out=tmp_path / "on", activation_checkpointing=True)
    assert recomputed  # the blocks did go through torch.utils.checkpoint
    rows = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("off", "on")]
    for key in ("loss", "grad_norm"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-6, abs=1e-7), key
    off, on = weights(tmp_path / "off"), weights(tmp_path / "on")
    for k in off:
        torch.testing.assert_close(on[k], off[k], atol=1e-6, rtol=0, msg=k)


# ----------------------------------------------------------------------------------------------------
# The flags: in every stage's --help, args.json and recipe files; misuse named


@pytest.mark.parametrize("stage", ["pretrain", "sft", "rm", "dpo", "ppo"])
def test_every_training_stage_has_the_flags(stage: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main([stage, "--help"])
    out = capsys.readouterr().out
    for flag in ("--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-targets", "--activation-checkpointing"):
        assert flag in out, flag


def test_the_flags_in_a_recipe_file_and_args_json(world: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "sft.yaml"
    recipe.write_text(f"init: {world['sft']}\ndata: [{world['demos']}]\nout: {tmp_path / 'sft'}\nlora-rank: 2\n"
                      "train:\n  lora_targets: [qkv_proj, proj]\n  activation_checkpointing: true\n"
                      "max_steps: 1\nbatch_size: 2\ndevice: cpu\n")
    main(["sft", "--config", str(recipe), "--lora-dropout", "0.05"])
    saved = json.loads((tmp_path / "sft" / "args.json").read_text())["train"]
    assert (saved["lora_rank"], saved["lora_alpha"], saved["lora_dropout"]) == (2, None, 0.05)
    assert saved["lora_targets"] == ["qkv_proj", "proj"] and saved["activation_checkpointing"] is True
    trained = weights(tmp_path / "sft" / "checkpoints" / "step_0000001" / "model")
    assert lora_names(trained) == [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.qkv_proj", "mlp.proj")]
    assert json.loads((tmp_path / "sft" / "config.json").read_text())["lora"]["alpha"] == 4.0  # None: 2 x rank


@pytest.mark.parametrize("flags, words", [
    (dict(lora_rank=-1), "--lora-rank must be >= 0"),
    (dict(lora_rank=4, lora_targets=["attention"]), "--lora-targets: unknown target 'attention'"),
    (dict(lora_rank=4, lora_targets=["k_proj"]), "--lora-targets: 'k_proj' is part of the fused 'qkv_proj'"),
    (dict(lora_rank=4, lora_targets=["q_proj"]), "--lora-targets q_proj: LoRA targets 'q_proj' match no layer"),
    (dict(lora_rank=4, lora_alpha=0.0), "--lora-alpha must be positive"),
    (dict(lora_rank=4, lora_dropout=1.0), "--lora-dropout must be in"),
])
@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_misuse_is_a_user_error_naming_the_flag(world: dict, tmp_path: Path, stage: str, flags: dict,
                                                 words: str) -> None:
    with pytest.raises(UserError, match=words):
        call(COMMANDS[stage], **{**stage_args(stage, world), **flags, "max_steps": 1}, out=tmp_path / "out")


def test_pretrain_refuses_lora(tmp_path: Path, capsys) -> None:
    data = write_data(tmp_path / "data", train_tokens=2000)
    with pytest.raises(SystemExit) as e:
        main(["pretrain", f"--data={data}", f"--out={tmp_path / 'out'}", "--lora-rank", "4", "--device", "cpu"])
    assert e.value.code == 2 and "--lora-rank 4: pretraining trains every weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------
# Memory: frozen models in bf16 on CUDA, FSDP's mixed precision


def tiny_llama() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.llama(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))


def runtime(device: str, dtype: torch.dtype) -> Runtime:
    return Runtime(device=torch.device(device), dtype=dtype, autocast=lambda: torch.autocast("cpu", dtype))


def test_a_frozen_model_is_bf16_only_with_bf16_on_cuda() -> None:
    model = frozen(tiny_llama(), runtime("cpu", torch.bfloat16))
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters()) and not model.training
    model = frozen(tiny_llama(), runtime("cuda", torch.float32))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    reference = tiny_llama().eval()
    model = frozen(tiny_llama(), runtime("cuda", torch.bfloat16))  # the CUDA branch: only the cast happens here
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.transformer.inv_freq.dtype == torch.float32  # RoPE's frequencies keep fp32
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):  # computes, close to the fp32 model
        logp, expected = (torch.log_softmax(m(idx).float(), -1) for m in (model, reference))
    assert (logp - expected).abs().max() < 0.1


def test_hold_in_keeps_tied_weights_tied() -> None:
    torch.manual_seed(0)
    model = hold_in(GPT(ModelConfig(vocab_size=97, block_size=32, n_layer=1, n_head=2, n_embd=16,
                                    tie_embeddings=True)), torch.bfloat16)
    assert model.lm_head.weight is model.transformer.wte.weight and model.lm_head.weight.dtype == torch.bfloat16


def test_fsdp_mixed_precision_is_bf16_on_cuda_only() -> None:
    policy = mixed_precision(runtime("cuda", torch.bfloat16))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision(runtime("cuda", torch.float32)) is None
    assert mixed_precision(runtime("cpu", torch.bfloat16)) is None


def test_trained_only_checkpoints_round_trip(tmp_path: Path) -> None:
    """The Checkpointer of a LoRA run: steps hold the adapters, best/ the merged model and the adapters."""
    from instructgpt.finetune import checkpoint_weights
    from instructgpt.lora import LoRAConfig, apply_lora

    cfg = LoRAConfig(rank=2)
    model = tiny_llama()
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    ckpt = Checkpointer(tmp_path / "run", weights=checkpoint_weights(cfg))
    step = ckpt.save(1, {"model": model}, {}, {"step": 1})
    best = ckpt.save_best(model, {"step": 1})
    assert all(k.endswith(("lora_A", "lora_B")) for k in weights(step / "model"))
    assert json.loads((step / "model" / "config.json").read_text())["weights"].startswith("trained tensors only")
    idx = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model.eval()(idx)
        torch.testing.assert_close(load_model(best).eval()(idx), expected, atol=1e-5, rtol=0)  # merged
        for load in (lambda m: ckpt.load(step, {"model": m}, {}), ckpt.load_best):
            again = tiny_llama()
            apply_lora(again, cfg)
            load(again)
            assert torch.equal(again.eval()(idx), expected)
    other = tiny_llama()
    apply_lora(other, LoRAConfig(rank=2, targets=("attn",)))
    with pytest.raises(UserError, match="unexpected key.*mlp"):
        ckpt.load(step, {"model": other}, {})
