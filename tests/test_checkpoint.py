import json

import pytest
import torch
from safetensors.torch import load_file, save_file

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
