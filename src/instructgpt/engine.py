"""The generation engine's core: token ids in; token ids and per-token log-probabilities out.

Two layers.

`DecodeBatch`: B slots, each holding one sequence's keys and values in a preallocated cache, decoded one
token per slot per step. Every slot has its own length: slot b's keys sit at [start[b], length[b]) of its
cache row (start > 0 when its prompt was left-padded to share a prefill with longer ones), its next
position id is length - start, and an additive mask (B, 1, 1, S) kept across steps is 0 on that span and
-inf elsewhere. A decode step writes each slot's new key at its own length (a per-row index), opens that
column of the mask and advances the lengths in place: no mask, position or cache is allocated in the decode
loop (the cache grows, rarely, when a longer request arrives). A prefill fills some slots between two
decode steps while the others keep their state.

`Engine`: continuous batching over a DecodeBatch. Requests wait in a queue; a slot whose row ended is
refilled at the next step, so the batch stays full and a newcomer does not wait for the rows already
running. A request's n samples share one prefill: its keys and values are copied into n slots.

The log-probability of each chosen token is taken under the raw model (no temperature, top-k or top-p),
which is what PPO's importance ratio needs.

Shapes: B slots, T prompt time, S cache length, L layers, K key/value heads, D head size, V vocabulary.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .batching import pad
from .model import Seq2Seq


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


def check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]], pad_id: int, allow_empty: bool) -> None:
    """The only id check of a generation: decode steps feed sampled ids (always in range) or pad_id."""
    if len(prompts) == 0:
        raise ValueError("no prompts to generate from")
    V = model.config.vocab_size
    if not 0 <= pad_id < V:
        raise ValueError(f"pad_id {pad_id} outside the vocabulary [0, {V})")
    for i, p in enumerate(prompts):
        if len(p) == 0 and not allow_empty:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {i}: token id {bad[0]} outside the vocabulary [0, {V})")
        if len(p) > model.config.block_size:
            raise ValueError(f"prompt {i} has {len(p)} tokens, beyond the model's context of "
                             f"{model.config.block_size}")


def stop_ids(eos_id: int | Sequence[int]) -> list[int]:
    """The ids that end a row: one id, or several (a chat template's end-of-turn and the end of text)."""
    return [eos_id] if isinstance(eos_id, int) else list(eos_id)


class _PrefillCache:
    """The cache a prefill's forward sees: it writes the new keys of some slots at [0, T) and hands the
    same keys back to attention (nothing was cached before them)."""

    def __init__(self, batch: DecodeBatch, slots: torch.Tensor):
        self.batch, self.slots = batch, slots
        self.length = 0  # advanced by Transformer.forward; unused here

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = k.size(2)  # k, v: (n, K, T, D)
        self.batch.k[layer][self.slots, :, :T] = k
        self.batch.v[layer][self.slots, :, :T] = v
        return k, v


class DecodeBatch:
    """B slots of one model's decoding, each its own sequence; see the module's docstring.

    Passed to the model as the cache of a decode step (`update` and `length` are the cache's interface).
    Eager steps run the first `rows` slots (the highest in use + 1) and read the first `width` keys (the
    longest sequence + 1): idle and short slots cost little. With `compile=True` every step runs all B
    slots over all S keys, so that its shapes never change, and goes through torch.compile. Off by default:
    on a 2-core CPU (4-layer, 128-wide model, 128 new tokens) the compiled step decoded 1.45x faster than
    the eager one at batch 1 and 1.1x at batch 16, but compiling took 35-40 s per shape, and a cache that
    grows (a new S) compiles again."""

    def __init__(self, model: nn.Module, slots: int, length: int, src_length: int = 0, compile: bool = False):
        cfg = model.config
        p = next(model.parameters())
        self.model, self.seq2seq = model, isinstance(model, Seq2Seq)
        self.B, self.L, self.K, self.D = slots, cfg.n_layer, cfg.kv_heads, cfg.head_dim
        self.limit = cfg.block_size  # longest cache (and source) a slot may need
        self.device, self.dtype = p.device, p.dtype
        dev = dict(device=p.device)
        self.index = torch.arange(slots, **dev)  # (B,) row index of the per-slot writes
        self.write = torch.zeros(slots, dtype=torch.long, **dev)  # (B,) where each slot's next key goes
        self.pos = torch.zeros(slots, 1, dtype=torch.long, **dev)  # (B, 1) each slot's next position id
        self.live = torch.zeros(slots, dtype=torch.long, **dev)  # (B,) 1 where a slot's length advances
        # Transformer.forward adds each call's T to `length`. A tensor, so that a compiled step does not
        # specialise (and recompile) on its value; nothing reads it.
        self.length = torch.zeros((), dtype=torch.long, **dev)
        self.ends = [0] * slots  # host copy of `write` for the slots in use
        self.src_ends = [0] * slots  # seq2seq: each slot's source length
        self.used = [False] * slots
        self.rows, self.top, self.width, self.src_width = 0, 0, 0, 0  # top: the longest slot's length
        self.aligned: int | None = None  # the one write position of every row run, when they share one
        self.S = self.S_src = 0
        self.k = self.v = self.bias = self.mem_k = self.mem_v = self.src_mask = None
        self.fixed_shape = compile
        self.reserve(length, src_length)
        self._forward = torch.compile(self._step, dynamic=False) if compile else self._step

    # -- storage ------------------------------------------------------------------------------------

    def reserve(self, length: int, src_length: int = 0) -> None:
        """Make room for `length` keys per slot (and a source of `src_length` for seq2seq), keeping what
        is cached. Grows to at least twice the old size (within the context) so that growth stays rare."""
        if length > self.S:
            S = min(max(length, 2 * self.S), self.limit) if self.S else length
            self.k, self.v = (self._grow(t, S) for t in (self.k, self.v))
            bias = torch.full((self.B, 1, 1, S), float("-inf"), dtype=self.dtype, device=self.device)
            if self.bias is not None:
                bias[..., : self.S] = self.bias
            self.bias, self.S = bias, S
        if self.seq2seq and src_length > self.S_src:
            S = min(max(src_length, 2 * self.S_src), self.limit) if self.S_src else src_length
            self.mem_k, self.mem_v = (self._grow(t, S) for t in (self.mem_k, self.mem_v))
            src_mask = torch.zeros(self.B, S, dtype=torch.bool, device=self.device)
            src_mask[:, 0] = True  # an idle slot sees one (zero) source key, so that its rows stay finite
            if self.src_mask is not None:
                src_mask[:, : self.S_src] = self.src_mask
            self.src_mask, self.S_src = src_mask, S
        self._update_shape()

    def _grow(self, old: list[torch.Tensor] | None, S: int) -> list[torch.Tensor]:
        """One (B, K, S, D) tensor per layer, not one for all: a compiled step that writes into a slice
        of a bigger tensor copies the whole tensor back every step."""
        # Zeros, not empty: a slot's unwritten keys are masked out, and 0 x (a finite value) stays 0.
        new = [torch.zeros(self.B, self.K, S, self.D, dtype=self.dtype, device=self.device) for _ in range(self.L)]
        for n, o in zip(new, old or []):
            n[:, :, : o.size(2)] = o
        return new

    def _update_shape(self) -> None:
        in_use = [b for b in range(self.B) if self.used[b]]
        self.top = max((self.ends[b] for b in in_use), default=0)
        if self.fixed_shape:
            self.rows, self.width, self.src_width = self.B, self.S, self.S_src
            return
        self.rows = in_use[-1] + 1 if in_use else 0
        # A static batch writes every row at one position: a slice is cheaper than a per-row index.
        same = len(in_use) == self.rows and all(self.ends[b] == self.top for b in in_use)
        self.aligned = self.top if same else None
        self.width = self.top + 1
        self.src_width = max((self.src_ends[b] for b in in_use), default=1)

    # -- filling and freeing slots ------------------------------------------------------------------

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int,
                start_id: int | None = None) -> torch.Tensor:
        """Fill `slots` with `prompts` (left-padded together) and return each one's next-token logits
        (n, V). Seq2seq: encode the sources, then run the decoder's first step on `start_id`."""
        idx, mask = (t.to(self.device) for t in pad(prompts, pad_id, "left"))  # (n, T) each
        n, T = idx.shape
        at = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        cache = _PrefillCache(self, at)
        if self.seq2seq:
            self.reserve(self.S, T)
            memory = self.model.memory_kv(self.model.encode(idx, mask))  # L x 2 x (n, K, T, D)
            for layer, (k, v) in enumerate(memory):
                self.mem_k[layer][at, :, :T] = k
                self.mem_v[layer][at, :, :T] = v
            self.src_mask[at] = False
            self.src_mask[at, :T] = mask.bool()
            start = torch.full((n, 1), start_id, dtype=torch.long, device=self.device)
            ones = torch.ones(n, 1, dtype=torch.long, device=self.device)
            logits = self.model.decode(start, memory, mask, ones, cache=cache)[:, -1]
            key_mask, lengths = ones, ones.sum(1)
        else:
            logits = self.model(idx, mask, cache=cache, logits_slice=slice(-1, None))[:, -1]
            key_mask, lengths = mask, mask.sum(1)
        S_used = key_mask.size(1)
        self.bias[at] = float("-inf")
        self.bias[at, 0, 0, :S_used] = torch.zeros_like(key_mask, dtype=self.dtype).masked_fill_(
            key_mask == 0, float("-inf"))
        self.write[at] = S_used
        self.pos[at, 0] = lengths  # positions follow the real tokens (left padding)
        self.live[at] = 1
        for b in slots:
            self.used[b], self.ends[b], self.src_ends[b] = True, S_used, T if self.seq2seq else 0
        self._update_shape()
        return logits

    def copy(self, src: int, dst: Sequence[int]) -> None:
        """Give slots `dst` the state of slot `src` (a prompt prefilled once for several samples)."""
        at = torch.tensor(list(dst), dtype=torch.long, device=self.device)
        n = self.ends[src]
        for cache in (*self.k, *self.v):
            cache[at, :, :n] = cache[src, :, :n].clone()
        for t in (self.bias, self.write, self.pos, self.live):
            t[at] = t[src].clone()
        if self.seq2seq:
            m = self.src_ends[src]
            for memory in (*self.mem_k, *self.mem_v):
                memory[at, :, :m] = memory[src, :, :m].clone()
            self.src_mask[at] = self.src_mask[src].clone()
        for b in dst:
            self.used[b], self.ends[b], self.src_ends[b] = True, self.ends[src], self.src_ends[src]
        self._update_shape()

    def release(self, slot: int) -> None:
        """Free a slot: it stops advancing and may be prefilled again."""
        self.live[slot] = 0
        self.used[slot] = False
        self._update_shape()

    # -- the decode step ----------------------------------------------------------------------------

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention's cache call in a decode step: k, v (rows, K, 1, D) -> (rows, K, width, D) each."""
        r, W = self.rows, self.width
        if self.aligned is not None:
            self.k[layer][:r, :, self.aligned] = k[:, :, 0]
            self.v[layer][:r, :, self.aligned] = v[:, :, 0]
        else:
            rows, at = self.index[:r], self.write[:r]
            self.k[layer][rows, :, at] = k[:, :, 0]  # (rows, K, D) into each slot's own next position
            self.v[layer][rows, :, at] = v[:, :, 0]
        return self.k[layer][:r, :, :W], self.v[layer][:r, :, :W]

    def decode(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed one token per slot in use (rows,) and return the next-token logits (rows, V); every slot
        in use grows by one key."""
        if self.top >= self.S:
            raise RuntimeError("a slot's cache is full")  # a request the caller let past its context check
        logits = self._forward(tok)
        for b in range(self.rows):  # the host copy of the lengths
            if self.used[b]:
                self.ends[b] += 1
        self.top += 1
        if not self.fixed_shape:
            self.width += 1
            self.aligned = self.top if self.aligned is not None else None
        return logits

    def _step(self, tok: torch.Tensor) -> torch.Tensor:
        r, W = self.rows, self.width
        if self.aligned is not None:  # the key written this step becomes visible
            self.bias[:r, 0, 0, self.aligned] = 0.0
        else:
            self.bias[:r, 0, 0].scatter_(1, self.write[:r, None], 0.0)
        bias, pos = self.bias[:r, :, :, :W], self.pos[:r]
        if self.seq2seq:
            Ws = self.src_width
            memory = [(k[:r, :, :Ws], v[:r, :, :Ws]) for k, v in zip(self.mem_k, self.mem_v)]
            logits = self.model.decode(tok[:, None], memory, self.src_mask[:r, :Ws], bias, pos, cache=self,
                                       check_ids=False)[:, -1]
        else:
            logits = self.model(tok[:, None], bias, position_ids=pos, cache=self, check_ids=False)[:, -1]
        self.write[:r] += self.live[:r]
        self.pos[:r, 0] += self.live[:r]
        return logits


# ----------------------------------------------------------------------------------------------------
# Continuous batching


@dataclass(eq=False)
class Request:
    """One prompt and its n samples. The samples share the prompt's prefill and draw, in sample order, from
    one generator of their own: `generator`, else one seeded with `params.seed`, else one seeded from the
    engine's generator. So a request's samples depend on its prompt, parameters and seed, never on which
    other requests share the batch (up to floating point: a batched matmul may round a logit differently
    from a lone one, which could tip a draw that sits exactly on a boundary)."""

    prompt: Sequence[int]
    params: SamplingParams
    n: int = 1
    generator: torch.Generator | None = None
    tag: object = None  # the caller's handle, returned with every token
    rows: list[int | None] = field(default_factory=list)  # slot of each sample while it runs, else None
    produced: list[int] = field(default_factory=list)  # tokens each sample produced so far
    rows_index: torch.Tensor | None = None  # the running samples' slots, in sample order (sampling)


@dataclass
class Token:
    """One new token of one sample of a request."""

    request: Request
    index: int  # which of the request's n samples
    token: int
    logprob: float  # log p(token) under the raw model
    done: bool  # the sample's last token: a stop id, or its max_new_tokens-th token
    ended: bool  # the token is a stop id


class Engine:
    """Continuous batching: `submit` requests, call `step` until `busy` is false. Each step decodes one
    token for every running sample, prefills the queued requests that fit the free slots (first come,
    first served; a request waits until all its n samples fit), and samples one token per running sample.
    `cancel` frees a request's (or one sample's) slots at once. One thread at a time.

    `cache_len` is each slot's first cache length; it grows (to at least twice, within the model's
    context) when a longer request arrives, so a server need not hold B x context keys from the start.
    `generator` draws the seed of each sampled request that brings none (default: torch's global one)."""

    def __init__(self, model: nn.Module, eos_id: int | Sequence[int], pad_id: int, max_batch: int = 32,
                 cache_len: int = 256, start_id: int | None = None, generator: torch.Generator | None = None,
                 compile: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if isinstance(model, Seq2Seq) and start_id is None:
            raise ValueError("encoder-decoder generation needs start_id (the decoder's first token)")
        self.model, self.pad_id, self.start_id = model, pad_id, start_id
        self.stop = set(stop_ids(eos_id))
        self.seq2seq = isinstance(model, Seq2Seq)
        ctx = model.config.block_size
        self.batch = DecodeBatch(model, max_batch, min(cache_len, ctx), min(cache_len, ctx) if self.seq2seq else 0,
                                 compile=compile)
        self.logits = torch.zeros(max_batch, model.config.vocab_size, device=self.batch.device)  # (B, V) fp32
        self.slots: list[tuple[Request, int] | None] = [None] * max_batch  # (request, sample) per slot
        self.queue: deque[Request] = deque()
        self.running: list[Request] = []
        self.generator = generator
        self.next_tok: torch.Tensor | None = None  # (rows,) the tokens the next decode step feeds
        self.steps = 0  # decode steps taken
        self.prefills = 0  # prefill forwards taken

    @property
    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def check(self, request: Request) -> None:
        """Refuse a request the engine cannot run, with a clear ValueError."""
        request.params.validate()
        check_prompts(self.model, [request.prompt], self.pad_id, allow_empty=False)
        if not 1 <= request.n <= self.batch.B:
            raise ValueError(f"n must be between 1 and the engine's {self.batch.B} slots, got {request.n}")
        need = self._cache_need(len(request.prompt), request.params.max_new_tokens)
        if need > self.batch.limit:
            raise ValueError(f"prompt of {len(request.prompt)} tokens + max_new_tokens "
                             f"{request.params.max_new_tokens} exceeds the model's context of {self.batch.limit} "
                             "tokens")

    def _cache_need(self, prompt_len: int, max_new: int) -> int:
        return max_new + 1 if self.seq2seq else prompt_len + max_new

    def submit(self, request: Request) -> None:
        self.check(request)
        p = request.params
        if request.generator is None and p.temperature > 0:
            seed = p.seed if p.seed is not None else int(torch.randint(2**62, (), generator=self.generator))
            request.generator = torch.Generator(device=self.batch.device).manual_seed(seed)
        request.rows, request.produced = [None] * request.n, [0] * request.n
        self.queue.append(request)

    def cancel(self, request: Request, index: int | None = None) -> None:
        """Stop a request (every sample, or one) now; it produces no more tokens."""
        if request in self.queue and index is None:
            self.queue.remove(request)
            return
        for i, slot in enumerate(request.rows):
            if slot is not None and index in (None, i):
                self._free(request, i)

    def clear(self) -> None:
        """Drop every request, queued or running (after a failed step: the slots' state is unknown)."""
        for request in list(self.running):
            self.cancel(request)
        self.queue.clear()
        self.next_tok = None

    def _free(self, request: Request, i: int) -> None:
        slot = request.rows[i]
        request.rows[i] = None
        self.slots[slot] = None
        self.batch.release(slot)
        if all(r is None for r in request.rows):
            self.running.remove(request)
        else:
            self._index_rows(request)

    def _index_rows(self, request: Request) -> None:
        live = [r for r in request.rows if r is not None]
        request.rows_index = torch.tensor(live, dtype=torch.long, device=self.batch.device)

    @torch.no_grad()
    def step(self) -> list[Token]:
        """Decode, admit, sample: the new token of every running sample."""
        r = self.batch.rows
        if self.running and self.next_tok is not None and r:
            self.logits[:r] = self.batch.decode(self.next_tok[:r])
            self.steps += 1
        self._admit()
        return self._sample() if self.running else []

    def _admit(self) -> None:
        free = [b for b in range(self.batch.B) if self.slots[b] is None]
        new: list[tuple[Request, list[int]]] = []
        while self.queue and self.queue[0].n <= len(free):
            request = self.queue.popleft()
            new.append((request, free[: request.n]))
            free = free[request.n:]
        # Prompts prefill together, left-padded to the longest, as long as every one still fits its slot.
        group: list[tuple[Request, list[int]]] = []
        for item in new:
            T = max([len(item[0].prompt)] + [len(r.prompt) for r, _ in group])
            fits = all(self._cache_need(T, r.params.max_new_tokens) <= self.batch.limit for r, _ in [*group, item])
            if group and not fits:
                self._prefill(group)
                group = []
            group.append(item)
        if group:
            self._prefill(group)

    def _prefill(self, group: list[tuple[Request, list[int]]]) -> None:
        T = max(len(r.prompt) for r, _ in group)
        self.batch.reserve(max(self._cache_need(T, r.params.max_new_tokens) for r, _ in group))
        first = [slots[0] for _, slots in group]
        logits = self.batch.prefill(first, [r.prompt for r, _ in group], self.pad_id, self.start_id)
        self.prefills += 1
        self.logits[first] = logits.float()
        for request, slots in group:
            if len(slots) > 1:  # the other samples share the prompt's keys, values and first logits
                self.batch.copy(slots[0], slots[1:])
                self.logits[slots[1:]] = self.logits[slots[0]].clone()
            for i, b in enumerate(slots):
                self.slots[b] = (request, i)
                request.rows[i] = b
            self._index_rows(request)
            self.running.append(request)

    def _sample(self) -> list[Token]:
        r = self.batch.rows
        logits = self.logits[:r]
        tok = logits.argmax(-1)  # greedy for every slot; sampled requests overwrite their rows
        for request in self.running:
            if request.params.temperature > 0:
                rows = request.rows_index
                tok[rows] = sample_next(logits[rows], request.params, request.generator)
        logp = F.log_softmax(logits, dim=-1).gather(-1, tok[:, None]).squeeze(-1)
        self.next_tok = tok
        out = []
        for b, (t, lp) in enumerate(zip(tok.tolist(), logp.tolist())):  # the step's one host sync
            if self.slots[b] is None:
                continue
            request, i = self.slots[b]
            request.produced[i] += 1
            ended = t in self.stop
            done = ended or request.produced[i] >= request.params.max_new_tokens
            out.append(Token(request, i, t, lp, done, ended))
            if done:
                self._free(request, i)
        return out
