"""LoRA: a layer against its formula written out; zero B and adapters off give the base model exactly;
merged weights give what base + adapters give; only adapters (and the asked-for head) train; the adapter
state round-trips; the PEFT export loads in `peft` over our HF export and computes the same logits."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from instructgpt.checkpoint import load_state_dict, save_model, state_dict_for_saving
from instructgpt.errors import UserError
from instructgpt.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_off,
    apply_lora,
    load_lora_state_dict,
    lora_layers,
    lora_state_dict,
    merge_lora,
    merged_state_dict,
    peft_adapter,
    save_peft_adapter,
)
from instructgpt.model import GPT, ModelConfig, ScalarModel, Seq2Seq

V = 97


def gpt2_cfg(**kw):
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)


def llama_cfg(**kw):
    return ModelConfig.llama(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **kw)


FAMILIES = {"gpt2": gpt2_cfg, "llama_gqa": llama_cfg}


def make(cls, cfg, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return cls(cfg)


def ids(seed: int = 0, B: int = 3, T: int = 10) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def log_probs(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """log p(idx[t + 1] | idx[..t]) (B, T - 1)."""
    logp = F.log_softmax(model(idx[:, :-1]).float(), dim=-1)
    return logp.gather(-1, idx[:, 1:, None]).squeeze(-1)


def train_steps(model: torch.nn.Module, n: int = 4, lr: float = 1e-2) -> None:
    """A few AdamW steps on random next-token data (values towards 1 for a scalar model)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(n):
        idx = ids(seed=100 + step)
        if isinstance(model, ScalarModel):
            loss = (model(idx) - 1).pow(2).mean()
        else:
            loss = -log_probs(model, idx).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


# ----------------------------------------------------------------------------------------------------
# The layer


def test_layer_with_zero_b_is_the_base_layer_exactly():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = LoRALinear(copy.deepcopy(base), rank=4, alpha=8.0, dropout=0.5).train()
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_B.abs().sum() == 0 and layer.lora_A.abs().sum() > 0
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad


def test_layer_matches_its_formula_written_out():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = LoRALinear(base, rank=4, alpha=8.0).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 16)
    W, b, A, B = base.weight, base.bias, layer.lora_A, layer.lora_B
    expected = x @ W.T + b + (x @ A.T @ B.T) * (8.0 / 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), W + B @ A * 2.0)
    layer.enabled = False
    assert torch.equal(layer(x), base(x))


def test_a_is_kaiming_uniform_as_peft():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(300, 10), rank=64, alpha=1.0)
    bound = 1 / 300 ** 0.5  # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert layer.lora_A.abs().max() <= bound
    assert layer.lora_A.std().item() == pytest.approx(bound / 3 ** 0.5, rel=0.05)


def test_adapter_dropout_acts_on_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(16, 8), rank=4, alpha=4.0, dropout=0.5).train()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(64, 16)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    kept = F.dropout(x, 0.5, True)
    expected = F.linear(x, layer.weight, layer.bias) + kept @ layer.lora_A.T @ layer.lora_B.T
    torch.testing.assert_close(y, expected)
    layer.eval()
    assert not torch.equal(layer(x), y)


# ----------------------------------------------------------------------------------------------------
# Applying adapters to our models


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fresh_adapters_leave_the_model_exactly_as_it_was(family):
    model = make(GPT, FAMILIES[family]()).eval()
    before = log_probs(model, ids())
    names = apply_lora(model, LoRAConfig(rank=4))
    assert names == [f"transformer.h.{i}.{n}" for i in range(2)
                     for n in ("attn.qkv_proj", "attn.o_proj", "mlp.fc", "mlp.proj")]
    assert torch.equal(log_probs(model, ids()), before)


def test_the_fused_projections_get_one_adapter_each():
    model = make(GPT, llama_cfg())
    apply_lora(model, LoRAConfig(rank=4, targets=("qkv_proj", "fc")))
    layers = lora_layers(model)
    assert list(layers) == ["transformer.h.0.attn.qkv_proj", "transformer.h.0.mlp.fc",
                            "transformer.h.1.attn.qkv_proj", "transformer.h.1.mlp.fc"]
    qkv, fc = layers["transformer.h.0.attn.qkv_proj"], layers["transformer.h.0.mlp.fc"]
    assert qkv.lora_A.shape == (4, 32) and qkv.lora_B.shape == ((4 + 2 * 2) * 8, 4)
    assert fc.lora_B.shape == (2 * model.config.hidden_dim, 4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merged_weights_give_what_base_plus_adapters_give(family):
    model = make(GPT, FAMILIES[family](dropout=0.1))
    original_keys = list(model.state_dict())
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
    train_steps(model)
    assert all(layer.lora_B.abs().sum() > 0 for layer in lora_layers(model).values())
    x = ids(seed=7)
    with torch.no_grad():
        adapted = model(x)
        tensors = merged_state_dict(model)
        merged = merge_lora(copy.deepcopy(model))
        assert not lora_layers(merged)
        assert list(merged.state_dict()) == original_keys
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=0)
        # merged_state_dict is what save_model writes of the merged model, and loads into a plain GPT.
        expected = state_dict_for_saving(merged)
        assert tensors.keys() == expected.keys()
        for key in tensors:
            assert torch.equal(tensors[key], expected[key]), key
        fresh = GPT(model.config).eval()
        load_state_dict(fresh, tensors, "merged")
        torch.testing.assert_close(fresh(x), adapted, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_adapters_off_is_the_original_model_exactly(family):
    model = make(GPT, FAMILIES[family]()).eval()
    original = copy.deepcopy(model)
    apply_lora(model, LoRAConfig(rank=4))
    train_steps(model)
    x = ids(seed=9)
    with torch.no_grad():
        on = log_probs(model, x)
        with adapters_off(model) as reference:
            assert reference is model
            off = log_probs(model, x)
        assert torch.equal(off, log_probs(original, x))
        assert not torch.allclose(on, off)
        assert torch.equal(log_probs(model, x), on)  # switched back on
    # A layer switched off by hand stays off after the block.
    layer = next(iter(lora_layers(model).values()))
    layer.enabled = False
    with adapters_off(model):
        pass
    assert not layer.enabled and sum(m.enabled for m in lora_layers(model).values()) == 7


def test_adapters_off_restores_the_switches_after_an_error():
    model = make(GPT, gpt2_cfg())
    apply_lora(model, LoRAConfig(rank=2))
    with pytest.raises(RuntimeError), adapters_off(model):
        raise RuntimeError("inside")
    assert all(layer.enabled for layer in lora_layers(model).values())


def test_only_adapters_and_the_asked_for_head_train():
    model = make(ScalarModel, llama_cfg())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(rank=4, targets=("attn",)), trainable=("score_head",))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"score_head.weight", "score_head.bias"}
    train_steps(model)
    after = model.state_dict()
    for key, value in before.items():  # every base weight untouched, the head trained
        assert torch.equal(after[key], value) == (not key.startswith("score_head")), key


def test_seq2seq_attention_targets_include_cross_attention():
    cfg = ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_encoder_layer=1, n_head=4, n_embd=32, arch="seq2seq")
    model = make(Seq2Seq, cfg)
    names = apply_lora(model, LoRAConfig(rank=2, targets=("attn",)))
    assert "decoder.h.1.cross_attn.kv_proj" in names and "encoder.h.0.attn.qkv_proj" in names
    assert len(names) == 2 + 2 * 5  # encoder: qkv, o; each decoder block: qkv, o, cross q, kv, o


def test_gpt2_names_select_the_same_layers():
    a, b = make(GPT, gpt2_cfg()), make(GPT, gpt2_cfg())
    assert apply_lora(a, LoRAConfig(targets=("c_attn", "c_fc", "c_proj"))) == apply_lora(b, LoRAConfig(
        targets=("attn", "mlp")))


def test_clear_errors():
    with pytest.raises(UserError, match="unknown target 'mlp.fc'"):
        LoRAConfig(targets=("mlp.fc",))
    with pytest.raises(UserError, match="fused 'qkv_proj'"):
        LoRAConfig(targets=("k_proj",))
    with pytest.raises(UserError, match="fused 'fc'"):
        LoRAConfig(targets=("gate_proj",))
    for bad in (dict(rank=0), dict(alpha=0.0), dict(dropout=1.0), dict(targets=())):
        with pytest.raises(UserError, match="invalid LoRA config"):
            LoRAConfig(**bad)
    model = make(GPT, llama_cfg())
    with pytest.raises(UserError, match="'q_proj' match no layer.*target 'qkv_proj'"):
        apply_lora(model, LoRAConfig(targets=("attn", "q_proj")))
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())  # left untouched
    with pytest.raises(UserError, match="cannot keep 'score_head' trainable"):
        apply_lora(model, LoRAConfig(), trainable=("score_head",))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())
    with pytest.raises(ValueError, match="no LoRA adapters"), adapters_off(make(GPT, llama_cfg())):
        pass


# ----------------------------------------------------------------------------------------------------
# Adapter state


def test_lora_state_dict_round_trips(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = LoRAConfig(rank=4, targets=("attn", "proj"))
    model = make(ScalarModel, gpt2_cfg())
    names = apply_lora(model, cfg, trainable=("score_head",))
    train_steps(model)
    sd = lora_state_dict(model)
    assert set(sd) == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {"score_head.weight", "score_head.bias"}
    save_file(sd, tmp_path / "adapters.safetensors")
    snapshot = {k: v.clone() for k, v in sd.items()}
    train_steps(model, n=1)
    assert all(torch.equal(sd[k], snapshot[k]) for k in sd)  # a copy, not the live parameters
    assert not torch.equal(lora_state_dict(model)[names[0] + ".lora_B"], sd[names[0] + ".lora_B"])
    load_lora_state_dict(model, sd)

    other = make(ScalarModel, gpt2_cfg())  # the same base weights, fresh adapters and head
    apply_lora(other, cfg, trainable=("score_head",))
    x = ids(seed=4)
    assert not torch.allclose(other(x), model(x))
    load_lora_state_dict(other, load_file(tmp_path / "adapters.safetensors"))
    assert torch.equal(other(x), model(x))

    with pytest.raises(UserError, match="missing key.*score_head.bias"):
        load_lora_state_dict(other, {k: v for k, v in sd.items() if k != "score_head.bias"}, "step_5")
    with pytest.raises(UserError, match="unexpected key.*transformer.wte.weight"):
        load_lora_state_dict(other, {**sd, "transformer.wte.weight": torch.zeros(1)})
    wrong = {**sd, names[0] + ".lora_A": torch.zeros(8, 32)}
    with pytest.raises(UserError, match="lora_A has shape \\(8, 32\\), the model expects \\(4, 32\\)"):
        load_lora_state_dict(other, wrong)


# ----------------------------------------------------------------------------------------------------
# PEFT's format


def perturb(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Random norms too (they start at 1, which would hide a mistake)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


PEFT_CASES = {
    "llama-gqa": lambda: ModelConfig.llama(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32),
    "qwen2-bias": lambda: ModelConfig.llama(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=1,
                                            n_embd=32, attention_bias=True, tie_embeddings=True),
    "gpt2": lambda: gpt2_cfg(),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_over_the_hf_export_computes_our_logits(tmp_path, case):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from instructgpt.hf_export import export_hf
    from instructgpt.model import positions_from_mask

    transformers.logging.set_verbosity_error()
    base = make(GPT, PEFT_CASES[case]())
    perturb(base)
    save_model(base, tmp_path / "base")
    export_hf(tmp_path / "base", tmp_path / "hf", log=lambda _: None)

    cfg = LoRAConfig(rank=4, alpha=12.0, dropout=0.05)
    model = base
    apply_lora(model, cfg)
    initial_A = {n: layer.lora_A.clone() for n, layer in lora_layers(model).items()}
    train_steps(model, n=3)
    assert all(not torch.equal(layer.lora_A, initial_A[n]) for n, layer in lora_layers(model).items())
    folder = save_peft_adapter(model, cfg, str(tmp_path / "hf"), tmp_path / "adapter")

    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == (
        "LORA", "CAUSAL_LM", 4, 12.0, 0.05)
    if case == "gpt2":
        assert config["target_modules"] == ["attn.c_proj", "c_attn", "c_fc", "mlp.c_proj"] and config["fan_in_fan_out"]
    else:
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
        _, tensors = peft_adapter(model, cfg, "base")
        A = "base_model.model.model.layers.0.self_attn.{}_proj.lora_A.weight"
        assert torch.equal(tensors[A.format("q")], tensors[A.format("v")])  # one shared A, exact
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    adapted = peft.PeftModel.from_pretrained(hf, folder).eval()

    g = torch.Generator().manual_seed(3)
    idx = torch.randint(0, V, (3, 11), generator=g)
    mask = torch.ones_like(idx)
    mask[1, :4] = 0
    with torch.no_grad():
        mine = model(idx, mask)
        theirs = adapted(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        real = mask.bool()
        torch.testing.assert_close(theirs[real], mine[real], atol=1e-4, rtol=1e-4)
        with adapted.disable_adapter(), adapters_off(model):  # and the base model without adapters
            base_theirs = adapted(input_ids=idx, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
            torch.testing.assert_close(base_theirs[real], model(idx, mask)[real], atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base_theirs[real], theirs[real], atol=1e-3)


def test_peft_export_refuses_what_it_cannot_hold():
    rm = make(ScalarModel, llama_cfg())
    apply_lora(rm, LoRAConfig(), trainable=("score_head",))
    with pytest.raises(UserError, match="language models"):
        peft_adapter(rm, LoRAConfig(), "base")
    lm = make(GPT, llama_cfg())
    apply_lora(lm, LoRAConfig(), trainable=("transformer.ln_f",))
    with pytest.raises(UserError, match="transformer.ln_f.weight"):
        peft_adapter(lm, LoRAConfig(), "base")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_sharded_adapters_save_load_and_merge_as_unsharded():
    """Under FSDP2 (one rank, gloo) every parameter is a DTensor: the adapter state and the merged weights
    are gathered to the same full tensors as without sharding, and loading keeps each rank's shard."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    cfg = LoRAConfig(rank=4)
    plain = make(GPT, llama_cfg())
    apply_lora(plain, cfg)
    with torch.no_grad():
        for layer in lora_layers(plain).values():
            layer.lora_B.normal_()
    sharded = copy.deepcopy(plain)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in sharded.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        assert hasattr(sharded.transformer.h[0].attn.qkv_proj.lora_A, "full_tensor")
        state, expected = lora_state_dict(sharded), lora_state_dict(plain)
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
        merged, expected = merged_state_dict(sharded), merged_state_dict(plain)
        assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in merged)
        load_lora_state_dict(sharded, {k: v + 1 for k, v in state.items()})
        again = lora_state_dict(sharded)
        assert all(torch.equal(again[k], state[k] + 1) for k in state)
    finally:
        dist.destroy_process_group()
