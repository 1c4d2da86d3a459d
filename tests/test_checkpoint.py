import json
import os
import stat
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructgpt import checkpoint
from instructgpt.checkpoint import canonical_key, load_model, save_model
from instructgpt.errors import UserError
from instructgpt.model import GPT, ModelConfig, ScalarModel, Seq2Seq


def cfgs():
    kw = dict(vocab_size=70, block_size=16, n_layer=2, n_head=2, n_embd=16)
    return {
        "gpt2": (GPT, ModelConfig(**kw)),
        "llama": (GPT, ModelConfig.llama(n_kv_head=1, **kw)),
        "scalar": (ScalarModel, ModelConfig(**kw)),
        "seq2seq": (Seq2Seq, ModelConfig(arch="seq2seq", **kw)),
    }


@pytest.mark.parametrize("name", list(cfgs()))
def test_save_load_gives_identical_outputs(tmp_path, name):
    cls, cfg = cfgs()[name]
    torch.manual_seed(0)
    m = cls(cfg).eval()
    save_model(m, tmp_path / "ckpt")
    back = load_model(tmp_path / "ckpt").eval()
    assert type(back) is cls
    x = torch.randint(0, 70, (2, 9))
    args = (x, x) if name == "seq2seq" else (x,)
    assert torch.equal(m(*args), back(*args))
    if cfg.tie_embeddings and cls is GPT:
        assert back.lm_head.weight is back.transformer.wte.weight


def test_keys_are_canonical(tmp_path):
    _, cfg = cfgs()["gpt2"]
    m = GPT(cfg)
    wrapped = torch.nn.Module()
    wrapped.module = m  # the shape DDP gives
    save_model(wrapped, tmp_path / "c")
    keys = load_file(str(tmp_path / "c" / "model.safetensors")).keys()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in keys)
    assert canonical_key("module._orig_mod.transformer.h.0.mlp.fc.weight") == "transformer.h.0.mlp.fc.weight"


@pytest.mark.parametrize("edit,message", [
    ("drop", "missing key\\(s\\): transformer.h.1.mlp.fc.weight"),
    ("extra", "unexpected key\\(s\\): transformer.h.9.surprise"),
    ("shape", "transformer.ln_f.weight has shape"),
])
def test_missing_or_unexpected_keys_name_them(tmp_path, edit, message):
    _, cfg = cfgs()["gpt2"]
    save_model(GPT(cfg), tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(str(path))
    if edit == "drop":
        del tensors["transformer.h.1.mlp.fc.weight"]
    elif edit == "extra":
        tensors["transformer.h.9.surprise"] = torch.zeros(2)
    else:
        tensors["transformer.ln_f.weight"] = torch.zeros(3)
    save_file(tensors, str(path))
    with pytest.raises(UserError, match=message):
        load_model(tmp_path / "c")


def test_reward_model_starts_from_a_language_model(tmp_path):
    _, cfg = cfgs()["gpt2"]
    lm = GPT(cfg)
    save_model(lm, tmp_path / "sft")
    rm = load_model(tmp_path / "sft", kind="scalar")
    assert isinstance(rm, ScalarModel)
    assert torch.equal(rm.transformer.h[0].attn.qkv_proj.weight, lm.transformer.h[0].attn.qkv_proj.weight)
    with pytest.raises(UserError, match="expected 'seq2seq'"):
        load_model(tmp_path / "sft", kind="seq2seq")


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid instructgpt model config"):
        load_model(tmp_path)
    _, cfg = cfgs()["gpt2"]
    (tmp_path / "config.json").write_text(json.dumps({"kind": "gpt", "model": cfg.to_dict()}))
    with pytest.raises(UserError, match="no model.safetensors"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x80\x04pickled")
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_model(tmp_path)


def test_a_config_that_does_not_fit_the_weights_fails_before_the_model_is_built(tmp_path, monkeypatch):
    """A corrupted or crafted config.json (n_embd 10**6: terabytes) is refused from the weights' header, before
    any memory is allocated (audit F33); a tied unembedding stored once is not missing."""
    _, cfg = cfgs()["gpt2"]
    save_model(GPT(cfg), tmp_path / "c")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["model"]["n_embd"] = 10**6
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    real_build = checkpoint.build_model

    def build_on_meta_only(*a, **k):  # shapes only: a real build here would be the out-of-memory
        assert torch.get_default_device().type == "meta", "built the model before checking the weights"
        return real_build(*a, **k)

    monkeypatch.setattr(checkpoint, "build_model", build_on_meta_only)
    with pytest.raises(UserError, match="has shape .* the model expects .*1000000"):
        load_model(tmp_path / "c")
    config["model"]["n_embd"], config["model"]["n_layer"] = cfg.n_embd, 500  # 500 blocks, 2 stored
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="missing key\\(s\\): transformer.h.10."):
        load_model(tmp_path / "c")


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_published_files_have_the_modes_the_umask_gives(tmp_path, umask):
    """safetensors and mkstemp create 0600 files; everything published is readable as the umask allows (F15)."""
    from instructgpt.checkpoint import Checkpointer, write_json_atomic

    old = os.umask(umask)
    try:
        _, cfg = cfgs()["gpt2"]
        model = GPT(cfg)
        save_model(model, tmp_path / "m")
        write_json_atomic(tmp_path / "done.json", {"ok": 1})
        ckpt = Checkpointer(tmp_path / "run")
        step = ckpt.save(1, {"model": model}, {}, {})
        best = ckpt.save_best(model, {"step": 1})
    finally:
        os.umask(old)
    files = [tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json", tmp_path / "done.json",
             step / "model" / "model.safetensors", step / "state" / "state.json", best / "model.safetensors"]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(0o666 & ~umask)}
    assert {oct(stat.S_IMODE(d.stat().st_mode)) for d in (step, best)} == {oct(0o777 & ~umask)}


def test_new_weights_never_sit_beside_an_old_config(tmp_path, monkeypatch):
    """Re-exporting removes config.json first and writes it last (F14): a crash while the weights are written
    leaves a folder that is refused (no config.json), not new weights read with an old shape."""
    _, cfg = cfgs()["gpt2"]
    save_model(GPT(cfg), tmp_path / "m")

    def dying_save_file(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("instructgpt.checkpoint.save_file", dying_save_file)
    with pytest.raises(OSError, match="simulated"):
        save_model(GPT(cfg), tmp_path / "m")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.safetensors"]  # no temporary file left


def test_one_process_writes_an_out_folder_at_a_time(tmp_path):
    """OUT/.lock (F17): a second writer is refused while the first one holds it, and can go once it is done; a
    refused run leaves no folder it created behind."""
    from instructgpt.checkpoint import writing

    out = tmp_path / "runs" / "sft"
    with writing(out):
        assert (out / ".lock").is_file()
        with pytest.raises(UserError, match=f"another instructgpt process is writing {out}"):
            with writing(out):
                pass
        child = subprocess.run([sys.executable, "-c", "import sys; from instructgpt.checkpoint import writing\n"
                                f"with writing({str(out)!r}): pass"], capture_output=True, text=True)
        assert "another instructgpt process is writing" in child.stderr
    with writing(out):  # released
        pass
    with pytest.raises(UserError, match="bad flag"):
        with writing(tmp_path / "new" / "deeper"):
            raise UserError("bad flag")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        with writing(tmp_path / "file"):
            pass
