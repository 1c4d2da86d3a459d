"""The generation engine: token ids in; token ids and per-token log-probabilities out.

One engine for evaluation, RL rollouts, collection, chat and the server. Prompts of different lengths
share a batch by left padding, with position ids derived from the attention mask; a preallocated KV
cache is filled by one prefill, then each step feeds one token per row. Rows stop at the end token or
at `max_new_tokens`; the loop ends when every row has stopped.

The log-probability of each chosen token is taken under the raw model (no temperature, top-k or top-p),
which is what PPO's importance ratio needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import pad
from .model import GPT, KVCache, Seq2Seq


@dataclass
class SamplingParams:
    max_new_tokens: int = 64  # stop a row after this many new tokens (the end token counts)
    temperature: float = 1.0  # 0 means greedy decoding
    top_k: int = 0  # keep only the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1: all)
    seed: int | None = None  # seeds a private torch.Generator when no generator is passed

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Generation:
    """New tokens of a batch. Positions after a row's end are `pad_id` with log-probability 0."""

    tokens: torch.Tensor  # (B, N) long
    logprobs: torch.Tensor  # (B, N) float32, log p(token) under the raw model
    lengths: torch.Tensor  # (B,) new tokens per row, the end token included
    ended: torch.Tensor  # (B,) bool: the row produced the end token

    def token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row (B,) from logits (B, V)."""
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop = probs.cumsum(-1) - probs >= params.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _DecodeState:
    """What the decode steps need besides the cache, kept by the engine instead of rebuilt every step:
    the additive attention mask over every cache slot (B, 1, 1, S_max), 0 = may attend, -inf = padding or
    not yet written, one column opened per step; and each row's next position id (B, 1), incremented.
    With the cache in fixed-shape mode a step does no mask or position arithmetic, no id check and no
    re-slicing, and has the same shapes every time."""

    def __init__(self, cache: KVCache, key_mask: torch.Tensor, dtype):
        B, S0 = key_mask.shape  # the prompt's keys: 1 = real, 0 = padding
        S_max = cache.k.size(3)
        self.cache = cache
        self.bias = torch.full((B, 1, 1, S_max), float("-inf"), dtype=dtype, device=key_mask.device)
        self.bias[:, 0, 0, :S0].masked_fill_(key_mask.bool(), 0.0)
        self.pos = key_mask.sum(1, keepdim=True)  # (B, 1): positions follow the real tokens (left padding)
        # Attend over every slot (same shapes each step, for CUDA graphs / torch.compile) or over the filled
        # prefix only (eager: up to S_max / length times less attention work, measured faster on the CPU).
        self.fixed_shape = False

    def next_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Open the slot the next token writes to; return (mask, position ids) for its step."""
        L = self.cache.length
        self.bias[..., L] = 0.0
        pos = self.pos.clone()  # the model may keep a reference; the next step increments in place
        self.pos += 1
        if self.fixed_shape:
            self.cache.fixed_shape = True
            return self.bias, pos
        return self.bias[..., : L + 1], pos  # only the filled slots: fewer keys for eager attention


class _DecoderOnly:
    """Prefill then one-token steps for a GPT, over one preallocated KV cache."""

    def __init__(self, model: GPT, prompts, pad_id: int, max_new: int):
        cfg = model.config
        p = next(model.parameters())
        self.model = model
        idx, mask = (t.to(p.device) for t in pad(prompts, pad_id, "left"))
        B, T0 = idx.shape
        if T0 + max_new > cfg.block_size:
            raise ValueError(f"prompt of {T0} tokens + max_new_tokens {max_new} exceeds the model's "
                             f"context of {cfg.block_size} tokens")
        self.cache = KVCache(cfg.n_layer, B, cfg.kv_heads, T0 + max_new, cfg.head_dim, p.device, p.dtype)
        self.state = _DecodeState(self.cache, mask, p.dtype)
        self.idx, self.mask = idx, mask

    def prefill(self) -> torch.Tensor:
        return self.model(self.idx, self.mask, cache=self.cache, logits_slice=slice(-1, None))[:, -1]

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        mask, pos = self.state.next_step()
        return self.model(tok[:, None], mask, position_ids=pos, cache=self.cache, check_ids=False)[:, -1]


class _EncoderDecoder:
    """The encoder output and every layer's cross-attention keys and values are computed once; the
    decoder starts from `start_id` and caches its self-attention."""

    def __init__(self, model: Seq2Seq, prompts, pad_id: int, max_new: int, start_id: int):
        cfg = model.config
        p = next(model.parameters())
        if max_new + 1 > cfg.block_size:
            raise ValueError(f"max_new_tokens {max_new} exceeds the decoder's context of {cfg.block_size}")
        self.model = model
        src, self.src_mask = (t.to(p.device) for t in pad(prompts, pad_id, "left"))
        B = src.size(0)
        self.memory_kv = model.memory_kv(model.encode(src, self.src_mask))
        self.cache = KVCache(cfg.n_layer, B, cfg.kv_heads, max_new + 1, cfg.head_dim, p.device, p.dtype)
        self.state = _DecodeState(self.cache, torch.ones(B, 0, dtype=torch.long, device=p.device), p.dtype)
        self.start = torch.full((B, 1), start_id, dtype=torch.long, device=p.device)

    def prefill(self) -> torch.Tensor:
        return self._step(self.start[:, 0], check_ids=True)

    def step(self, tok: torch.Tensor) -> torch.Tensor:
        return self._step(tok, check_ids=False)

    def _step(self, tok: torch.Tensor, check_ids: bool) -> torch.Tensor:
        mask, pos = self.state.next_step()
        return self.model.decode(tok[:, None], self.memory_kv, self.src_mask, mask, pos, cache=self.cache,
                                 check_ids=check_ids)[:, -1]


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int) -> None:
    """The only id check of a generation: decode steps feed sampled ids (always in range) or pad_id."""
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    V = model.config.vocab_size
    if not 0 <= pad_id < V:
        raise ValueError(f"pad_id {pad_id} outside the vocabulary [0, {V})")
    for i, p in enumerate(prompts):
        if len(p) == 0 and isinstance(model, GPT):
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {V})")
        if len(p) > model.config.block_size:
            raise ValueError(f"prompt {i} has {len(p)} tokens, beyond the model's context of "
                             f"{model.config.block_size}")


def stop_tensor(eos_id: int | Sequence[int], device) -> torch.Tensor:
    """The ids that end a row, as a tensor for torch.isin."""
    ids = [eos_id] if isinstance(eos_id, int) else list(eos_id)
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def stream(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    start_id: int | None = None,
    all_finished: Callable[[torch.Tensor], bool] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (tokens (B,), logprobs (B,), active (B,)) once per step; `active` marks the rows whose token
    is real (rows that stopped earlier get `pad_id`). A row ends at its first token in `eos_id` (one id, or
    several: a chat template's end-of-turn and the tokenizer's end of text). `start_id` is the decoder's
    first token (seq2seq).
    `all_finished(finished)` lets ranks under torchrun decide together when to stop (default: this
    process's rows)."""
    params.validate()
    _check_prompts(model, prompts, pad_id)
    was_training = model.training
    model.eval()
    try:
        if isinstance(model, Seq2Seq):
            if start_id is None:
                raise ValueError("encoder-decoder generation needs start_id (the decoder's first token)")
            runner = _EncoderDecoder(model, prompts, pad_id, params.max_new_tokens, start_id)
        else:
            runner = _DecoderOnly(model, prompts, pad_id, params.max_new_tokens)
        if generator is None and params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=next(model.parameters()).device).manual_seed(params.seed)
        logits = runner.prefill()  # (B, V)
        stop = stop_tensor(eos_id, logits.device)
        B = logits.size(0)
        finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
        for step in range(params.max_new_tokens):
            tok = sample_next(logits, params, generator)  # (B,), a fresh tensor
            logp = F.log_softmax(logits.float(), dim=-1).gather(-1, tok[:, None]).squeeze(-1)
            active = ~finished
            tok.masked_fill_(finished, pad_id)
            logp.masked_fill_(finished, 0.0)
            yield tok, logp, active
            finished |= torch.isin(tok, stop)
            done = all_finished(finished) if all_finished is not None else bool(finished.all())
            if done or step == params.max_new_tokens - 1:
                break
            logits = runner.step(tok)  # (B, V)
    finally:
        model.train(was_training)


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_id: int | Sequence[int],
    pad_id: int,
    generator: torch.Generator | None = None,
    start_id: int | None = None,
    all_finished: Callable[[torch.Tensor], bool] | None = None,
) -> Generation:
    """Generate for a batch of prompts (lists of ids); see `stream`."""
    toks, logps, actives = [], [], []
    for tok, logp, active in stream(model, prompts, params, eos_id, pad_id, generator, start_id, all_finished):
        toks.append(tok)
        logps.append(logp)
        actives.append(active)
    tokens = torch.stack(toks, 1)  # (B, N)
    active = torch.stack(actives, 1)
    lengths = active.sum(1)
    ended = (torch.isin(tokens, stop_tensor(eos_id, tokens.device)) & active).any(1)
    return Generation(tokens=tokens, logprobs=torch.stack(logps, 1), lengths=lengths, ended=ended)
