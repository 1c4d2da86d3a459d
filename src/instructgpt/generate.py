"""Generation: token ids in; token ids and per-token log-probabilities out. One engine (engine.py) for
evaluation, RL rollouts, collection, chat and the server, used two ways.

- `stream` / `generate`: one static batch. Every prompt is prefilled at once (left-padded, position ids
  from the attention mask); each step feeds one token per row; a row that ended keeps its slot (fed
  `pad_id`) until the last row ends. One generator draws the whole batch's tokens each step, and the
  model sees every row at every step: PPO's rollouts rely on both (their sampler draws the noise of the
  whole global batch per step, identically on every rank), and chat streams one prompt this way.
- `generate_many`: continuous batching over many prompts. At most `max_batch` samples run at once; a
  slot whose sample ended takes the next prompt at the next step, so the batch stays full when
  lengths differ. A prompt's n samples share one prefill. Each prompt draws from its own generator,
  so its samples do not depend on which other prompts share its batch.

Rows stop at any of the stop ids or at `max_new_tokens`. The log-probability of each chosen token is
taken under the raw model (no temperature, top-k or top-p), which is what PPO's importance ratio needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .engine import DecodeBatch, Engine, Request, SamplingParams, check_prompts, sample_next, stop_ids
from .model import GPT, Seq2Seq

__all__ = ["Generation", "SamplingParams", "generate", "generate_many", "sample_next", "stop_tensor", "stream"]


@dataclass
class Generation:
    """New tokens of a batch. Positions after a row's end are `pad_id` with log-probability 0."""

    tokens: torch.Tensor  # (B, N) long
    logprobs: torch.Tensor  # (B, N) float32, log p(token) under the raw model
    lengths: torch.Tensor  # (B,) new tokens per row, the end token included
    ended: torch.Tensor  # (B,) bool: the row produced the end token

    def token_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


def stop_tensor(eos_id: int | Sequence[int], device) -> torch.Tensor:
    """The ids that end a row, as a tensor for torch.isin."""
    return torch.tensor(stop_ids(eos_id), dtype=torch.long, device=device)


def _static_batch(model: nn.Module, prompts: Sequence[Sequence[int]], max_new: int) -> DecodeBatch:
    cfg = model.config
    T0 = max(len(p) for p in prompts)
    if isinstance(model, Seq2Seq):
        if max_new + 1 > cfg.block_size:
            raise ValueError(f"max_new_tokens {max_new} exceeds the decoder's context of {cfg.block_size}")
        return DecodeBatch(model, len(prompts), max_new + 1, src_length=T0)
    if T0 + max_new > cfg.block_size:
        raise ValueError(f"prompt of {T0} tokens + max_new_tokens {max_new} exceeds the model's "
                         f"context of {cfg.block_size} tokens")
    return DecodeBatch(model, len(prompts), T0 + max_new)


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
    """Yield (tokens (B,), logprobs (B,), active (B,)) once per step of one static batch; `active` marks
    the rows whose token is real (rows that stopped earlier get `pad_id`). A row ends at its first token
    in `eos_id` (one id, or several: a chat template's end-of-turn and the tokenizer's end of text).
    `start_id` is the decoder's first token (seq2seq). `generator` (else one seeded with params.seed)
    draws every row's token at each step, rows that ended included, so a row's samples depend on the
    whole batch. `all_finished(finished)` lets ranks under torchrun decide together when to stop
    (default: this process's rows)."""
    params.validate()
    check_prompts(model, prompts, pad_id, allow_empty=not isinstance(model, GPT))
    if isinstance(model, Seq2Seq) and start_id is None:
        raise ValueError("encoder-decoder generation needs start_id (the decoder's first token)")
    was_training = model.training
    model.eval()
    try:
        batch = _static_batch(model, prompts, params.max_new_tokens)
        if generator is None and params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=batch.device).manual_seed(params.seed)
        logits = batch.prefill(range(len(prompts)), prompts, pad_id, start_id)  # (B, V)
        stop = stop_tensor(eos_id, logits.device)
        finished = torch.zeros(len(prompts), dtype=torch.bool, device=logits.device)
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
            logits = batch.decode(tok)  # (B, V)
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
    """Generate for one static batch of prompts (lists of ids); see `stream`."""
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


def generate_many(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
    eos_id: int | Sequence[int],
    pad_id: int,
    max_batch: int = 32,
    n: int = 1,
    generator: torch.Generator | None = None,
    start_id: int | None = None,
    compile: bool = False,
) -> Generation:
    """n samples of each prompt with continuous batching: at most `max_batch` samples decode at once, and
    a slot whose sample ended takes the next prompt at the next step. Rows of the result are in prompt
    order, prompt i's samples at rows i*n .. i*n + n - 1.

    `params` is one SamplingParams for every prompt or one per prompt. Prompt i's n samples share its
    prefill and draw from a generator of their own, seeded with the i-th seed drawn from `generator`
    (else from a generator seeded with params.seed, else from torch's global generator): the samples
    depend on the prompt, its parameters and that seed, not on max_batch or the other prompts. Greedy
    rows equal decoding each prompt alone (tokens; log-probabilities to rounding).
    `compile=True` runs the decode step through torch.compile with fixed shapes (see engine.DecodeBatch)."""
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"{len(per_prompt)} sampling parameters for {len(prompts)} prompts")
    check_prompts(model, prompts, pad_id, allow_empty=False)
    device = next(model.parameters()).device
    generators: list[torch.Generator | None] = [None] * len(prompts)
    if any(q.temperature > 0 for q in per_prompt):  # greedy generation leaves every generator alone
        if generator is None:
            seeded = [q.seed for q in per_prompt if q.seed is not None]
            generator = torch.Generator().manual_seed(seeded[0]) if seeded else None
        seeds = torch.randint(2**62, (len(prompts),), generator=generator, device=getattr(generator, "device", "cpu"))
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds.tolist()]
    longest = max(max(len(p) for p in prompts) + q.max_new_tokens for q in per_prompt)
    engine = Engine(model, eos_id, pad_id, max_batch, longest, start_id, compile=compile)
    requests = [Request(p, q, n, g, tag=i) for i, (p, q, g) in enumerate(zip(prompts, per_prompt, generators))]
    out: dict[tuple[int, int], list[tuple[int, float, bool]]] = {}
    was_training = model.training
    model.eval()
    try:
        for request in requests:
            engine.submit(request)
        while engine.busy:
            for t in engine.step():
                out.setdefault((t.request.tag, t.index), []).append((t.token, t.logprob, t.ended))
    finally:
        model.train(was_training)
    rows = [out[i, j] for i in range(len(prompts)) for j in range(n)]
    N = max(len(r) for r in rows)
    tokens = torch.full((len(rows), N), pad_id, dtype=torch.long)
    logprobs = torch.zeros(len(rows), N)
    for r, row in enumerate(rows):
        tokens[r, : len(row)] = torch.tensor([t for t, _, _ in row])
        logprobs[r, : len(row)] = torch.tensor([lp for _, lp, _ in row])
    return Generation(tokens=tokens, logprobs=logprobs, lengths=torch.tensor([len(r) for r in rows]),
                      ended=torch.tensor([row[-1][2] for row in rows]))
