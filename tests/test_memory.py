"""Activation checkpointing: the same loss and gradients as without it (dropout included, whose masks must be
the same in the recomputation), the same state dict keys, and blocks that really are recomputed, for the
GPT-2 and Llama styles, the scalar model and both stacks of the encoder-decoder."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from instructgpt.lora import LoRAConfig, apply_lora
from instructgpt.memory import activation_checkpointing, set_activation_checkpointing
from instructgpt.model import GPT, ModelConfig, ScalarModel, Seq2Seq

V = 97


def gpt2_cfg(**kw):
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=32, **kw)


def llama_cfg(**kw):
    return ModelConfig.llama(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, **kw)


def seq2seq_cfg(**kw):
    return ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_encoder_layer=3, n_head=4, n_embd=32,
                       arch="seq2seq", **kw)


def batch(seed: int = 0, B: int = 3, T: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T + 1), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, :4] = 0  # a left-padded row: the padding mask goes through the checkpoint too
    return {"src": torch.randint(0, V, (B, 9), generator=g), "idx": ids[:, :-1], "mask": mask,
            "target": ids[:, 1:]}


def loss_of(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(model, Seq2Seq):
        logits = model(b["src"], b["idx"])
    elif isinstance(model, ScalarModel):
        return model(b["idx"], b["mask"]).pow(2).mean()
    else:
        logits = model(b["idx"], b["mask"])
    return F.cross_entropy(logits.flatten(0, 1), b["target"].flatten())


CASES = {
    "gpt2": (GPT, gpt2_cfg),
    "llama": (GPT, llama_cfg),
    "scalar-llama": (ScalarModel, llama_cfg),
    "seq2seq": (Seq2Seq, seq2seq_cfg),
}


def build(case: str, **kw) -> torch.nn.Module:
    cls, cfg = CASES[case]
    torch.manual_seed(0)
    return cls(cfg(**kw)).train()


def loss_and_grads(model: torch.nn.Module, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks in both runs
    loss = loss_of(model, batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_same_loss_and_gradients_and_keys(case):
    plain = build(case, dropout=0.1, attn_dropout=0.1)
    ckpt = copy.deepcopy(plain)
    keys = list(plain.state_dict())
    n_blocks = set_activation_checkpointing(ckpt, True)
    assert n_blocks == (5 if case == "seq2seq" else 2) and activation_checkpointing(ckpt)
    assert list(ckpt.state_dict()) == keys
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]

    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(ckpt)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == len(list(plain.parameters()))
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)


def count_mlp_calls(model: torch.nn.Module) -> list[int]:
    """A counter of MLP calls over all blocks. A pre-hook on a submodule also sees the recomputation (which
    stops as soon as the last tensor the backward needs is recomputed, before a forward hook would run)."""
    calls = [0]
    for name, m in model.named_modules():
        if name.endswith(".mlp"):
            m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("case", ["llama", "seq2seq"])
def test_blocks_are_recomputed_only_when_training_with_grad(case):
    model = build(case)
    n = set_activation_checkpointing(model, True)
    calls = count_mlp_calls(model)
    loss_of(model, batch()).backward()
    assert calls[0] == 2 * n  # forward, then each block once more in the backward pass

    calls[0] = 0
    with torch.no_grad():
        loss_of(model, batch())
    model.eval()
    loss_of(model, batch()).backward()
    assert calls[0] == 2 * n  # once each time: nothing saved, nothing recomputed

    set_activation_checkpointing(model, False)
    assert not activation_checkpointing(model)
    model.train()
    calls[0] = 0
    loss_of(model, batch()).backward()
    assert calls[0] == n


def test_a_copy_checkpoints_its_own_blocks():
    model = build("gpt2")
    set_activation_checkpointing(model, True)
    twin = copy.deepcopy(model)
    assert all(b.forward.__self__ is b for b in twin.transformer.h)
    calls = count_mlp_calls(twin)
    loss_of(twin, batch()).backward()
    assert calls[0] == 2 * len(twin.transformer.h)
    assert all(p.grad is None for p in model.parameters())  # the original took no part


def test_with_lora_adapters_the_gradients_are_the_same():
    plain = build("llama", dropout=0.1)
    apply_lora(plain, LoRAConfig(rank=4, dropout=0.1))
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(std=0.1)
    ckpt = copy.deepcopy(plain)
    set_activation_checkpointing(ckpt, True)
    loss_a, grads_a = loss_and_grads(plain)
    loss_b, grads_b = loss_and_grads(ckpt)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a and all(name.endswith(("lora_A", "lora_B")) for name in grads_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=0, msg=name)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no transformer block"):
        set_activation_checkpointing(torch.nn.Linear(3, 3), True)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_sharded_blocks_are_recomputed_with_the_same_gradients():
    """FSDP2 (one rank, gloo) shards each block with hooks around its call; the recomputation runs inside
    the backward pass, after FSDP has gathered the block's weights again."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    plain = build("llama", dropout=0.1)
    sharded = copy.deepcopy(plain)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        for block in sharded.transformer.h:
            fully_shard(block, mesh=mesh)
        fully_shard(sharded, mesh=mesh)
        n = set_activation_checkpointing(sharded, True)  # after sharding: the blocks keep their class
        calls = count_mlp_calls(sharded)
        loss_a, grads_a = loss_and_grads(plain)
        loss_b, grads_b = loss_and_grads(sharded)
        assert calls[0] == 2 * n
        torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name].full_tensor(), grads_a[name], atol=1e-6, rtol=0, msg=name)
    finally:
        dist.destroy_process_group()
